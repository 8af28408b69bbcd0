"""LoRA training-step cost on the MoE experts: our per-expert LoRA vs PEFT ``target_parameters``, CPU.

One training step (forward + backward of the LM loss, batch 4 × 256) of the scaled Scout-like config of
``bench_text.py`` (hidden 512, 16 experts top-1, 4 layers), LoRA rank 8 on the routed experts only:

- ours:   ``target_modules=["experts"]`` with ``register_expert_lora`` on this package's model (sparse dispatch);
- theirs: ``target_parameters=[gate_up_proj, down_proj]`` on transformers' built-in ``Llama4ForCausalLM`` (same
  weights), which PEFT adapts by re-materialising each expert weight and runs every token through every expert;
- stock-ours (``--with-stock-ours``): PEFT ``target_parameters`` on this package's model, for reference.

Each variant runs in its own process. Memory is the peak RSS growth during the first step (``VmHWM`` reset through
``/proc/self/clear_refs`` just before it); time is the fastest of ``--repeats`` later steps. Prints ratios ours/theirs.

    python benchmarks/bench_lora.py [--threads 2] [--repeats 2] [--with-stock-ours]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from bench_text import SCALED_SCOUT
from peft import LoraConfig, get_peft_model

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.lora_experts import register_expert_lora

RANK = 8
EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def build(variant: str) -> torch.nn.Module:
    """The LoRA-wrapped model of one variant, weights from seed 0."""
    config = Llama4TextConfig(**SCALED_SCOUT)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    if variant == "theirs":
        theirs = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_dict()))
        theirs.load_state_dict(model.state_dict())
        model = theirs
    if variant == "ours":
        lora = register_expert_lora(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["experts"]))
    else:
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[], target_parameters=EXPERT_PARAMETERS)
    return get_peft_model(model, lora).train()


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(variant: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Peak memory of the first training step and the best time of ``repeats`` more, for one variant."""
    model = build(variant)
    ids = torch.randint(0, SCALED_SCOUT["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    before_kib = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak_mib = (proc_status_kib("VmHWM") - before_kib) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    trainable, _ = model.get_nb_trainable_parameters()
    return {"seconds": min(times), "peak_mib": peak_mib, "trainable": trainable}


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", variant, "--threads", str(args.threads)]
    command += ["--repeats", str(args.repeats), "--batch", str(args.batch), "--seq", str(args.seq)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--with-stock-ours", action="store_true")
    parser.add_argument("--worker", choices=["ours", "theirs", "stock-ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.repeats)))
        return

    variants = ["ours", "theirs"] + (["stock-ours"] if args.with_stock_ours else [])
    results = {variant: run_variant(variant, args) for variant in variants}
    print(
        f"config: scaled Scout (hidden 512, 16 experts top-1, 4 layers), LoRA r={RANK} on the experts, "
        f"batch {args.batch} x {args.seq}, {args.threads} threads, CPU"
    )
    for variant, result in results.items():
        print(
            f"{variant:>10}: step {result['seconds']:.2f} s, peak RSS +{result['peak_mib']:.0f} MiB, "
            f"{result['trainable']:,} trainable"
        )
    ours, theirs = results["ours"], results["theirs"]
    print(
        f"ours/theirs time   = {ours['seconds'] / theirs['seconds']:.3f}  ({theirs['seconds'] / ours['seconds']:.1f}x faster)"
    )
    print(f"ours/theirs memory = {ours['peak_mib'] / theirs['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
