"""The command lines as a newcomer meets them: ``--help``, a mistyped flag and no arguments answer from the parser
alone (no torch, transformers, PEFT or Gradio imported), help texts show each default once and their examples as
lines; Ctrl-C during a conversion; ``--model tiny`` without ``llama-models``; the examples run without warnings.

Times are measured by ``benchmarks/bench_import.py``, not asserted here (the machine is shared)."""

from __future__ import annotations

import configparser
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAVY = ("torch", "transformers", "peft", "gradio", "modeling_llama4")

# Every command, as ``python`` arguments: (name, argv, text its --help must show).
COMMANDS = [
    ("llama4-convert", ["-m", "llama4_convert"], "--input DIR, --input-dir DIR"),
    ("llama4-demo", ["-m", "llama4_demo"], "--max-new-tokens N"),
    ("python -m app", ["-m", "app"], "--max-new-tokens N"),
    ("chat.py", ["examples/chat.py"], "--image IMAGE"),
    ("finetune_lora.py", ["examples/finetune_lora.py"], "--make-demo-data [PATH]"),
    ("push_to_hub.py", ["examples/push_to_hub.py"], "--dry-run"),
    ("quantize_int4.py", ["examples/quantize_int4.py"], "--quantize-shared-expert"),
]
IDS = [name for name, _, _ in COMMANDS]

# Imports the command, runs it with the given arguments, then reports which heavy packages it loaded.
PROBE = f"""
import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print("LOADED", *sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY})), file=sys.stderr)
sys.exit(code)
"""


def run(*argv: str, probe: bool = False, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python ARGV`` from the repository root, as a user types it (``probe``: also list the heavy imports)."""
    if probe:
        target = argv[1] if argv[0] == "-m" else argv[0]
        rest = argv[2:] if argv[0] == "-m" else argv[1:]
        argv = ("-c", PROBE, target, *rest)
    command = [sys.executable, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def loaded(result: subprocess.CompletedProcess) -> list[str]:
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("LOADED")]
    return line.split()[1:]


# --- --help and mistakes answer from the parser alone ---------------------------------------------------------------


@pytest.mark.parametrize("name, argv, key", COMMANDS, ids=IDS)
def test_help_answers_without_heavy_imports(name, argv, key):
    result = run(*argv, "--help", probe=True)
    assert result.returncode == 0, result.stderr
    assert key in result.stdout and "usage:" in result.stdout
    assert "(default: None)" not in result.stdout and "default: None" not in result.stdout
    assert loaded(result) == []


@pytest.mark.parametrize("name, argv, key", COMMANDS, ids=IDS)
def test_wrong_flag_is_a_usage_error_without_heavy_imports(name, argv, key):
    result = run(*argv, "--no-such-flag", probe=True)
    assert result.returncode == 2
    assert re.search(
        r": error: (unrecognized arguments: --no-such-flag|the following arguments are required)", result.stderr
    )
    assert "Traceback" not in result.stderr
    assert loaded(result) == []


def test_convert_without_arguments_names_what_is_required():
    result = run("-m", "llama4_convert")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the following arguments are required: --input/--input-dir, --output/--output-dir" in result.stderr


@pytest.mark.parametrize("script", ["llama4-convert", "llama4-demo"])
def test_console_scripts_answer_help(script):
    if not (BIN / script).exists():
        pytest.skip(f"{script} is not installed in {BIN}")
    result = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"usage: {script}" in result.stdout


# --- help texts -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, example",
    [
        (
            ["examples/push_to_hub.py"],
            "\n    python examples/push_to_hub.py --model tiny --repo-id user/tiny-llama4 --dry-run\n",
        ),
        (
            ["examples/quantize_int4.py"],
            "\n    python examples/quantize_int4.py --model tiny --output /tmp/tiny-int4\n",
        ),
        (["-m", "llama4_convert"], "\n  llama4-convert --to-native --input Scout-HF --output Scout-native\n"),
        (["-m", "llama4_demo"], "\n  llama4-demo                                # the built-in tiny model"),
    ],
    ids=["push_to_hub", "quantize_int4", "llama4-convert", "llama4-demo"],
)
def test_help_shows_examples_as_lines(argv, example):
    assert example in run(*argv, "--help").stdout


def test_convert_help_states_each_default_once():
    from conversion.params import DEFAULT_MAX_POSITION_EMBEDDINGS

    text = " ".join(run("-m", "llama4_convert", "--help").stdout.split())
    assert f"config.json (default: {DEFAULT_MAX_POSITION_EMBEDDINGS})" in text
    assert "(default: bfloat16; with --to-native, the input's)" in text
    assert "(default: 128)" in text and "(default: 5GB)" in text
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text)


# --- llama4-convert: Ctrl-C -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cache"))


def test_ctrl_c_during_conversion_prints_one_line_and_exits_130(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    from conversion import cli, to_native

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C would, while the staging folder is being written

    monkeypatch.setattr(to_native, "write_tiktoken_model", interrupted)
    output = tmp_path / "new" / "native"
    with caplog.at_level(logging.INFO):
        status = cli.main(["--to-native", "--input", str(tiny_checkpoint), "--output", str(output)])
    assert status == 130
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [f"interrupted: nothing was written to {output}"]
    assert not output.exists() and not list(output.parent.glob(".native*"))


# --- --model tiny needs llama-models ---------------------------------------------------------------------------------


def test_tiny_model_without_llama_models_names_the_extra(tmp_path, monkeypatch):
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    monkeypatch.setitem(sys.modules, "llama_models", None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape('pip install "modeling-llama4[tiny]"')):
        ensure_tiny_checkpoint(tmp_path)
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "llama-models" in setup["options.extras_require"]["tiny"]


# --- the demo's command line ----------------------------------------------------------------------------------------


def test_demo_answer_length_and_no_share_link():
    from app.cli import TINY_MAX_NEW_TOKENS, parse_args

    assert parse_args([]).max_new_tokens is None  # the model decides: 64 on the tiny one
    assert TINY_MAX_NEW_TOKENS == 64 and parse_args(["--max-new-tokens", "16"]).max_new_tokens == 16
    result = run("-m", "llama4_demo", "--max-new-tokens", "0")
    assert result.returncode == 2 and "--max-new-tokens must be at least 1, got 0" in result.stderr

    from app.chat import Limits
    from app.ui import launch_kwargs

    kwargs = launch_kwargs("127.0.0.1", 7860, Limits())
    assert kwargs["share"] is False and kwargs["quiet"] is True  # quiet: Gradio's banner suggests share=True


# --- the examples end to end, FutureWarnings and UserWarnings as errors --------------------------------------------


@pytest.mark.slow
def test_finetune_then_chat_text_only_without_warnings(tiny_checkpoint, tmp_path):
    """``finetune_lora.py`` with its default outputs (a temporary folder it names), then ``chat.py`` with the
    adapter and no image: a text-only chat with the multimodal tiny model, none of them warning."""
    pytest.importorskip("peft")
    env = dict(
        os.environ,
        LLAMA4_DEMO_CACHE=str(tiny_checkpoint.parent),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="error::FutureWarning,error::UserWarning",
        TMPDIR=str(tmp_path),
    )
    args = ["--model", "tiny", "--make-demo-data", "--epochs", "0.125", "--device", "cpu"]
    result = run("examples/finetune_lora.py", *args, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Warning" not in result.stderr, result.stderr[-5000:]
    (output,) = tmp_path.glob("finetune_lora-*")
    assert f"done; outputs in {output}" in result.stderr
    assert (output / "chat.jsonl").is_file() and (output / "adapter" / "adapter_config.json").is_file()
    assert not (REPO / "chat.jsonl").exists() and not (REPO / "out").exists()

    chat = ["examples/chat.py", "--prompt", "What is the capital of Peru?", "--max-new-tokens", "8", "--device", "cpu"]
    result = run(*chat, "--adapter", str(output / "adapter"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Warning" not in result.stderr, result.stderr[-5000:]


@pytest.mark.slow
def test_chat_without_image_is_text_only(tiny_checkpoint):
    """``chat.py --model tiny`` without ``--image`` answers what the demo answers to the same text-only message."""
    from app.chat import ChatEngine, GenerationSettings, build_messages
    from app.loading import load

    prompt = "What is the capital of Peru?"
    env = dict(os.environ, LLAMA4_DEMO_CACHE=str(tiny_checkpoint.parent), OMP_NUM_THREADS="1")
    chat = ["examples/chat.py", "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"]
    result = run(*chat, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    loaded_model = load("tiny", device="cpu", dtype="float32", cache_root=tiny_checkpoint.parent)
    engine = ChatEngine(loaded_model.model, loaded_model.processor)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=8)
    assert result.stdout.strip() == list(engine.stream(build_messages(prompt, []), settings))[-1].strip()
