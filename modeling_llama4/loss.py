"""The causal-LM loss straight from the last hidden states, a chunk of tokens at a time (fused linear cross-entropy).

The plain path materialises the logits ``[T, V]`` in the model's dtype, their float32 copy, the saved log-softmax
and, in backward, two more float32 ``[T, V]`` gradients: at Llama 4's 202,048-token vocabulary its peak is ~2.5 GB
per 1,000 tokens, more than the rest of a LoRA step. Here each chunk of tokens gets its logits, its share of the loss
and, when a gradient is needed, its gradients for the hidden states and the head weight right away; only those
gradients are kept for backward. Same loss as transformers' ``ForCausalLMLoss`` (shifted labels, ``ignore_index``,
``num_items_in_batch``, ``shift_labels``), the same float32 cross-entropy on logits rounded to the model's dtype,
and the same gradients up to float summation order; no logits are returned (as Liger's ``skip_logits``).

Shape names: T tokens, D hidden size, V vocabulary size, C tokens per chunk.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss_from_hidden", "fuses_with"]

# Float32 logits per chunk: 16 MiB (131 tokens of a 32K vocabulary, 20 of Llama 4's 202K).
CHUNK_LOGITS = 2**22


class _LinearCrossEntropy(torch.autograd.Function):
    """``Σ_t CE(h_t Wᵀ, y_t) / normalizer`` with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        normalizer: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
    ) -> torch.Tensor:
        """``hidden [T, D]``, ``weight [V, D]``, ``targets [T]`` (``ignore_index`` for none) → the scalar loss."""
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            kept = chunk_targets != ignore_index  # [C]
            safe_targets = chunk_targets.where(kept, 0).unsqueeze(1)  # [C, 1]
            logits = F.linear(rows, weight).float()  # [C, V], rounded to the model's dtype as the plain head's are
            log_normalizer = logits.logsumexp(dim=-1, keepdim=True)  # [C, 1]
            target_logits = logits.gather(1, safe_targets)  # [C, 1]
            loss += (log_normalizer - target_logits)[kept].sum()
            if not (need_hidden or need_weight):
                continue
            grad_logits = logits.sub_(log_normalizer).exp_()  # d CE / d logits = softmax - one_hot(target) ...
            grad_logits.scatter_add_(1, safe_targets, torch.full_like(target_logits, -1.0))
            grad_logits = grad_logits.mul_((kept / normalizer).unsqueeze(1)).to(hidden.dtype)  # ... 0 where ignored
            if need_hidden:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight  # [C, D]
            if need_weight:
                grad_weight += (grad_logits.T @ rows).float()  # [V, D]
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / normalizer

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fuses_with(lm_head: torch.nn.Module) -> bool:
    """Whether the loss can read ``lm_head.weight`` directly: a plain bias-free ``nn.Linear`` with a plain weight and
    no hooks (not a PEFT-wrapped, tensor-parallel or offloaded head)."""
    return (
        type(lm_head) is torch.nn.Linear
        and lm_head.bias is None
        and type(lm_head.weight.data) is torch.Tensor  # not a DTensor shard
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks or hasattr(lm_head, "_hf_hook"))
    )


def causal_lm_loss_from_hidden(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(hidden_states @ weightᵀ, labels, ...)`` without the logits.

    ``hidden_states [..., D]`` and ``labels [...]`` (shifted here) or ``shift_labels [...]`` (already shifted);
    ``weight [V, D]`` is the LM head's. The mean over the non-ignored tokens, or the sum divided by
    ``num_items_in_batch`` when given. ``chunk_size``: tokens per chunk (default: ``CHUNK_LOGITS // V``).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("The chunked causal-LM loss needs `labels` or `shift_labels`; got neither.")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, D]
    targets = shift_labels.reshape(-1).to(hidden.device)  # [T]
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels hold {targets.shape[0]} tokens but the hidden states {hidden.shape[0]}")
    if num_items_in_batch is None:
        normalizer = (targets != ignore_index).sum().float()  # 0 gives NaN, as the plain mean does
    else:
        normalizer = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    chunk_size = chunk_size or max(1, CHUNK_LOGITS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, normalizer, ignore_index, chunk_size)
