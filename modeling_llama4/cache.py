"""KV cache of Llama 4: global (NoPE) layers keep every token, chunked (RoPE) layers only the chunk in progress.

``Llama4Cache`` is what ``generate`` and the model create by default. Any other transformers cache a caller passes
(``DynamicCache``, ``StaticCache``, ``cache_implementation="static"``, quantized or offloaded dynamic caches) is
checked by :func:`check_cache` against the model's layer types: a layer that would drop keys a query still sees is
refused, never silently mis-attended. Static layers return their whole preallocated buffer (empty slots
included), so the model attends over them through transformers' masks (:func:`returns_only_cached_keys`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .configuration_llama4 import Llama4TextConfig


class Llama4ChunkLayer(DynamicSlidingWindowLayer):
    """Cache of one chunked-attention layer: the keys/values since the last chunk boundary, at most ``C - 1``.

    A token at position ``p`` attends to ``[floor(p / C)·C, p]``, so once position ``p`` is stored the next token
    needs only the ``(p + 1) mod C`` tokens of the chunk in progress (``C / 2`` on average; transformers'
    sliding-window layer keeps ``C - 1`` always). Rows of a left-padded batch whose chunks end at different
    indices keep ``C - 1`` tokens, as the sliding-window layer does: that holds every row's chunk in progress, and
    it is what transformers' chunked masks (the masked path such batches take) expect. Without ``position_ids``
    (a caller that does not pass them) the layer behaves as the sliding-window layer.
    """

    is_croppable = False  # dropping a chunk cannot be undone: no rollback for assisted decoding

    def __init__(self, chunk_size: int):
        super().__init__(sliding_window=chunk_size)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H_kv, S, d]`` states; return the kept past plus the new states, keep the chunk in progress."""
        if position_ids is None:
            return super().update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        rows_in_progress = set(((position_ids[:, -1] + 1) % self.sliding_window).tolist())
        in_progress = rows_in_progress.pop() if len(rows_in_progress) == 1 else self.sliding_window - 1
        drop = max(keys.shape[-2] - in_progress, 0)
        self.keys, self.values = keys[:, :, drop:].clone(), values[:, :, drop:].clone()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys the next ``update`` returns, for the masked path."""
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept


class Llama4Cache(DynamicCache):
    """The cache ``Llama4TextModel`` and ``generate`` create: one ``DynamicLayer`` per NoPE layer (every token),
    one ``Llama4ChunkLayer`` per chunked RoPE layer (the chunk in progress). ``nbytes`` reports its size.
    """

    def __init__(self, config: Llama4TextConfig):
        config = config.get_text_config(decoder=True)
        layers = [
            Llama4ChunkLayer(config.attention_chunk_size) if layer_type == "chunked_attention" else DynamicLayer()
            for layer_type in config.layer_types
        ]
        Cache.__init__(self, layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values of every layer."""
        return sum(
            tensor.numel() * tensor.element_size()
            for layer in self.layers
            if layer.is_initialized
            for tensor in (layer.keys, layer.values)
        )


def _window(layer: DynamicLayer | StaticLayer) -> int | None:
    """How many keys (the new one included) a sliding layer still returns once full; None: it keeps every key.

    A static sliding layer asked for no more than its window (``is_croppable``) holds the cache's whole capacity:
    the full-attention layers run out of room before it would drop a key, so it keeps every key too."""
    if isinstance(layer, StaticSlidingWindowLayer):
        return None if layer.is_croppable else layer.max_cache_len
    if isinstance(layer, DynamicSlidingWindowLayer) and not isinstance(layer, Llama4ChunkLayer):
        return layer.sliding_window
    return None


def check_cache(config: Llama4TextConfig, cache: Cache) -> None:
    """Refuse a cache whose layers cannot serve the model's: a layer type this attention does not write (linear
    attention, shared-KV dummies), a sliding window on a global (NoPE) layer, or a window shorter than
    ``attention_chunk_size`` on a chunked layer (each drops keys a query still attends to)."""
    for layer_idx, (layer, layer_type) in enumerate(zip(cache.layers, config.layer_types)):
        if not isinstance(layer, (DynamicLayer, StaticLayer)):
            problem = f"its {type(layer).__name__} holds no keys and values this attention can write"
        elif (window := _window(layer)) is None:
            continue
        elif layer_type != "chunked_attention":
            problem = f"its {type(layer).__name__} keeps only the last {window} keys of a global-attention layer"
        elif window < config.attention_chunk_size:
            problem = (
                f"its {type(layer).__name__} keeps the last {window} keys, fewer than the attention_chunk_size="
                f"{config.attention_chunk_size} keys a chunked query may see"
            )
        else:
            continue
        raise ValueError(
            f"{type(cache).__name__} cannot serve layer {layer_idx} ({layer_type}) of this Llama 4 model: {problem}. "
            "Pass no cache (the model's Llama4Cache), DynamicCache(), DynamicCache(config=config) or "
            "StaticCache(config=config, max_cache_len=...), or generate(..., cache_implementation='static')."
        )


def returns_only_cached_keys(cache: Cache | None) -> bool:
    """Whether every layer's ``update`` returns exactly the keys cached so far plus the new ones, in position order
    (dynamic layers), so that attention needs no mask; static layers return their preallocated buffer."""
    return cache is None or all(isinstance(layer, DynamicLayer) for layer in cache.layers)
