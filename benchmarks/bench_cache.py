"""KV-cache bytes at long context: the cache this model builds vs an uncapped transformers ``DynamicCache``.

``Llama4TextModel`` creates ``DynamicCache(config=config)``, whose chunked-attention (RoPE) layers keep at most
``attention_chunk_size`` keys/values while the NoPE (global) layers keep everything. The figures are computed
by running the real cache classes on ``meta`` tensors (shapes only, no memory), for Scout's attention shape.

    python benchmarks/bench_cache.py
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from modeling_llama4 import Llama4TextConfig

SCOUT_ATTENTION = dict(
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    attention_chunk_size=8192,
    no_rope_layer_interval=4,
    max_position_embeddings=10_485_760,
)


def cache_bytes(cache: DynamicCache, config: Llama4TextConfig, tokens: int, step: int = 8192) -> int:
    """Feed ``tokens`` keys/values (bf16, batch 1) through ``cache`` in prefill steps; return the bytes kept."""
    for start in range(0, tokens, step):
        length = min(step, tokens - start)
        kv = torch.empty(1, config.num_key_value_heads, length, config.head_dim, dtype=torch.bfloat16, device="meta")
        for layer_idx in range(config.num_hidden_layers):
            cache.update(kv, kv, layer_idx)
    return sum(
        tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in (layer.keys, layer.values)
    )


def main() -> None:
    config = Llama4TextConfig(**SCOUT_ATTENTION)
    print("Scout attention shape: 48 layers (12 NoPE), 8 kv heads x 128, chunk 8192, bf16, batch 1")
    for tokens in (32 * 1024, 128 * 1024):
        ours = cache_bytes(DynamicCache(config=config), config, tokens)
        uncapped = cache_bytes(DynamicCache(), config, tokens)
        print(
            f"{tokens // 1024:>4}K tokens: ours {ours / 2**30:6.2f} GiB, uncapped DynamicCache "
            f"{uncapped / 2**30:6.2f} GiB -> ours/uncapped = {ours / uncapped:.3f}"
        )


if __name__ == "__main__":
    main()
