"""Llama 4 Scout and Maverick memory on paper: parameters by part, bf16 vs int4 routed experts, KV cache.

Sizes are the released Hugging Face configs (``official_configs``); the formula is the one ``tests/test_int4.py``
checks against the measured footprint of a scaled model. Prints a markdown table for the README.

    python benchmarks/memory_table.py [--group-size 128] [--context 131072] [--gpu-gib 80]
"""

from __future__ import annotations

import argparse

from modeling_llama4.quantization_int4 import footprint_bytes, kv_cache_bytes, official_configs, parameter_counts

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--context", type=int, default=131072, help="KV-cache tokens (batch 1, bf16)")
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    args = parser.parse_args()

    configs = official_configs()
    counts = {name: parameter_counts(config) for name, config in configs.items()}
    names = list(configs)
    print(f"| part | {' | '.join(f'{n} params | {n} bf16 GiB' for n in names)} |")
    print(f"| --- |{' --- | --- |' * len(names)}")
    for part in counts[names[0]]:
        cells = " | ".join(f"{counts[n][part] / 1e6:,.1f} M | {counts[n][part] * 2 / GIB:.2f}" for n in names)
        print(f"| {part} | {cells} |")

    print(
        f"\n| model | params | bf16 GiB | int4 experts (g={args.group_size}) GiB | int4/bf16 | text-only int4/bf16 "
        f"| KV {args.context // 1024}K GiB | int4 + KV GiB | fits {args.gpu_gib:g} GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in configs.items():
        part_counts = counts[name]
        text_counts = dict(part_counts, vision=0)
        bf16 = footprint_bytes(part_counts)
        int4 = footprint_bytes(part_counts, int4_group_size=args.group_size)
        text_ratio = footprint_bytes(text_counts, int4_group_size=args.group_size) / footprint_bytes(text_counts)
        kv = kv_cache_bytes(config, args.context)
        headroom = args.gpu_gib - (int4 + kv) / GIB
        verdict = f"yes, {headroom:.1f} GiB left" if headroom > 0 else f"no, {-headroom:.1f} GiB short"
        print(
            f"| {name} | {sum(part_counts.values()) / 1e9:.1f} B | {bf16 / GIB:.1f} | {int4 / GIB:.1f} "
            f"| {int4 / bf16:.3f} | {text_ratio:.3f} | {kv / GIB:.2f} | {(int4 + kv) / GIB:.1f} | {verdict} |"
        )


if __name__ == "__main__":
    main()
