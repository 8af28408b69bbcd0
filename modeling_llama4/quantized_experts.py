"""Llama 4 layers with frozen quantized weights: int4 (``int4``) and FP8 (``fp8``) routed experts and linear layers.

The experts subclass :class:`~modeling_llama4.moe.Llama4RoutedExperts`, so they share its sparse loop (and the LoRA
hook of ``lora_experts``) and only say how to multiply by one expert's weight: int4 on torch's packed int4 CPU kernel
(repacked at load; the checkpoint format is unchanged), otherwise by dequantizing that one expert's weight; FP8 by
dequantizing that one expert's weight. Idle experts stay packed.

Training on top (QLoRA): :func:`frozen_matmul` keeps only the packed tensors for backward and dequantizes them again
there, so autograd never holds a dequantized expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .configuration_llama4 import Llama4TextConfig
from .fp8 import FP8_DTYPE, FP8_SCALE_DTYPE, dequantize_fp8, fp8_matmul
from .int4 import (
    SCALE_DTYPE,
    check_group_size,
    dequantize_int4,
    from_kernel_layout,
    int4_matmul,
    kernel_supports,
    quantize_experts,
    to_kernel_layout,
)
from .moe import Llama4RoutedExperts, Llama4TextExperts

PROJECTIONS = ("gate_up_proj", "down_proj")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``x @ ŵ`` whose backward re-dequantizes ``ŵ`` from the saved packed tensors (the weight gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matmul: Callable, dequantize: Callable, *packed: torch.Tensor):
        ctx.dequantize = dequantize
        ctx.save_for_backward(*packed)
        return matmul(x, *packed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        weight = ctx.dequantize(*ctx.saved_tensors, dtype=grad.dtype)  # [K, N], freed on return
        return grad @ weight.T, None, None, *(None for _ in ctx.saved_tensors)


def frozen_matmul(x: torch.Tensor, matmul: Callable, dequantize: Callable, *packed: torch.Tensor) -> torch.Tensor:
    """``matmul(x, *packed)`` = ``x [n, K] @ ŵ [K, N]``; where ``x`` needs a gradient, autograd saves ``packed`` (not
    ``ŵ``) and backward computes ``grad @ dequantize(*packed, dtype=...)ᵀ``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantizedMatmul.apply(x, matmul, dequantize, *packed)
    return matmul(x, *packed)


# --- int4 ---------------------------------------------------------------------------------------------------------


class _Int4Weights:
    """Mixin for a module with int4 ``({prefix}qweight, {prefix}scales)`` buffer pairs, kept in the layout of torch's
    CPU kernel where that takes them. ``state_dict`` always gives (and ``load_state_dict`` takes) the checkpoint
    layout of ``modeling_llama4.int4``."""

    def _init_int4(self, group_size: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """``shapes``: buffer-name prefix → the dense weight's shape ``[..., K, N]``."""
        self.group_size = group_size
        self.kernel_layout = False
        for prefix, (*batch, k, n) in shapes.items():
            self.register_buffer(f"{prefix}qweight", torch.empty(*batch, k // 2, n, dtype=torch.uint8))
            self.register_buffer(f"{prefix}scales", torch.empty(*batch, k // group_size, n, dtype=SCALE_DTYPE))
        self._int4_prefixes = tuple(shapes)
        self.register_state_dict_post_hook(_int4_checkpoint_layout)
        self.register_load_state_dict_pre_hook(_int4_module_layout)

    def use_kernel_layout(self) -> None:
        """Repack the qweights for the CPU kernel when every one of them suits it (called once loaded)."""
        qweights = [getattr(self, f"{prefix}qweight") for prefix in self._int4_prefixes]
        if self.kernel_layout or not all(
            kernel_supports(2 * q.shape[-2], q.shape[-1], self.group_size) for q in qweights
        ):
            return
        for prefix, qweight in zip(self._int4_prefixes, qweights):
            setattr(self, f"{prefix}qweight", to_kernel_layout(qweight))
        self.kernel_layout = True

    def int4_matmul(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x [n, K] @ ŵ [K, N]``: the CPU kernel where the weight is in its layout, else dequantize and multiply."""
        if self.kernel_layout and x.device.type == "cpu":
            return int4_matmul(x, qweight, scales, self.group_size)
        return x @ self.dequantize(qweight, scales, dtype=x.dtype)

    def dequantize(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One weight's ``ŵ [K, N]`` in ``dtype``."""
        return dequantize_int4(from_kernel_layout(qweight) if self.kernel_layout else qweight, scales, dtype)

    def project_int4(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return frozen_matmul(x, self.int4_matmul, self.dequantize, qweight, scales)


def _int4_checkpoint_layout(module: _Int4Weights, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.kernel_layout:
        for name in module._int4_prefixes:
            state_dict[f"{prefix}{name}qweight"] = from_kernel_layout(state_dict[f"{prefix}{name}qweight"])


def _int4_module_layout(module: _Int4Weights, state_dict: dict, prefix: str, *args: Any) -> None:
    if module.kernel_layout:
        for name in module._int4_prefixes:
            key = f"{prefix}{name}qweight"
            if key in state_dict:
                state_dict[key] = to_kernel_layout(state_dict[key])


class Llama4Int4TextExperts(_Int4Weights, Llama4RoutedExperts):
    """The routed experts with int4 weights (``modeling_llama4.int4``). Checkpoint buffers: ``gate_up_proj_qweight
    [E, D/2, 2I]``, ``gate_up_proj_scales [E, D/G, 2I]``, ``down_proj_qweight [E, I/2, D]``, ``down_proj_scales
    [E, I/G, D]``."""

    def __init__(self, config: Llama4TextConfig, group_size: int):
        check_group_size(group_size, config.hidden_size, "hidden_size")
        check_group_size(group_size, config.intermediate_size, "intermediate_size")
        Llama4RoutedExperts.__init__(self, config)
        self.config = config
        experts, hidden, inner = self.num_experts, self.hidden_size, self.intermediate_size
        self._init_int4(
            group_size, {"gate_up_proj_": (experts, hidden, 2 * inner), "down_proj_": (experts, inner, hidden)}
        )

    @classmethod
    def from_dense(
        cls, experts: Llama4TextExperts, config: Llama4TextConfig, group_size: int
    ) -> Llama4Int4TextExperts:
        """Quantize a dense ``Llama4TextExperts`` (repacked for the CPU kernel where it applies)."""
        module = cls(config, group_size).to(experts.gate_up_proj.device)
        module.load_state_dict(quantize_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(), group_size))
        module.use_kernel_layout()
        return module

    @property
    def qweight(self) -> torch.Tensor:
        """``gate_up_proj_qweight``, under the name where PEFT looks for a quantized layer's device."""
        return self.gate_up_proj_qweight

    def project(self, x: torch.Tensor, expert: int, projection: str) -> torch.Tensor:
        qweight, scales = getattr(self, f"{projection}_qweight"), getattr(self, f"{projection}_scales")
        return self.project_int4(x, qweight[expert], scales[expert])

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = (
            self.dequantize(getattr(self, f"{p}_qweight")[expert], getattr(self, f"{p}_scales")[expert], dtype)
            for p in PROJECTIONS
        )
        return gate_up, down

    def dequantized(self, dtype: torch.dtype) -> Llama4TextExperts:
        return _dense_experts(self, dtype)

    def extra_repr(self) -> str:
        sizes = f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.intermediate_size}"
        return f"{sizes}, int4 g={self.group_size}{', cpu kernel layout' if self.kernel_layout else ''}"


class Llama4Int4Linear(_Int4Weights, nn.Module):
    """A bias-free linear layer with int4 weights (the shared expert under ``quantize_shared_expert``). Checkpoint
    buffers ``qweight [in/2, out]`` and ``scales [in/G, out]`` hold ``weightᵀ`` in the int4 format."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        check_group_size(group_size, in_features, "in_features")
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_int4(group_size, {"": (in_features, out_features)})

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        weight = self.dequantize(self.qweight, self.scales, dtype).T  # [out, in]
        return _dense_linear(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_int4(x.reshape(-1, self.in_features), self.qweight, self.scales)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g={self.group_size}"


# --- FP8 ----------------------------------------------------------------------------------------------------------


class Llama4Fp8TextExperts(Llama4RoutedExperts):
    """The routed experts in FP8 (``modeling_llama4.fp8``, the official ``fbgemm_fp8`` layout). Checkpoint buffers:
    ``gate_up_proj [E, D, 2I]`` e4m3, ``gate_up_proj_scale [E, 1, 2I]`` fp32, ``down_proj [E, I, D]`` e4m3,
    ``down_proj_scale [E, D, 1]`` fp32."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.config = config
        experts, hidden, inner = self.num_experts, self.hidden_size, self.intermediate_size
        self.register_buffer("gate_up_proj", torch.empty(experts, hidden, 2 * inner, dtype=FP8_DTYPE))
        self.register_buffer("gate_up_proj_scale", torch.empty(experts, 1, 2 * inner, dtype=FP8_SCALE_DTYPE))
        self.register_buffer("down_proj", torch.empty(experts, inner, hidden, dtype=FP8_DTYPE))
        self.register_buffer("down_proj_scale", torch.empty(experts, hidden, 1, dtype=FP8_SCALE_DTYPE))

    @property
    def qweight(self) -> torch.Tensor:
        """``gate_up_proj``, under the name where PEFT looks for a quantized layer's device."""
        return self.gate_up_proj

    def column_scale(self, expert: int, projection: str) -> torch.Tensor:
        """``[1, N]``: the per-output-column scales of one expert's ``projection``."""
        scale = getattr(self, f"{projection}_scale")[expert]
        return scale if projection == "gate_up_proj" else scale.T

    def project(self, x: torch.Tensor, expert: int, projection: str) -> torch.Tensor:
        weight = getattr(self, projection)[expert]
        return frozen_matmul(x, fp8_matmul, dequantize_fp8, weight, self.column_scale(expert, projection))

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = (
            dequantize_fp8(getattr(self, p)[expert], self.column_scale(expert, p), dtype) for p in PROJECTIONS
        )
        return gate_up, down

    def dequantized(self, dtype: torch.dtype) -> Llama4TextExperts:
        return _dense_experts(self, dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.intermediate_size}, fp8 e4m3"


class Llama4Fp8Linear(nn.Module):
    """A linear layer in FP8: ``weight [out, in]`` e4m3 and ``weight_scale [out, 1]`` fp32 buffers, optional ``bias``
    parameter in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=FP8_SCALE_DTYPE))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        weight = dequantize_fp8(self.weight.T, self.weight_scale.T, dtype).T  # [out, in]
        return _dense_linear(weight, None if self.bias is None else self.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = frozen_matmul(rows, fp8_matmul, dequantize_fp8, self.weight.T, self.weight_scale.T)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


# --- back to dense ------------------------------------------------------------------------------------------------

QUANTIZED_MODULES = (Llama4Int4TextExperts, Llama4Int4Linear, Llama4Fp8TextExperts, Llama4Fp8Linear)


def dequantize_modules(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Swap every quantized module of ``model`` for its dense equivalent holding ``ŵ`` in ``dtype``.

    The dense weights stay frozen, as the quantized ones were (e.g. under a PEFT model, to merge its adapters).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANTIZED_MODULES):
            model.set_submodule(name, module.dequantized(dtype).requires_grad_(False))
    return model


def _dense_experts(module: Llama4RoutedExperts, dtype: torch.dtype) -> Llama4TextExperts:
    """A ``Llama4TextExperts`` holding the dequantized weights of ``module``."""
    weights = [module.expert_weights(expert, dtype) for expert in range(module.num_experts)]
    with torch.device("meta"):
        dense = Llama4TextExperts(module.config)
    dense.gate_up_proj = nn.Parameter(torch.stack([gate_up for gate_up, _ in weights]))
    dense.down_proj = nn.Parameter(torch.stack([down for _, down in weights]))
    return dense


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear
