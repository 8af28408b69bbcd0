"""Llama 4 feed-forward blocks: the dense SwiGLU MLP and the sparse mixture of experts.

The MoE layer is split the way torchtitan splits it: a router that picks each token's experts, experts that
compute only the tokens routed to them (grouped by expert), and the layer that gathers, scales, computes and
scatters back onto the shared expert's output. Neither Meta's reference nor transformers' built-in does this:
both run every token through every expert and zero the unchosen ones (E times the expert FLOPs).

Shape names: T tokens, D hidden size, E experts, k experts per token, I expert hidden size, N = T·k routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_llama4 import Llama4TextConfig
from .parallel import expert_parallel_moe


class Llama4TextMLP(nn.Module):
    """SwiGLU feed-forward ``down(act(gate(x)) * up(x))``: dense layers and the MoE's shared expert."""

    def __init__(self, config: Llama4TextConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Llama4Router(nn.Linear):
    """Sigmoid top-k router: ``logits = x W^T``; each token goes to its k highest-logit experts.

    Returns ``(scores [T, k], experts [T, k], logits [T, E])`` where ``scores = sigmoid(logit)`` of each chosen
    expert. The logits are returned for ``output_router_logits`` and the load-balancing loss.
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = super().forward(x)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        return scores, experts, logits


class Llama4TextExperts(nn.Module):
    """The routed experts, fused: ``gate_up_proj [E, D, 2I]`` (gate then up) and ``down_proj [E, I, D]``.

    ``forward`` takes rows already sorted by expert with ``tokens_per_expert [E]`` counts, and runs each expert's
    SwiGLU on its own rows only: one grouped matmul per projection where torch supports it, else a loop.
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_size, self.hidden_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` grouped by expert → ``[N, D]``."""
        if _grouped_mm_supported(x, self.gate_up_proj, self.down_proj):
            return self.forward_grouped(x, tokens_per_expert)
        return self.forward_loop(x, tokens_per_expert)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's ``(gate_up [D, 2I], down [I, D])`` in ``dtype`` (as ``Llama4Int4TextExperts`` provides)."""
        return self.gate_up_proj[expert].to(dtype), self.down_proj[expert].to(dtype)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """One ``grouped_mm`` per projection over all experts; no host synchronisation."""
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        hidden = self.swiglu(F.grouped_mm(x, self.gate_up_proj, offs=offsets))  # [N, I]
        return F.grouped_mm(hidden, self.down_proj, offs=offsets)  # [N, D]

    def forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """The readable reference: one matmul pair per expert that received tokens."""
        out = x.new_empty(x.shape)
        start = 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count:
                rows = slice(start, start + count)
                out[rows] = self.swiglu(x[rows] @ self.gate_up_proj[expert]) @ self.down_proj[expert]
                start += count
        return out


def _grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``grouped_mm`` needs 16-byte aligned strides; on CPU (torch 2.14) it has no backward."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        return False
    alignment = 16 // x.element_size()
    return all(dim % alignment == 0 for w in weights for dim in w.shape[1:])


class Llama4TextMoe(nn.Module):
    """Sparse MoE: ``out = shared_expert(x) + Σ_chosen e  expert_e(x · score_e)``.

    The routed input is scaled by the router score *before* the expert, as in Meta's reference.
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = Llama4Router(config)
        self.experts = Llama4TextExperts(config)
        self.shared_expert = Llama4TextMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, D]
        scores, experts, _ = self.router(x)  # [T, k], [T, k]
        if getattr(self.experts, "_is_expert_parallel", False):  # DistributedConfig(ep_size > 1)
            return expert_parallel_moe(self, x, scores, experts).view(hidden_states.shape)
        routed_in, token_index, tokens_per_expert = self.dispatch(x, scores, experts)
        routed_out = self.experts(routed_in, tokens_per_expert)  # [N, D]
        out = self.shared_expert(x)
        out = out.index_add(0, token_index, routed_out.to(out.dtype))
        return out.view(hidden_states.shape)

    def dispatch(
        self, x: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort the T·k (token, expert) pairs by expert.

        Returns the routed rows ``x[token] · score [N, D]``, the token each row came from ``[N]`` and the number
        of rows per expert ``[E]``.
        """
        flat_experts = experts.reshape(-1)  # [N]
        order = torch.argsort(flat_experts, stable=True)
        token_index = order // self.top_k
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)
        routed_in = x[token_index] * scores.reshape(-1, 1)[order]
        return routed_in, token_index, tokens_per_expert
