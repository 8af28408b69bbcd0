"""Continuous batching for Llama 4: transformers' paged cache serving the chunked-attention layers.

transformers' continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
--continuous-batching``) packs many requests into one ``[1, tokens]`` batch over a paged KV cache, whose allocators
know two layer types: ``full_attention`` and ``sliding_attention``. A chunked layer's query at position ``p`` sees
the keys ``[floor(p / C)·C, p]``, all among the last ``C`` positions, so a sliding window of ``C`` holds every key it
may see; the chunk boundary is then one more mask condition. Two pieces make that work:

- :class:`ContinuousBatchingView`: the model as the batching manager sees it. Its config names the chunked layers
  ``sliding_attention`` with ``sliding_window = attention_chunk_size``; the model's own config (what checkpoints
  save, what the built-in and vLLM read) is untouched, and nothing outside this model changes.
- :func:`paged_masks`: the manager's per-layer-type masks for one forward, the sliding one restricted to each query's
  chunk. Within a request the paged cache returns the keys in position order, ending at the request's last query.

Requests carry token ids only (transformers' ``RequestState`` has no pixel values): images go through ``generate``.
On a CPU, cache sizes the caller leaves unset get :func:`cpu_batching_config`'s.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, PretrainedConfig
from transformers.generation.continuous_batching import PagedAttentionCache

from .configuration_llama4 import Llama4TextConfig

# Our layer type → the paged cache's.
PAGED_LAYER_TYPES = {"chunked_attention": "sliding_attention", "full_attention": "full_attention"}


# On a CPU, transformers sizes the paged cache from free RAM (60% of it: gigabytes allocated and zeroed before the
# first step, and masks as wide); these bound it instead, unless the caller sets a size.
CPU_CACHE_TOKENS = 32 * 1024
CPU_BATCH_TOKENS = 512


def cpu_batching_config(config: ContinuousBatchingConfig | None) -> ContinuousBatchingConfig:
    """A copy of ``config`` (default: transformers' defaults) whose unset sizes are a paged cache of
    :data:`CPU_CACHE_TOKENS` tokens and batches of :data:`CPU_BATCH_TOKENS` tokens."""
    config = copy.copy(config) if config is not None else ContinuousBatchingConfig()
    if config.max_batch_tokens is None:
        config.max_batch_tokens = CPU_BATCH_TOKENS
    if config.num_blocks is None and config.max_memory_percent is None:
        config.num_blocks = -(-CPU_CACHE_TOKENS // config.page_size)
    return config


def is_paged(cache: Any) -> bool:
    """Whether ``cache`` is continuous batching's paged cache (it fills the attention kwargs with cache indices)."""
    return isinstance(cache, PagedAttentionCache)


def paged_config(config: PretrainedConfig) -> PretrainedConfig:
    """A shallow copy of ``config`` whose text config names chunked layers as sliding windows of one chunk."""
    text = copy.copy(config.get_text_config(decoder=True))
    text.layer_types = [PAGED_LAYER_TYPES[layer_type] for layer_type in text.layer_types]
    text.sliding_window = text.attention_chunk_size
    if config.get_text_config(decoder=True) is config:
        return text
    view = copy.copy(config)
    view.text_config = text
    return view


class ContinuousBatchingView:
    """The model as transformers' continuous batching manager sees it: the same module (every call and attribute
    goes to it), with :func:`paged_config` as its config, rebuilt on each read so it follows the model's
    attention implementation. The manager keeps its persistent state on the view, not on the model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def config(self) -> PretrainedConfig:
        return paged_config(self.model.config)

    def eval(self) -> ContinuousBatchingView:
        self.model.eval()
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)


def _chunk_start_mask(
    position_ids: torch.Tensor, cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, num_keys: int, chunk: int
) -> torch.Tensor:
    """``[Q, K]`` bool: True where key ``k`` lies before the chunk of query ``q``.

    Request ``r`` owns the key columns ``[cu_k[r], cu_k[r + 1])``, in position order, the last being its last
    query's position; so a column's position is that position minus its distance to the request's last column.
    """
    query_positions = position_ids[0]  # [Q]
    last_query = (cu_seq_lens_q[1:].long() - 1).clamp(0, query_positions.numel() - 1)  # [R]
    key_ends = cu_seq_lens_k[1:].long()  # [R]
    columns = torch.arange(num_keys, device=position_ids.device)  # [K]
    request = torch.searchsorted(key_ends, columns, right=True).clamp(max=key_ends.numel() - 1)  # [K]
    key_positions = query_positions[last_query][request] - (key_ends[request] - 1 - columns)  # [K]
    chunk_starts = query_positions - query_positions % chunk  # [Q]
    return key_positions[None, :] < chunk_starts[:, None]


def paged_masks(
    config: Llama4TextConfig, attention_mask: torch.Tensor | dict | None, position_ids: torch.Tensor, kwargs: dict
) -> dict[str, torch.Tensor]:
    """Our layer type → its additive mask ``[1, 1, Q, K]`` for a continuous-batching forward.

    ``attention_mask`` is the manager's: a dict by paged layer type, or one tensor when the model has one type.
    """
    if attention_mask is None:
        raise ValueError(
            "Continuous batching gave no attention mask: this Llama 4 needs attn_implementation 'sdpa' or "
            "'paged|eager' (it has no flash-attention path)."
        )
    masks = {}
    for layer_type in set(config.layer_types):
        paged_type = PAGED_LAYER_TYPES[layer_type]
        mask = attention_mask[paged_type] if isinstance(attention_mask, dict) else attention_mask
        if layer_type == "chunked_attention":
            cu_seq_lens_k = kwargs["cu_seq_lens_k"]
            cu_seq_lens_k = cu_seq_lens_k[paged_type] if isinstance(cu_seq_lens_k, dict) else cu_seq_lens_k
            before_chunk = _chunk_start_mask(
                position_ids, kwargs["cu_seq_lens_q"], cu_seq_lens_k, mask.shape[-1], config.attention_chunk_size
            )
            mask = mask.masked_fill(before_chunk, torch.finfo(mask.dtype).min)
        masks[layer_type] = mask
    return masks
