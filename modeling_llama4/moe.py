"""Llama 4 feed-forward blocks: the dense SwiGLU MLP and the sparse mixture of experts.

The MoE layer is split the way torchtitan splits it: a router that picks each token's experts, experts that
compute only the tokens routed to them (grouped by expert), and the layer that gathers, scales, computes and
scatters back onto the shared expert's output. Neither Meta's reference nor transformers' built-in does this:
both run every token through every expert and zero the unchosen ones (E times the expert FLOPs).

Shape names: T tokens, D hidden size, E experts, k experts per token, I expert hidden size, N = T·k routed rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .configuration_llama4 import Llama4TextConfig


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


# ``lora(x [n, in], expert, projection) -> [n, out]``: a per-expert update added to a projection's output.
ExpertUpdate = Callable[[torch.Tensor, int, str], torch.Tensor]


class Llama4RoutedExperts(nn.Module):
    """The sparse expert compute every expert format shares: rows arrive sorted by expert with ``tokens_per_expert
    [E]`` counts and each expert runs its SwiGLU ``down(act(gate(x)) * up(x))`` on its own rows only.

    A format (bf16 here, int4 and fp8 in ``quantized_experts``, oneDNN-packed in ``packed_experts``) provides one
    hook, :meth:`project`: ``x @ W`` for one expert's ``gate_up_proj [D, 2I]`` or ``down_proj [I, D]``.
    ``forward_loop`` takes an optional ``lora(x, e, projection)`` that adds a per-expert update to the ``"gate"``,
    ``"up"`` and ``"down"`` outputs (``lora_experts``).
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]

    def project(self, x: torch.Tensor, expert: int, projection: str) -> torch.Tensor:
        """``x [n, K] @ W [K, N]`` for ``projection`` (``"gate_up_proj"`` or ``"down_proj"``) of ``expert``."""
        raise NotImplementedError

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's ``(gate_up [D, 2I], down [I, D])`` in ``dtype`` (dequantized for a quantized format)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` grouped by expert → ``[N, D]``."""
        return self.forward_loop(x, tokens_per_expert)

    def forward_loop(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, lora: ExpertUpdate | None = None
    ) -> torch.Tensor:
        """One SwiGLU per expert that received rows; idle experts are not touched (at decode, most of them)."""
        outputs, start = [], 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count:
                outputs.append(self.expert_forward(x[start : start + count], expert, lora))
                start += count
        return torch.cat(outputs) if outputs else x.new_empty(0, self.hidden_size)

    def expert_forward(self, x: torch.Tensor, expert: int, lora: ExpertUpdate | None = None) -> torch.Tensor:
        """Expert ``expert`` on its rows ``x [n, D]`` → ``[n, D]``, plus ``lora``'s updates when given."""
        gate, up = self.project(x, expert, "gate_up_proj").chunk(2, dim=-1)  # [n, I] each
        if lora is not None:
            gate, up = gate + lora(x, expert, "gate"), up + lora(x, expert, "up")
        hidden = self.act_fn(gate) * up  # [n, I]
        out = self.project(hidden, expert, "down_proj")
        return out if lora is None else out + lora(hidden, expert, "down")


class Llama4TextExperts(Llama4RoutedExperts):
    """The routed experts in the model's dtype, fused: ``gate_up_proj [E, D, 2I]`` (gate then up), ``down_proj [E, I,
    D]``. One grouped matmul per projection on a GPU that supports it, else the per-expert loop (on CPU too: torch's
    CPU ``grouped_mm`` runs one matmul per expert, idle ones included: at decode with 128 experts, twice the loop's
    time)."""

    # The layout transformers' experts kernels (``transformers.integrations.moe``) read: fused [gate; up], [E, in, out].
    has_gate, has_bias, has_post_expert_norm, is_concatenated, is_transposed = True, False, False, True, True
    _is_expert_parallel = False  # set on the instance by DistributedConfig(ep_size > 1)

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_size, self.hidden_size))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` of the fused ``[N, 2I]`` projection (called by transformers' experts kernels)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` grouped by expert → ``[N, D]``."""
        if _grouped_mm_supported(x, self.gate_up_proj, self.down_proj):
            return self.forward_grouped(x, tokens_per_expert)
        return self.forward_loop(x.to(self.gate_up_proj.dtype), tokens_per_expert)

    def project(self, x: torch.Tensor, expert: int, projection: str) -> torch.Tensor:
        return x @ getattr(self, projection)[expert]

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[expert].to(dtype), self.down_proj[expert].to(dtype)

    def forward_gathered(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Row ``n`` of ``x [N, D]`` (any order) through expert ``expert_ids[n]``, by gathering each row's expert
        weights (gpt-fast's Mixtral decode): static shapes and no host synchronisation, for a compiled decode step.
        It reads N experts' weights, no more than the loop reads when ``N <= E``."""
        gate_up = self.gate_up_proj[expert_ids]  # [N, D, 2I]
        hidden = self._apply_gate(torch.bmm(x.to(gate_up.dtype)[:, None], gate_up)[:, 0])  # [N, I]
        return torch.bmm(hidden[:, None], self.down_proj[expert_ids])[:, 0]  # [N, D]

    def forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """One ``grouped_mm`` per projection over all experts; no host synchronisation."""
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        x = x.to(self.gate_up_proj.dtype)
        gate, up = F.grouped_mm(x, self.gate_up_proj, offs=offsets).chunk(2, dim=-1)  # [N, I] each
        return F.grouped_mm(self.act_fn(gate) * up, self.down_proj, offs=offsets)  # [N, D]


# torch's grouped_mm on CUDA: bf16 on compute capability >= 9.0; 16-byte aligned base pointers and strides.
_GROUPED_MM_MIN_CUDA_CAPABILITY = (9, 0)
_ALIGNMENT_BYTES = 16


def _grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs a CUDA kernel on ``x`` cast to the weights' dtype, so that other cases take the
    loop instead of raising: same device, bf16 on a CUDA device of compute capability >= 9.0, and every tensor
    16-byte aligned (pointer, sizes and strides). Never on CPU, where the loop is as fast at prefill and faster at
    decode (it skips idle experts)."""
    dtype, device = weights[0].dtype, weights[0].device
    if not hasattr(F, "grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if x.device != device or any(w.dtype != dtype or w.device != device for w in weights):
        return False
    if torch.cuda.get_device_capability(device) < _GROUPED_MM_MIN_CUDA_CAPABILITY:
        return False
    return _aligned(x, dtype) and all(_aligned(w, dtype) for w in weights)


def _aligned(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """``t`` (as ``dtype``) has a 16-byte aligned data pointer, and its sizes after the first (rows of ``x [N, D]``,
    experts of ``w [E, K, N]``) and non-unit strides are whole multiples of 16 bytes."""
    elements = _ALIGNMENT_BYTES // dtype.itemsize
    sizes = t.shape[1:]
    strides = [stride for stride in t.stride() if stride != 1]
    pointer_ok = t.dtype != dtype or t.data_ptr() % _ALIGNMENT_BYTES == 0  # a cast copy is freshly aligned
    return pointer_ok and all(n % elements == 0 for n in (*sizes, *strides))


class Llama4TextMoe(nn.Module):
    """Sparse MoE: ``out = shared_expert(x) + Σ_chosen e  expert_e(x · score_e)``.

    The routed input is scaled by the router score *before* the expert, as in Meta's reference. Parallelism is applied
    from outside (``parallel.py``), as torchtitan's ``parallelize`` does: tensor parallel replaces this forward,
    expert parallel turns the experts' call into transformers' EP dispatch.
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = Llama4Router(config)
        self.experts = Llama4TextExperts(config)
        self.shared_expert = Llama4TextMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, D]
        scores, experts, _ = self.router(x)  # [T, k], [T, k]
        routed_out, token_index = self.routed_experts(x, scores, experts)  # [N, D], [N]
        out = self.shared_expert(x)
        out = out.index_add(0, token_index, routed_out.to(out.dtype))
        return out.view(hidden_states.shape)

    def routed_experts(
        self, x: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The T·k expert outputs ``[N, D]`` of tokens ``x [T, D]`` and the token of each row ``[N]``.

        Dense experts take transformers' experts kernel named by ``experts_implementation`` (``batched_mm``,
        ``grouped_mm``, ...) when one is set. Inside ``torch.compile`` they take a static-shape route: gathered
        weights for a few rows (a decode step), transformers' ``grouped_mm`` for more. Otherwise, and for every
        other expert format, the rows are sorted by expert and each expert computes its own rows.
        """
        kernel = self.experts_kernel(x.shape[0] * self.top_k)
        if kernel is None:
            routed_in, token_index, tokens_per_expert = self.dispatch(x, scores, experts)
            return self.experts(routed_in, tokens_per_expert), token_index
        # The kernels scale each expert's output by a weight; Llama 4 scales its input: pre-scaled rows, unit weights.
        routed_in = (x[:, None] * scores[..., None]).reshape(-1, self.hidden_size)  # [N, D], token-major
        expert_ids = experts.reshape(-1, 1)  # [N, 1]
        token_index = torch.arange(routed_in.shape[0], device=x.device) // self.top_k
        if kernel == "gathered":
            return self.experts.forward_gathered(routed_in, expert_ids[:, 0]), token_index
        unit_weights = torch.ones_like(expert_ids, dtype=routed_in.dtype)
        return ALL_EXPERTS_FUNCTIONS[kernel](self.experts, routed_in, expert_ids, unit_weights), token_index

    def experts_kernel(self, rows: int) -> str | None:
        """The routed-expert route for ``rows`` (token, expert) pairs: a name of transformers' ``ExpertsInterface``,
        ``"gathered"``, or None for this port's sorted per-expert compute (the default, on CPU the fastest)."""
        if type(self.experts) is not Llama4TextExperts:  # quantized, packed or LoRA-wrapped experts: their own loop
            return None
        requested = getattr(self.config, "_experts_implementation", None)
        if requested not in (None, "eager"):
            return requested
        if torch.compiler.is_compiling():
            return "gathered" if rows <= self.num_experts else "grouped_mm"
        return None

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
        # bincount, without its data-dependent output size
        tokens_per_expert = flat_experts.new_zeros(self.num_experts).index_add_(
            0, flat_experts, torch.ones_like(order)
        )
        routed_in = x[token_index] * scores.reshape(-1, 1)[order]
        return routed_in, token_index, tokens_per_expert
