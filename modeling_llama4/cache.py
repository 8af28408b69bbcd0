"""KV cache of Llama 4: global (NoPE) layers keep every token, chunked (RoPE) layers only the chunk in progress."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

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
