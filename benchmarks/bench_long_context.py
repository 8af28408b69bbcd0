"""Long-context prefill: peak memory growth and time, this package vs transformers' built-in, same weights, CPU.

A scaled Scout-like model (hidden 256, 4 layers: 3 chunked RoPE layers with chunk 1024 and 1 global NoPE layer,
16 experts top-1, random weights), batch 1. Each point runs in a fresh subprocess (a failure or an out-of-memory
kill loses that point only): build the model, then prefill as ``generate`` does (cache filled, logits of the last
position), recording the peak RSS above the RSS before the prefill (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``), the CPU time and wall time (one thread by default: on a shared machine the CPU time
is the stable figure, and the ratio uses it) and the KV-cache bytes. Prints each figure with ours/built-in where
both ran and the goal ``growth <= 1.5 x KV bytes + 1 GB``; writes a PNG plot of memory against tokens.
The built-in grows quadratically (~6 GB at 32K): it runs up to ``--builtin-max-tokens`` only.

First it prints the KV-cache bytes at Scout's real attention shape (48 layers, 12 NoPE, 8 kv heads x 128, chunk
8192, bf16), computed by running the cache classes on ``meta`` tensors: ``Llama4Cache`` vs transformers'
``DynamicCache(config)`` (chunked layers keep ``C - 1`` tokens) and an uncapped ``DynamicCache``.

    python benchmarks/bench_long_context.py [--tokens 8192 32768 131072] [--output benchmarks]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1e9


def memory_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


SCOUT_ATTENTION = dict(
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    attention_chunk_size=8192,
    no_rope_layer_interval=4,
    max_position_embeddings=10_485_760,
)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def scout_kv_bytes(cache, tokens: int, step: int = 8192) -> int:
    """Feed ``tokens`` bf16 keys/values (batch 1, ``meta``: shapes only) through ``cache`` in prefill blocks."""
    config = SCOUT_ATTENTION
    for start in range(0, tokens, step):
        length = min(step, tokens - start)
        kv = torch.empty(
            1, config["num_key_value_heads"], length, config["head_dim"], dtype=torch.bfloat16, device="meta"
        )
        positions = torch.arange(start, start + length)[None]
        for layer_idx in range(config["num_hidden_layers"]):
            cache.update(kv, kv, layer_idx, position_ids=positions)
    return cache_bytes(cache)


def print_scout_kv_bytes() -> None:
    from transformers.cache_utils import DynamicCache

    from modeling_llama4 import Llama4TextConfig
    from modeling_llama4.cache import Llama4Cache

    config = Llama4TextConfig(**SCOUT_ATTENTION)
    for tokens in (32 * 1024, 128 * 1024, 128 * 1024 + 4096):
        ours = scout_kv_bytes(Llama4Cache(config), tokens)
        theirs = scout_kv_bytes(DynamicCache(config=config), tokens)
        uncapped = scout_kv_bytes(DynamicCache(), tokens)
        print(
            f"Scout KV cache, {tokens:>7} tokens: ours {ours / 2**30:.2f} GiB, DynamicCache(config) "
            f"{theirs / 2**30:.2f} GiB, uncapped {uncapped / 2**30:.2f} GiB -> ours/DynamicCache(config) = "
            f"{ours / theirs:.3f}, ours/uncapped = {ours / uncapped:.3f}"
        )


@torch.inference_mode()
def measure(model_name: str, tokens: int) -> dict:
    """Prefill ``tokens`` random tokens with one model (this process): growth, seconds, KV bytes."""
    import transformers

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from modeling_llama4.tiny import SCALED_SCOUT_LONG

    torch.manual_seed(0)
    config = Llama4TextConfig(**SCALED_SCOUT_LONG)
    if model_name == "ours":
        model = Llama4ForCausalLM(config).eval()
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_dict())).eval()
    prompt = torch.randint(0, config.vocab_size, (1, tokens))
    model(prompt[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    before = memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, start_cpu = time.perf_counter(), time.process_time()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    growth = (memory_kb("VmHWM") - before) * 1024
    return dict(growth=growth, seconds=seconds, cpu_seconds=cpu_seconds, kv=cache_bytes(out.cache))


def run_point(model_name: str, tokens: int, threads: int, timeout: float) -> dict | None:
    """``measure`` in a fresh subprocess; None when it fails or times out."""
    command = [sys.executable, __file__, "--worker", model_name, "--tokens", str(tokens), "--threads", str(threads)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {model_name} {tokens}: did not finish in {timeout:.0f} s")
        return None
    if result.returncode != 0:
        print(f"  {model_name} {tokens}: failed (exit {result.returncode}) {result.stderr[-300:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(points: dict[str, dict[int, dict]], path: Path) -> None:
    """Memory growth (GB) against prompt tokens (log scale) for both models, with the KV bytes and the goal."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 560, 80, 200, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    ours = points["ours"]
    kv = {n: p["kv"] / GB for n, p in ours.items()}
    series = {
        "built-in (transformers)": ({n: p["growth"] / GB for n, p in points["builtin"].items()}, (200, 60, 40)),
        "ours": ({n: p["growth"] / GB for n, p in ours.items()}, (30, 90, 200)),
        "ours: KV-cache bytes": (kv, (120, 120, 120)),
        "goal: 1.5 x KV + 1 GB": ({n: 1.5 * b + 1 for n, b in kv.items()}, (60, 160, 60)),
    }
    xs = sorted({n for values, _ in series.values() for n in values})
    y_max = max(v for values, _ in series.values() for v in values.values()) * 1.1
    x_of = {n: left + (width - left - right) * i / max(len(xs) - 1, 1) for i, n in enumerate(xs)}

    def y_of(value: float) -> float:
        return height - bottom - (height - top - bottom) * value / y_max

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for n, x in x_of.items():
        draw.text((x - 12, height - bottom + 8), f"{n // 1024}K", fill="black")
    for tick in range(int(y_max) + 1):
        draw.text((left - 40, y_of(tick) - 6), f"{tick} GB", fill="black")
        draw.line([(left - 4, y_of(tick)), (left, y_of(tick))], fill="black")
    draw.text((left, 12), "Prefill peak RSS growth vs prompt tokens (scaled Scout, CPU)", fill="black")
    draw.text(((width - right) // 2, height - 25), "prompt tokens", fill="black")
    for row, (label, (values, color)) in enumerate(series.items()):
        coords = [(x_of[n], y_of(values[n])) for n in sorted(values)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=3)
        for x, y in coords:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        draw.line(
            [(width - right + 15, top + 20 * row + 6), (width - right + 40, top + 20 * row + 6)], fill=color, width=3
        )
        draw.text((width - right + 45, top + 20 * row), label, fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072], help="prompt lengths")
    parser.add_argument("--builtin-max-tokens", type=int, default=32768, help="longest prompt for the built-in")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent, help="folder for the PNG plot")
    parser.add_argument("--worker", choices=["ours", "builtin"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens[0])))
        return

    print_scout_kv_bytes()
    points: dict[str, dict[int, dict]] = {"ours": {}, "builtin": {}}
    for tokens in args.tokens:
        for name in ("ours", "builtin"):
            if name == "builtin" and tokens > args.builtin_max_tokens:
                continue
            result = run_point(name, tokens, args.threads, args.timeout)
            if result is not None:
                points[name][tokens] = result
        ours, builtin = points["ours"].get(tokens), points["builtin"].get(tokens)
        if ours is None:
            continue
        goal = 1.5 * ours["kv"] + GB
        line = (
            f"{tokens // 1024:>4}K tokens: ours growth {ours['growth'] / GB:6.3f} GB, CPU {ours['cpu_seconds']:6.1f} s "
            f"(wall {ours['seconds']:6.1f} s); "
            f"KV {ours['kv'] / GB:.3f} GB; growth/(1.5 KV + 1 GB) = {ours['growth'] / goal:.2f}"
        )
        if builtin is not None:
            line += (
                f" | built-in growth {builtin['growth'] / GB:6.3f} GB, CPU {builtin['cpu_seconds']:6.1f} s (wall "
                f"{builtin['seconds']:6.1f} s), KV {builtin['kv'] / GB:.3f} GB -> ours/built-in: memory "
                f"{ours['growth'] / builtin['growth']:.3f}, CPU time {ours['cpu_seconds'] / builtin['cpu_seconds']:.3f}"
            )
        print(line, flush=True)
    if points["ours"]:
        path = args.output / "long_context_memory.png"
        plot(points, path)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
