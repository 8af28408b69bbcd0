"""Llama 4 Scout and Maverick memory on paper: parameters by part, weight bytes under each storage scheme (bf16,
int4 routed experts, int4 routed + shared experts, FP8 routed experts as in Meta's official checkpoints) and the KV
cache. The formulas match ``get_memory_footprint`` of a model loaded each way to the byte (``tests/test_int4.py``,
``tests/test_fp8.py``). Prints markdown tables for the README.

    python benchmarks/memory_table.py [--group-size 128] [--context 131072] [--gpu-gib 80]
"""

from __future__ import annotations

import argparse
import math

from modeling_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig

GIB = 2**30
SCHEMES = ("bf16", "int4", "int4+shared", "fp8")
SCHEME_NAMES = {
    "bf16": "bf16",
    "int4": "int4 experts",
    "int4+shared": "int4 experts + shared",
    "fp8": "FP8 experts",
}


def vision_parameter_count(vision: Llama4VisionConfig, text_hidden_size: int) -> int:
    """Vision encoder + pixel-shuffle adapter + projector to the text width (transformers' module layout)."""
    hidden, inner = vision.hidden_size, vision.intermediate_size
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inner + inner + hidden + 4 * hidden  # attn, MLP, 2 LNs
    embeddings = vision.num_channels * patch * patch * hidden + hidden + ((image // patch) ** 2 + 1) * hidden
    adapter_in = round(hidden / vision.pixel_shuffle_ratio**2)
    adapter = adapter_in * vision.projector_input_dim + vision.projector_output_dim**2
    return (
        vision.num_hidden_layers * layer
        + embeddings
        + 4 * hidden
        + adapter
        + vision.vision_output_dim * text_hidden_size
    )


def parameter_counts(config: Llama4TextConfig | Llama4Config) -> dict[str, int]:
    """Parameters of Llama 4 by part, from the config alone (``vision`` is 0 for a text-only config)."""
    text = config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    moe_layers, experts = len(text.moe_layers), text.num_local_experts
    q_width, kv_width = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    attention_bias = (q_width + 2 * kv_width + hidden) if text.attention_bias else 0
    vision = getattr(config, "vision_config", None)
    return {
        "embeddings": vocab * hidden,
        "attention": layers * (2 * hidden * q_width + 2 * hidden * kv_width + attention_bias),
        "routed experts": moe_layers * experts * 3 * hidden * text.intermediate_size,
        "shared experts": moe_layers * 3 * hidden * text.intermediate_size,
        "dense MLPs": (layers - moe_layers) * 3 * hidden * text.intermediate_size_mlp,
        "router": moe_layers * hidden * experts,
        "norms": (2 * layers + 1) * hidden,
        "head": 0 if text.tie_word_embeddings else vocab * hidden,
        "vision": vision_parameter_count(vision, hidden) if vision is not None else 0,
    }


def footprint_bytes(
    config: Llama4TextConfig | Llama4Config,
    scheme: str = "bf16",
    dtype_bytes: int = 2,
    group_size: int = 128,
    vision: bool = True,
) -> int:
    """Weight bytes of the model of ``config`` stored as ``scheme`` (one of ``SCHEMES``), the rest in ``dtype_bytes``.

    int4 (``modeling_llama4.int4``): ``0.5 + 2 / G`` bytes a weight; FP8 (``modeling_llama4.fp8``): 1 byte a weight
    plus one float32 scale per output channel of each expert.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}.")
    counts = parameter_counts(config)
    if not vision:
        counts["vision"] = 0
    quantized = {"bf16": (), "int4": ("routed experts",), "int4+shared": ("routed experts", "shared experts")}
    quantized["fp8"] = ("routed experts",)
    total = sum(count * dtype_bytes for part, count in counts.items() if part not in quantized[scheme])
    weights = sum(counts[part] for part in quantized[scheme])
    if scheme.startswith("int4"):
        return total + weights // 2 + weights // group_size * 2
    if scheme == "fp8":
        text = config.get_text_config()
        channels = len(text.moe_layers) * text.num_local_experts * (2 * text.intermediate_size + text.hidden_size)
        return total + weights + 4 * channels
    return total


def kv_cache_bytes(config: Llama4TextConfig | Llama4Config, tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """KV cache for ``tokens`` of context: full-attention (NoPE) layers keep all of them, chunked layers at most
    ``attention_chunk_size`` (what the chunked cache keeps between decode steps)."""
    text = config.get_text_config()
    chunk = text.attention_chunk_size or tokens
    kept = sum(tokens if kind == "full_attention" else min(tokens, chunk) for kind in text.layer_types)
    return 2 * batch * kept * text.num_key_value_heads * text.head_dim * dtype_bytes


def official_configs() -> dict[str, Llama4Config]:
    """Scout and Maverick (Llama-4-*-17B-16E / -128E) at the released sizes of their Hugging Face config.json."""
    vision = dict(
        hidden_size=1408,
        intermediate_size=5632,
        num_hidden_layers=34,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=4096,
        projector_input_dim=4096,
        projector_output_dim=4096,
    )
    text = dict(
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        vocab_size=202048,
        attention_chunk_size=8192,
        no_rope_layer_interval=4,
    )
    scout = dict(text, num_local_experts=16, interleave_moe_layer_step=1)
    maverick = dict(text, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False)
    return {
        name: Llama4Config(text_config=Llama4TextConfig(**fields), vision_config=Llama4VisionConfig(**vision))
        for name, fields in (("Scout", scout), ("Maverick", maverick))
    }


def gpus_needed(total_bytes: int, gpu_gib: float) -> int:
    """The smallest power-of-two count of ``gpu_gib`` GPUs whose memory holds ``total_bytes`` (1, 2, 4, 8 …)."""
    return 2 ** max(0, math.ceil(math.log2(total_bytes / (gpu_gib * GIB))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128, help="int4 weights per scale")
    parser.add_argument("--context", type=int, default=131072, help="KV-cache tokens (batch 1, bf16)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    args = parser.parse_args()

    configs = official_configs()
    counts = {name: parameter_counts(config) for name, config in configs.items()}
    names = list(configs)
    print(f"| part | {' | '.join(f'{n} params | {n} bf16 GiB' for n in names)} |")
    print(f"| --- |{' --- | --- |' * len(names)}")
    for part in counts[names[0]]:
        cells = " | ".join(f"{counts[n][part] / 1e6:,.1f} M | {counts[n][part] * 2 / GIB:.2f}" for n in names)
        print(f"| {part} | {cells} |")

    context = f"{args.context // 1024}K"
    print(
        f"\n| model | weights (g={args.group_size} for int4) | GiB | /bf16 | text-only /bf16 | KV {context} GiB "
        f"| weights + KV GiB | {args.gpu_gib:g} GiB GPUs |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in configs.items():
        kv = kv_cache_bytes(config, args.context)
        bf16 = footprint_bytes(config)
        bf16_text = footprint_bytes(config, vision=False)
        for scheme in SCHEMES:
            weights = footprint_bytes(config, scheme, group_size=args.group_size)
            text = footprint_bytes(config, scheme, group_size=args.group_size, vision=False)
            print(
                f"| {name} | {SCHEME_NAMES[scheme]} | {weights / GIB:.1f} | {weights / bf16:.3f} | {text / bf16_text:.3f} "
                f"| {kv / GIB:.2f} | {(weights + kv) / GIB:.1f} | {gpus_needed(weights + kv, args.gpu_gib)} |"
            )


if __name__ == "__main__":
    main()
