"""Start-up costs, in fresh processes: ``import modeling_llama4`` against transformers' built-in Llama 4 modeling
module (budget: within 1.1x), and each command line's ``--help`` or wrong flag (budget: 3 s).

    python benchmarks/bench_import.py [--repeats 5] [--no-cli]

Each import runs in its own interpreter, timed inside it from just before the import to just after it (the
interpreter's own start is not counted), in wall-clock and in CPU seconds (the steadier figure on a busy machine);
the two imports alternate, so that load changes on a shared machine hit both alike, and the medians of the repeats
are printed with their ratios. The top-level packages our import loads and the built-in's does not are listed: the
first place to look when the ratio grows. The command lines are timed as a user meets them, the whole process from
start to exit. A warm-up run of each comes first, with bytecode writing on (``PYTHONDONTWRITEBYTECODE`` unset), so
both sides run from compiled ``.pyc`` files in the page cache, as they do for a user after the first start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = "modeling_llama4"
BUILT_IN = "transformers.models.llama4.modeling_llama4"
BUDGET_RATIO = 1.1
BUDGET_CLI_S = 3.0

# Each import in a fresh interpreter: the wall-clock and CPU seconds it took, then the top-level packages loaded.
PROBE = """
import sys, time
before = set(sys.modules)
wall, cpu = time.perf_counter(), time.process_time()
import {module}
print(time.perf_counter() - wall, time.process_time() - cpu)
print(" ".join(sorted({{name.split(".")[0] for name in set(sys.modules) - before}})))
"""
# As a user's Python runs: bytecode is written once, then read.
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def import_run(module: str) -> tuple[float, float, set[str]]:
    """Wall-clock and CPU seconds to import ``module`` in a fresh interpreter, and the top-level packages it loaded."""
    command = [sys.executable, "-c", PROBE.format(module=module)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO, env=ENV)
    seconds, packages = result.stdout.splitlines()
    wall, cpu = map(float, seconds.split())
    return wall, cpu, set(packages.split())


def command_lines() -> dict[str, list[str]]:
    """Every command a user starts, with ``--help`` (or no/wrong arguments), as ``argv`` lists."""
    scripts = Path(sys.executable).parent
    commands = {
        "llama4-convert --help": [str(scripts / "llama4-convert"), "--help"],
        "llama4-convert --bogus": [str(scripts / "llama4-convert"), "--bogus"],
        "python -m llama4_convert": [sys.executable, "-m", "llama4_convert"],
        "llama4-demo --help": [str(scripts / "llama4-demo"), "--help"],
        "llama4-demo --bogus": [str(scripts / "llama4-demo"), "--bogus"],
        "python -m llama4_demo --help": [sys.executable, "-m", "llama4_demo", "--help"],
        "python -m app --help": [sys.executable, "-m", "app", "--help"],
    }
    for script in ("chat", "finetune_lora", "push_to_hub", "quantize_int4"):
        commands[f"examples/{script}.py --help"] = [sys.executable, f"examples/{script}.py", "--help"]
    return {name: argv for name, argv in commands.items() if shutil.which(argv[0]) or Path(argv[0]).exists()}


def command_seconds(argv: list[str]) -> float:
    """Wall-clock seconds of one run of ``argv``, from start to exit (its exit status is not checked)."""
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, cwd=REPO, env=ENV)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per import and per command")
    parser.add_argument("--no-cli", action="store_true", help="time the imports only")
    args = parser.parse_args()

    import_run(OURS), import_run(BUILT_IN)  # warm-up: bytecode compiled, files in the page cache
    times = {OURS: {"wall": [], "CPU": []}, BUILT_IN: {"wall": [], "CPU": []}}
    packages = {}
    for _ in range(args.repeats):
        for module, runs in times.items():
            wall, cpu, packages[module] = import_run(module)
            runs["wall"].append(wall)
            runs["CPU"].append(cpu)
    print(f"import time, median of {args.repeats} fresh processes (wall-clock / CPU seconds):")
    for module, runs in times.items():
        medians = " / ".join(f"{statistics.median(runs[clock]):.2f}" for clock in runs)
        spread = ", ".join(f"{seconds:.2f}" for seconds in sorted(runs["wall"]))
        print(f"  {module:<45} {medians} s   (wall: {spread})")
    for clock in ("wall", "CPU"):
        ratio = statistics.median(times[OURS][clock]) / statistics.median(times[BUILT_IN][clock])
        verdict = "within" if ratio <= BUDGET_RATIO else "OVER"
        print(f"  ratio ours / built-in, {clock}: {ratio:.2f}x ({verdict} the {BUDGET_RATIO}x budget)")
    extra = sorted(packages[OURS] - packages[BUILT_IN])
    print(f"  packages only our import loads: {', '.join(extra) or 'none'}")

    if args.no_cli:
        return
    print(f"\ncommand lines, wall time from start to exit, median of {args.repeats}:")
    for argv in command_lines().values():  # warm-up, as for the imports
        subprocess.run(argv, capture_output=True, cwd=REPO, env=ENV)
    for name, argv in command_lines().items():
        median = statistics.median(command_seconds(argv) for _ in range(args.repeats))
        print(f"  {name:<42} {median:6.2f} s{'' if median <= BUDGET_CLI_S else '   OVER the 3 s budget'}")


if __name__ == "__main__":
    main()
