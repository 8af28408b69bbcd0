"""The LoRA round trip on the built-in tiny model: ``examples/finetune_lora.py --model tiny --merge``, then the adapter
and the merged checkpoint in ``examples/chat.py`` and in the demo's loader (what ``llama4-demo`` runs); a text-only
checkpoint in both; merging from an int4 base. Each script runs as a user runs it, in its own process, on a private
tiny-model cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from app.chat import ChatEngine, GenerationSettings, build_messages  # noqa: E402
from app.loading import load  # noqa: E402
from modeling_llama4 import Llama4ForCausalLM  # noqa: E402
from modeling_llama4.tiny import ensure_tiny_checkpoint, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of Peru?"
pytestmark = pytest.mark.slow


def run(cache: Path, script: str, *args: str) -> str:
    """Run ``examples/<script>`` with ``args``; returns what it printed (logs go to stderr)."""
    env = dict(os.environ, LLAMA4_DEMO_CACHE=str(cache), OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "examples" / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout.strip()


def chat(cache: Path, *args: str) -> str:
    return run(cache, "chat.py", "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8", *args)


def demo_answer(cache: Path, model: str, adapter: str | None = None) -> str:
    """The demo's greedy answer to a text turn, through its own loader and chat engine."""
    loaded = load(model, device="cpu", dtype="float32", adapter=adapter, cache_root=cache)
    engine = ChatEngine(loaded.model, loaded.processor)
    return list(engine.stream(build_messages(PROMPT, []), GenerationSettings(temperature=0.0, max_new_tokens=8)))[-1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_cache")
    ensure_tiny_checkpoint(root)
    return root


def test_finetune_adapter_and_merged_checkpoint_in_chat_and_demo(cache, tmp_path):
    out = tmp_path / "out"
    data = str(tmp_path / "chat.jsonl")
    run(
        cache,
        "finetune_lora.py",
        "--model",
        "tiny",
        "--make-demo-data",
        data,
        "--output",
        str(out),
        "--merge",
        "--epochs",
        "1",
    )
    base = chat(cache, "--model", "tiny")
    adapted = chat(cache, "--model", "tiny", "--adapter", str(out / "adapter"))
    assert adapted != base
    assert chat(cache, "--model", str(out / "merged")) == adapted

    demo_base = demo_answer(cache, "tiny")
    demo_adapted = demo_answer(cache, "tiny", adapter=str(out / "adapter"))
    assert demo_adapted != demo_base
    assert demo_answer(cache, str(out / "merged")) == demo_adapted


def test_text_only_checkpoint_opens_in_chat_and_demo(cache, tmp_path):
    torch.manual_seed(0)
    Llama4ForCausalLM(tiny_config().text_config).save_pretrained(tmp_path / "text")
    AutoTokenizer.from_pretrained(ensure_tiny_checkpoint(cache)).save_pretrained(tmp_path / "text")
    answer = chat(cache, "--model", str(tmp_path / "text"))
    assert answer and answer == demo_answer(cache, str(tmp_path / "text")).strip()


def test_merge_from_an_int4_base_writes_bf16_and_requantizes(cache, tmp_path):
    int4, out = tmp_path / "int4", tmp_path / "out"
    run(cache, "quantize_int4.py", "--model", "tiny", "--output", str(int4), "--group-size", "16")
    data = str(tmp_path / "chat.jsonl")
    run(cache, "finetune_lora.py", "--model", str(int4), "--make-demo-data", data, "--output", str(out), "--epochs",
        "0.25", "--merge", "--requantize", "16")  # fmt: skip
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    assert {tensor.dtype for tensor in load_file(out / "merged" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "merged-int4" / "config.json").read_text())["quantization_config"]["group_size"] == 16
    # Both open and generate (``run`` checks the exit status): the random tiny model's 8 greedy tokens may decode to
    # nothing (end of turn, whitespace), so the text itself is not asserted.
    chat(cache, "--model", str(out / "merged"))
    demo_answer(cache, str(out / "merged-int4"))
