"""Attention kernels of Llama 4: the mask-free iRoPE paths and the eager fallback shared with the vision tower.

Long prompts must not build anything of size tokens × tokens. Neither layer type needs a mask tensor:

- chunked (RoPE) layers: a query at position ``p`` sees keys ``[floor(p / C)·C, p]``. Split the queries at chunk
  boundaries; each piece is causal attention over the keys of its own chunk.
- global (NoPE) layers: a block of queries at the end of the keys sees every earlier key: lower-right causal.

Both reduce to "causal attention of queries placed at the end of their keys" (``causal_attention_at_end``). With
as many queries as keys it is ``is_causal`` sdpa, which runs the fused flash kernels on CPU and CUDA. With fewer
(a prefill block or a decode step after a cached prefix) it is lower-right causal: on CUDA,
``torch.nn.attention.bias.causal_lower_right`` dispatches to the flash / memory-efficient kernels, which implement
it natively; on CPU that bias falls back to materialising a ``[queries, keys]`` mask, so there we split the keys
into the cached prefix (visible to every query: no mask) and the block itself (``is_causal``), run the CPU flash
kernel on each (it also returns the log-sum-exp of each row) and merge the two softmaxes exactly by their
log-sum-exps. That kernel gives no gradient through its log-sum-exp, so under autograd the CPU also takes
``causal_lower_right`` (a ``[queries, keys]`` mask; training runs without a cache, where queries equal keys).
Every path is exact softmax attention.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H_kv, S, d]`` → ``[B, H_kv * n_rep, S, d]``, each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    batch, kv_heads, seq, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim).reshape(batch, kv_heads * n_rep, seq, head_dim)


def _merged_prefix_and_block_attention_cpu(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, dropout: float
) -> torch.Tensor:
    """Lower-right causal attention on CPU as (prefix keys, no mask) ⊕ (block keys, ``is_causal``).

    With ``lse_p``, ``lse_b`` the log-sum-exps of the two parts, the softmax over all keys weighs the prefix
    output by ``exp(lse_p) / (exp(lse_p) + exp(lse_b)) = sigmoid(lse_p - lse_b)``.
    """
    block = query.shape[-2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns (output, logsumexp), GQA-aware
    prefix_out, prefix_lse = flash(query, key[:, :, :-block], value[:, :, :-block], dropout, scale=scaling)
    block_out, block_lse = flash(query, key[:, :, -block:], value[:, :, -block:], dropout, True, scale=scaling)
    prefix_weight = torch.sigmoid(prefix_lse.float() - block_lse.float())[..., None]  # [B, H, S, 1]
    block_out = block_out.float()
    return (block_out + prefix_weight * (prefix_out.float() - block_out)).to(query.dtype)


def causal_attention_at_end(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention of ``query [B, H, S, d]`` placed at the end of ``key/value [B, H_kv, S_kv, d]``.

    Query ``i`` sees keys ``[0, S_kv - S + i]`` (lower-right causal). Returns ``[B, H, S, d]``; no mask is built.
    """
    queries, keys = query.shape[-2], key.shape[-2]
    sdpa = nn.functional.scaled_dot_product_attention
    if queries == keys or queries == 1:  # upper-left and lower-right causal coincide; one query sees every key
        return sdpa(query, key, value, dropout_p=dropout, is_causal=queries > 1, scale=scaling, enable_gqa=True)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and not differentiable:  # the kernel's log-sum-exp output has no gradient
        return _merged_prefix_and_block_attention_cpu(query, key, value, scaling, dropout)
    groups = query.shape[1] // key.shape[1]
    return sdpa(
        query,
        repeat_kv(key, groups),
        repeat_kv(value, groups),
        attn_mask=causal_lower_right(queries, keys),
        dropout_p=dropout,
        scale=scaling,
    )


def chunked_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    query_start: int,
    chunk_size: int,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Chunked causal attention: the query at position ``p`` sees the keys at ``[floor(p / C)·C, p]``.

    ``query [B, H, S, d]`` holds positions ``[query_start, query_start + S)``; ``key/value [B, H_kv, S_kv, d]``
    the most recent ``S_kv`` positions, ending with the queries' own (the cache must hold at least the chunk in
    progress). The queries are split at chunk boundaries, each piece attending within its chunk. → ``[B, H, S, d]``.
    """
    queries, keys = query.shape[-2], key.shape[-2]
    key_start = query_start + queries - keys  # position of key 0
    outputs = []
    piece_start = query_start
    while piece_start < query_start + queries:
        chunk_start = piece_start - piece_start % chunk_size
        piece_end = min(chunk_start + chunk_size, query_start + queries)
        visible = slice(max(chunk_start, key_start) - key_start, piece_end - key_start)
        piece = query[:, :, piece_start - query_start : piece_end - query_start]
        outputs.append(causal_attention_at_end(piece, key[:, :, visible], value[:, :, visible], scaling, dropout))
        piece_start = piece_end
    return torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (softmax in fp32); ``query [B, H, S, d]``, ``key/value [B, H_kv, S_kv, d]``.

    Returns the output ``[B, S, H, d]`` and the weights ``[B, H, S, S_kv]``. GQA groups come from
    ``module.num_key_value_groups`` (1 when absent).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
