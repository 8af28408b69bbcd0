"""Scale-out on CPU/gloo: this package vs transformers' built-in Llama 4 on the same checkpoint, same run.

A scaled Scout checkpoint (16 experts top-1, every layer MoE, routed experts ~90% of the weights as in Scout) is
loaded at world 1, 2 and 4 (``torchrun``, one thread per rank), each load in fresh processes:

- ``ours tp``: ``from_pretrained(path, tp_plan="auto")`` (routed experts sharded along their hidden dim);
- ``ours tp+ep``: ``from_pretrained(path, distributed_config=DistributedConfig(tp_size=W, ep_size=W))``;
- ``built-in tp``: transformers' ``Llama4ForCausalLM.from_pretrained(path, tp_plan="auto")``.

Per layout it prints, from the rank with the largest figure: the rank's routed-expert bytes as a fraction of the
whole (target 1/W); the peak RSS growth through loading and the first forward (which reads every weight: loaded
tensors may be lazily mapped from the safetensors files) over the rank's share of the weights (target <= 1.2), from a
baseline taken after the imports and the process group's start (a torchrun script starts it before loading; what
starting it costs is printed apart), with the peak through loading alone and parts of the resident growth: anonymous
memory after loading and after the forward, the libraries' code pages (file-backed, faulted in on first use) and the
checkpoint's pages mapped into the rank after the forward; and prefill (1 x 128 tokens, cache filled, last logits)
and greedy decode (16 tokens) time as ratios built-in/ours (> 1: ours faster), measured in the same run.

    python benchmarks/bench_parallel.py [--worlds 1 2 4] [--model PATH] [--repeats 3]
    python benchmarks/bench_parallel.py --worlds 2 4 --layers 16 --layouts "ours tp" "ours tp+ep"  # larger shares
    python benchmarks/bench_parallel.py --memory-table   # per-GPU weights of Scout / Maverick at 1-16 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from memory_table import footprint_bytes, kv_cache_bytes, official_configs, parameter_counts
from timing import best_time

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.tiny import SCALED_SCOUT_PARALLEL

LAYOUTS = ("ours tp", "ours tp+ep", "built-in tp")


def resident_bytes() -> dict[str, int]:
    """This process's resident bytes: ``total``, ``anonymous`` and ``file`` (file-backed: code, mapped files)."""
    fields = dict(line.split(":") for line in Path("/proc/self/status").read_text().splitlines())
    names = {"total": "VmRSS", "anonymous": "RssAnon", "file": "RssFile"}
    return {kind: int(fields[name].split()[0]) * 1024 for kind, name in names.items()}


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpoint_resident_bytes(checkpoint: str) -> int:
    """Resident bytes of the checkpoint's safetensors files mapped into this process (its pages in our RSS)."""
    folder, total, mapped = str(Path(checkpoint).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping: address range, permissions, offset, device, inode[, path]
            mapped = len(fields) > 5 and fields[5].startswith(folder) and fields[5].endswith(".safetensors")
        elif fields[0] == "Rss:" and mapped:
            total += int(fields[1]) * 1024
    return total


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def load(checkpoint: str, layout: str, world: int) -> torch.nn.Module:
    model_class = transformers.Llama4ForCausalLM if layout == "built-in tp" else transformers.AutoModelForCausalLM
    kwargs = {}
    if world > 1 and layout == "ours tp+ep":
        kwargs["distributed_config"] = transformers.DistributedConfig(tp_size=world, ep_size=world)
    elif world > 1:
        kwargs["tp_plan"] = "auto"
    return model_class.from_pretrained(checkpoint, **kwargs).eval()


@torch.inference_mode()
def measure_rank(checkpoint: str, layout: str, repeats: int, output: str) -> None:
    """One rank of one layout: load, then time prefill and decode; rank 0 writes the maxima over ranks."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    prompt = torch.randint(
        3, SCALED_SCOUT_PARALLEL["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(0)
    )
    before_group = resident_bytes()["total"]
    if world > 1:  # as a torchrun script does before loading (else from_pretrained starts it)
        torch.distributed.init_process_group("gloo")
    baseline = resident_bytes()
    model = load(checkpoint, layout, world)
    load_peak = peak_resident_bytes() - baseline["total"]
    anon_after_load = resident_bytes()["anonymous"] - baseline["anonymous"]
    model(prompt, use_cache=True, logits_to_keep=1)  # the first forward reads every (lazily mapped) weight
    peak = peak_resident_bytes() - baseline["total"]
    growth = {kind: now - baseline[kind] for kind, now in resident_bytes().items()}
    checkpoint_pages = checkpoint_resident_bytes(checkpoint)
    share = sum(local_bytes(t) for t in model.state_dict().values())
    experts = [(local_bytes(p), p.numel() * p.element_size()) for n, p in model.named_parameters() if ".experts." in n]
    expert_fraction = sum(local for local, _ in experts) / sum(whole for _, whole in experts)

    prefill = best_time(lambda: model(prompt, use_cache=True, logits_to_keep=1), repeats)
    generate = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    decode = best_time(lambda: model.generate(prompt[:, :32], **generate), repeats)

    figures = {
        "expert_fraction": expert_fraction,
        "load_rss": peak,
        "load_rss_over_share": peak / share,
        "load_alone_over_share": load_peak / share,
        "anon_after_load_over_share": anon_after_load / share,
        "anon_over_share": growth["anonymous"] / share,
        "library_code_over_share": (growth["file"] - checkpoint_pages) / share,
        "checkpoint_over_share": checkpoint_pages / share,
        "process_group_over_share": (baseline["total"] - before_group) / share,
        "prefill_s": prefill,
        "decode_s": decode,
    }
    maxima = torch.tensor(list(figures.values()), dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(output).write_text(json.dumps(dict(zip(figures, maxima.tolist()))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(checkpoint: str, layout: str, world: int, repeats: int, workdir: str) -> dict[str, float]:
    output = Path(workdir) / f"{layout.replace(' ', '_')}-{world}.json"
    worker = [__file__, "--worker", layout, "--model", checkpoint, "--repeats", str(repeats), "--output", str(output)]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        f"--master-port={free_port()}",
    ]
    command = launcher + worker if world > 1 else [sys.executable, *worker]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{layout} at world {world} failed:\n{result.stderr[-4000:]}")
    return json.loads(output.read_text())


def build_checkpoint(path: str, layers: int) -> None:
    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig(**dict(SCALED_SCOUT_PARALLEL, num_hidden_layers=layers))).save_pretrained(path)


def per_gpu_bytes(config, world: int, int4_group_size: int | None, context: int) -> tuple[int, int]:
    """``(weights, KV cache for context tokens)`` per GPU under ``DistributedConfig(tp_size=W, ep_size=W)``.

    Every part the text plans shard divides by W (embeddings and head by vocabulary, attention by heads, shared
    experts and dense MLPs by hidden dim, routed experts by expert); k/v projections and the KV cache divide by
    at most the KV-head count (8: beyond it they are replicated); router, norms and the vision tower are counted
    whole on every GPU.
    """
    text = config.get_text_config()
    counts = parameter_counts(config)
    kv_split = min(world, text.num_key_value_heads)
    kv_projections = text.num_hidden_layers * 2 * text.hidden_size * text.num_key_value_heads * text.head_dim
    whole = ("router", "norms", "vision")
    per_gpu = {part: count if part in whole else count // world for part, count in counts.items()}
    per_gpu["attention"] += kv_projections // kv_split - kv_projections // world
    weights = sum(count * 2 for count in per_gpu.values())  # bf16
    if int4_group_size:  # the routed experts, split evenly over the GPUs, shrink by what int4 saves on them
        saved = footprint_bytes(config) - footprint_bytes(config, "int4", group_size=int4_group_size)
        weights -= saved // world
    return weights, kv_cache_bytes(config, context) // kv_split


def print_memory_table(worlds: tuple[int, ...] = (1, 2, 4, 8, 16), context: int = 131072) -> None:
    gib = 2**30
    print(f"| model | experts | {' | '.join(f'TP/EP {w}' for w in worlds)} |")
    print(f"| --- | --- |{' --- |' * len(worlds)}")
    for name, config in official_configs().items():
        for label, group_size in (("bf16", None), ("int4 (g=128)", 128)):
            cells = []
            for world in worlds:
                weights, kv = per_gpu_bytes(config, world, group_size, context)
                cells.append(f"{weights / gib:.1f} + {kv / gib:.2f}")
            print(f"| {name} | {label} | {' | '.join(cells)} |")
    print(f"\nGiB per GPU: weights + KV cache of {context // 1024}K tokens (batch 1, bf16).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="torchrun world sizes to measure")
    parser.add_argument("--model", help="an HF Llama 4 text checkpoint to read; default: the scaled Scout above")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the fastest is kept)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the scaled Scout (a larger share)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS, help="layouts to measure")
    parser.add_argument("--memory-table", action="store_true", help="print the per-GPU memory table and exit")
    parser.add_argument("--worker", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_table:
        print_memory_table()
        return
    if args.worker:
        measure_rank(args.model, args.worker, args.repeats, args.output)
        return

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = args.model or str(Path(workdir) / "checkpoint")
        if not args.model:
            build_checkpoint(checkpoint, args.layers)
        print(
            "world | layout | expert bytes/rank (x whole) | peak RSS growth through load + first forward / share "
            "(load alone; anonymous after load, after the forward; library code pages, checkpoint pages after it) "
            "| process group start / share (before the baseline) | prefill, decode built-in/ours"
        )
        for world in args.worlds:
            layouts = [layout for layout in args.layouts if world > 1 or layout != "ours tp+ep"]
            figures = {layout: run_layout(checkpoint, layout, world, args.repeats, workdir) for layout in layouts}
            builtin = figures.get("built-in tp")
            for layout, fig in figures.items():
                speed = "-"  # no built-in run to compare with
                if builtin:
                    speed = (
                        f"{builtin['prefill_s'] / fig['prefill_s']:.2f}x, {builtin['decode_s'] / fig['decode_s']:.2f}x"
                    )
                print(
                    f"{world} | {layout} | {fig['expert_fraction']:.3f} | {fig['load_rss_over_share']:.2f} "
                    f"({fig['load_rss'] / 2**20:.0f} MiB; load alone {fig['load_alone_over_share']:.2f}; anonymous "
                    f"{fig['anon_after_load_over_share']:.2f}, {fig['anon_over_share']:.2f}; library code "
                    f"{fig['library_code_over_share']:.2f}, checkpoint {fig['checkpoint_over_share']:.2f}) "
                    f"| {fig['process_group_over_share']:.2f} | {speed} "
                    f"(prefill {fig['prefill_s'] * 1e3:.0f} ms, decode {fig['decode_s'] * 1e3:.0f} ms)"
                )


if __name__ == "__main__":
    main()
