"""Routed experts with weights prepacked for oneDNN: faster CPU inference at the same precision and memory.

A prefill spreads its tokens over the experts (512 tokens over 128 experts: about 4 rows each), so each expert runs
two small matmuls. torch multiplies a plain ``[K, N]`` weight by first copying it into the blocked layout its kernel
reads, on every call; for a few rows that copy costs as much as the product. :func:`pack_experts` swaps each
:class:`~modeling_llama4.moe.Llama4TextExperts` for a :class:`Llama4PackedTextExperts` holding every expert's
weight in oneDNN's blocked layout once (the dense module is dropped: same bytes), and the loop multiplies by it
directly. The arithmetic is the same fp32 or bf16 product, in another summation order.

An inference layout, as IPEX's ``optimize`` is: ``state_dict`` still gives (and ``load_state_dict`` takes) the dense
``gate_up_proj [E, D, 2I]`` and ``down_proj [E, I, D]`` (load weights, then pack); gradients reach the inputs (not
the packed weights, which stay frozen); pack after any ``.to(dtype)``; :func:`unpack_experts` goes back.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_llama4 import Llama4TextConfig
from .moe import Llama4RoutedExperts, Llama4TextExperts
from .quantized_experts import PROJECTIONS, _dense_experts, frozen_matmul


def packing_available() -> bool:
    """Whether this torch build has the oneDNN CPU kernels :func:`pack_experts` uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``w [K, N]`` → oneDNN's blocked layout of ``wᵀ [N, K]`` (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.T.contiguous())


def unpack_weight(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`pack_weight`: ``w [K, N]`` in ``dtype``."""
    return packed.to_dense().T.to(dtype)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x [n, K] @ w [K, N]`` for a weight packed by :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class Llama4PackedTextExperts(Llama4RoutedExperts):
    """The routed experts of a :class:`Llama4TextExperts`, each expert's ``gate_up_proj`` and ``down_proj`` packed
    by :func:`pack_weight` (frozen, CPU). ``forward`` is the shared per-expert loop of ``Llama4RoutedExperts``."""

    def __init__(self, config: Llama4TextConfig, experts: Llama4TextExperts):
        if not packing_available():
            raise RuntimeError("Packed experts need torch's oneDNN (mkldnn) CPU kernels; this torch build has none.")
        if experts.gate_up_proj.device.type != "cpu":
            raise ValueError(f"Packed experts run on CPU; the experts are on {experts.gate_up_proj.device}.")
        super().__init__(config)
        self.config = config
        self.dtype = experts.gate_up_proj.dtype
        # projection -> one packed weight per expert
        self.packed = {name: [pack_weight(w) for w in getattr(experts, name).detach()] for name in PROJECTIONS}

    def project(self, x: torch.Tensor, expert: int, projection: str) -> torch.Tensor:
        return frozen_matmul(x.to(self.dtype), packed_matmul, unpack_weight, self.packed[projection][expert])

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = (unpack_weight(self.packed[name][expert], dtype) for name in PROJECTIONS)
        return gate_up, down

    def unpacked(self) -> Llama4TextExperts:
        """A dense ``Llama4TextExperts`` with these weights."""
        return _dense_experts(self, self.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The dense checkpoint tensors, as ``Llama4TextExperts`` saves them."""
        dense = self.unpacked()
        for name in PROJECTIONS:
            destination[prefix + name] = getattr(dense, name).detach()

    def extra_repr(self) -> str:
        sizes = f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.intermediate_size}"
        return f"{sizes}, {self.dtype}, oneDNN packed"


def pack_experts(model: nn.Module) -> nn.Module:
    """Swap every :class:`Llama4TextExperts` of ``model`` (on CPU) for a :class:`Llama4PackedTextExperts`."""
    config = model.config.get_text_config()
    for name, module in list(model.named_modules()):
        if type(module) is Llama4TextExperts:
            model.set_submodule(name, Llama4PackedTextExperts(config, module))
    return model


def unpack_experts(model: nn.Module) -> nn.Module:
    """Swap every :class:`Llama4PackedTextExperts` of ``model`` back for a dense :class:`Llama4TextExperts`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Llama4PackedTextExperts):
            model.set_submodule(name, module.unpacked())
    return model
