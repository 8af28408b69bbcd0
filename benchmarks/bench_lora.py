"""LoRA training-step cost on the MoE experts: our per-expert LoRA vs PEFT ``target_parameters``, and QLoRA, CPU.

One training step (forward + backward of the LM loss, batch 4 × 256) of the scaled Scout config
(:data:`modeling_llama4.tiny.SCALED_SCOUT`: hidden 512, 16 experts top-1, 4 layers), LoRA rank 8 on the routed
experts only, every variant from the same seed-0 weights:

- ``ours``: ``target_modules=["experts"]`` on this package's model, fp32: each expert's LoRA on its own rows only;
- ``peft-sparse``: ``target_parameters=[gate_up_proj, down_proj]`` on this package's model, fp32 (PEFT re-materialises
  each expert weight ``W + ΔW`` every step; same sparse dispatch): the like-for-like peer, the **headline** row;
- ``peft-builtin``: the same on transformers' built-in ``Llama4ForCausalLM``, which also runs every token through every
  expert (two effects at once: LoRA method and dense dispatch);
- ``ours-bf16``: ``ours`` on a bf16 model (loaded with ``from_pretrained(dtype=bfloat16)``);
- ``qlora``: ``ours`` on the same model loaded with int4 experts (``Llama4Int4Config(group_size=128)``), float32
  adapters;
- ``floor``: LoRA on ``q_proj`` only, no expert adapters: the frozen model's own forward and backward, which every
  variant pays (the bound on any expert-LoRA speed-up).

Each variant is measured in two fresh processes. Memory: ``weights`` is the model's parameter and buffer bytes;
``step`` is the peak RSS growth during the first training step (``VmHWM`` reset through ``/proc/self/clear_refs``
just before it, once every weight is resident: ``from_pretrained`` memory-maps bf16 safetensors, whose pages the step
would otherwise count), with malloc returning large freed blocks at once (``MALLOC_MMAP_THRESHOLD_=131072``, else
the heap's retention moves the figure by ±30 MiB run to run); ``peak = weights + step``. Time, in the other process:
the fastest of ``--repeats`` steps after a warm-up step, as wall-clock seconds and as the process's CPU seconds (the
steadier figure on a shared machine; run with ``--threads 1`` for it to be pure work).

    python benchmarks/bench_lora.py [--threads 2] [--repeats 2] [--variants ours peft-sparse ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.quantization_int4 import Llama4Int4Config
from modeling_llama4.tiny import SCALED_SCOUT

RANK = 8
GROUP_SIZE = 128
EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
VARIANTS = ["ours", "peft-sparse", "peft-builtin", "ours-bf16", "qlora", "floor"]


def base_model(variant: str) -> torch.nn.Module:
    """The frozen model of one variant, weights from seed 0."""
    config = Llama4TextConfig(**SCALED_SCOUT)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    if variant == "peft-builtin":
        builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_dict()))
        builtin.load_state_dict(model.state_dict())
        return builtin
    if variant in ("ours-bf16", "qlora"):
        quantization = Llama4Int4Config(group_size=GROUP_SIZE) if variant == "qlora" else None
        with tempfile.TemporaryDirectory() as path:
            model.to(torch.bfloat16).save_pretrained(path)
            return Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization)
    return model


def build(variant: str) -> torch.nn.Module:
    """The LoRA-wrapped model of one variant."""
    if variant.startswith("peft"):
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[], target_parameters=EXPERT_PARAMETERS)
    elif variant == "floor":
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj"])
    else:  # import modeling_llama4 routes "experts" to the per-expert LoRA layer
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["experts"])
    return get_peft_model(base_model(variant), lora).train()


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(variant: str, measure: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """For one variant: the weights and the peak memory of its first training step (``measure="memory"``), or the
    best time of ``repeats`` steps after a warm-up step (``measure="time"``)."""
    model = build(variant)
    ids = torch.randint(0, SCALED_SCOUT["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    if measure == "time":
        step()
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        return {"seconds": min(times), "cpu_seconds": min(cpu_times)}
    tensors = [*model.parameters(), *model.buffers()]
    weights_mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    for tensor in tensors:  # page in weights that from_pretrained left memory-mapped, so the step does not count them
        tensor.detach().sum()
    before_kib = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    step_mib = (proc_status_kib("VmHWM") - before_kib) / 1024
    trainable, _ = model.get_nb_trainable_parameters()
    return {"weights_mib": weights_mib, "step_mib": step_mib, "trainable": trainable}


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Memory and time of one variant, each measured in a fresh process; the memory one with glibc's malloc
    returning every block of 128 KiB or more to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so that the
    peak RSS follows the live tensors rather than what the heap happens to retain."""
    result = {}
    for measure in ("memory", "time"):
        command = [sys.executable, __file__, "--worker", variant, "--measure", measure, "--threads", str(args.threads)]
        command += ["--repeats", str(args.repeats), "--batch", str(args.batch), "--seq", str(args.seq)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)} if measure == "memory" else None
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        result.update(json.loads(output.strip().splitlines()[-1]))
    return result


def print_ratio(name: str, ours: dict[str, float], peer: dict[str, float]) -> None:
    """``ours/peer`` for wall time, CPU time, step memory growth and peak memory; the weights' ratio is what the peak
    memory's would be with no step memory."""
    print(
        f"{name}: time {ours['seconds'] / peer['seconds']:.3f} ({peer['seconds'] / ours['seconds']:.1f}x faster), "
        f"CPU time {ours['cpu_seconds'] / peer['cpu_seconds']:.3f} "
        f"({peer['cpu_seconds'] / ours['cpu_seconds']:.1f}x less), "
        f"step memory {ours['step_mib'] / peer['step_mib']:.3f}, peak memory {ours['peak_mib'] / peer['peak_mib']:.3f} "
        f"(weights alone {ours['weights_mib'] / peer['weights_mib']:.3f})"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with the defaults, and the module docstring's examples as written."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.measure, args.batch, args.seq, args.repeats)))
        return

    results = {variant: run_variant(variant, args) for variant in args.variants}
    print(
        f"config: scaled Scout (hidden 512, 16 experts top-1, 4 layers), LoRA r={RANK} on the experts, "
        f"batch {args.batch} x {args.seq}, {args.threads} threads, CPU"
    )
    for variant, result in results.items():
        result["peak_mib"] = result["weights_mib"] + result["step_mib"]
        print(
            f"{variant:>12}: step {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} s CPU), "
            f"weights {result['weights_mib']:.0f} MiB, "
            f"step +{result['step_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB, {result['trainable']:,} trainable"
        )
    pairs = [
        ("ours/peft-sparse (headline, like for like)", "ours", "peft-sparse"),
        ("ours/peft-builtin (LoRA method + sparse dispatch)", "ours", "peft-builtin"),
        ("qlora/ours-bf16 (int4 base)", "qlora", "ours-bf16"),
        ("ours/floor (expert LoRA over the frozen model's step)", "ours", "floor"),
        ("peft-sparse/floor", "peft-sparse", "floor"),
    ]
    for name, ours, peer in pairs:
        if ours in results and peer in results:
            print_ratio(name, results[ours], results[peer])


if __name__ == "__main__":
    main()
