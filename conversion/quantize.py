"""``--quantize int4|int4_mixed|fp8``: the routed experts written quantized as they stream.

- ``int4`` (``modeling_llama4.int4``): each MoE layer's ``experts.gate_up_proj [E, D, 2I]`` and ``experts.down_proj
  [E, I, D]`` become ``{name}_qweight [E, K/2, N]`` uint8 and ``{name}_scales [E, K/G, N]`` bfloat16 (``K`` the
  reduction dim), ``quantization_config`` ``llama4_int4``. ``int4_mixed`` (Meta's recipe) also writes the shared
  experts' linear layers as int4 (``qweight [in/2, out]``, ``scales [in/G, out]`` of ``weightᵀ``).
- ``fp8`` (``modeling_llama4.fp8``, Meta's official layout): ``{name} [E, K, N]`` float8_e4m3fn and ``{name}_scale``
  float32, ``[E, 1, 2I]`` for ``gate_up_proj`` and ``[E, D, 1]`` for ``down_proj``; ``quantization_config``
  ``fbgemm_fp8`` with every other linear layer in ``modules_to_not_convert``.

Streaming is kept: the dense tensor arrives in blocks of whole experts and each expert is quantized as it passes, so
memory holds one block, plus one tensor's scales until they are written after its quantized weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import FbgemmFp8Config

from modeling_llama4.fp8 import FP8_DTYPE, FP8_SCALE_DTYPE, quantize_fp8
from modeling_llama4.int4 import SCALE_DTYPE, check_group_size, quantize_int4
from modeling_llama4.quantization_int4 import Llama4Int4Config

from . import ConversionError
from .params import NativeArgs
from .writer import TensorEntry

QUANTIZE_METHODS = ("int4", "int4_mixed", "fp8")
_EXPERT_WEIGHT = re.compile(r"(.+\.)?model\.layers\.\d+\.feed_forward\.experts\.(gate_up_proj|down_proj)")
_SHARED_EXPERT_WEIGHT = re.compile(r"(.+\.)?model\.layers\.\d+\.feed_forward\.shared_expert\.\w+_proj\.weight")

# One tensor streamed as ``(name, chunks)`` pairs.
Tensors = Iterator[tuple[str, Iterable[torch.Tensor]]]


def is_expert_weight(name: str) -> bool:
    return _EXPERT_WEIGHT.fullmatch(name) is not None


@dataclass(frozen=True)
class Int4Experts:
    """Routed experts (and with ``shared_expert`` the shared experts' linear layers, Meta's ``int4_mixed``) as int4
    groups of ``group_size`` along the reduction dim."""

    group_size: int
    shared_expert: bool = False

    def quantizes(self, name: str) -> bool:
        return is_expert_weight(name) or (self.shared_expert and _SHARED_EXPERT_WEIGHT.fullmatch(name) is not None)

    def entries(self, name: str, shape: tuple[int, ...]) -> list[TensorEntry]:
        """The two entries that replace the dense ``name``: ``[E, K, N]`` experts or a linear ``weight [N, K]``."""
        if not is_expert_weight(name):
            n, k = shape
            module = name.removesuffix(".weight")
            return [
                TensorEntry(f"{module}.qweight", (k // 2, n), torch.uint8),
                TensorEntry(f"{module}.scales", (k // self.group_size, n), SCALE_DTYPE),
            ]
        experts, k, n = shape
        return [
            TensorEntry(f"{name}_qweight", (experts, k // 2, n), torch.uint8),
            TensorEntry(f"{name}_scales", (experts, k // self.group_size, n), SCALE_DTYPE),
        ]

    def tensors(self, name: str, blocks: Iterable[torch.Tensor]) -> Tensors:
        """``(qweight name, its chunks)`` then ``(scales name, [scales])`` for the dense ``name`` streamed as
        ``blocks`` of whole experts ``[e, K, N]``. The scales are collected while the qweight chunks are consumed, so
        consume those fully before asking for the next pair (as ``ShardedSafetensorsWriter.write`` does). A shared
        expert's linear weight (one expert's size) is quantized whole: ``weightᵀ``, groups along its input dim."""
        if not is_expert_weight(name):
            qweight, scales = quantize_int4(torch.cat(list(blocks)).T, self.group_size)
            module = name.removesuffix(".weight")
            yield f"{module}.qweight", [qweight]
            yield f"{module}.scales", [scales]
            return
        scales: list[torch.Tensor] = []

        def qweights() -> Iterator[torch.Tensor]:
            for block in blocks:
                for expert in block:  # [K, N]
                    qweight, expert_scales = quantize_int4(expert, self.group_size)
                    scales.append(expert_scales)
                    yield qweight

        yield f"{name}_qweight", qweights()
        yield f"{name}_scales", [torch.stack(scales)]


@dataclass(frozen=True)
class Fp8Experts:
    """Routed experts in FP8 with one float32 scale per output channel (the ``fbgemm_fp8`` layout)."""

    def quantizes(self, name: str) -> bool:
        return is_expert_weight(name)

    def entries(self, name: str, shape: tuple[int, ...]) -> list[TensorEntry]:
        experts, k, n = shape
        scale_shape = (experts, 1, n) if name.endswith("gate_up_proj") else (experts, n, 1)
        return [TensorEntry(name, shape, FP8_DTYPE), TensorEntry(f"{name}_scale", scale_shape, FP8_SCALE_DTYPE)]

    def tensors(self, name: str, blocks: Iterable[torch.Tensor]) -> Tensors:
        """Like :meth:`Int4Experts.tensors`: the FP8 weight's chunks, then its scales."""
        scales: list[torch.Tensor] = []

        def weights() -> Iterator[torch.Tensor]:
            for block in blocks:
                q, block_scales = quantize_fp8(block)  # [e, K, N], [e, 1, N]
                scales.append(block_scales)
                yield q

        yield name, weights()
        scale = torch.cat(scales)
        yield f"{name}_scale", [scale if name.endswith("gate_up_proj") else scale.transpose(1, 2).contiguous()]


def expert_quantizer(args: NativeArgs, method: str, group_size: int) -> tuple[Int4Experts | Fp8Experts, dict]:
    """The writer of ``method`` and config.json's ``quantization_config``; raises ``ConversionError`` for a model
    without MoE layers or a ``group_size`` that does not suit the experts."""
    if args.moe_args is None:
        raise ConversionError(
            f"--quantize {method} quantizes the routed experts, and this checkpoint has no MoE layers"
        )
    if method == "fp8":
        return Fp8Experts(), FbgemmFp8Config(modules_to_not_convert=fp8_modules_to_not_convert(args)).to_dict()
    try:
        check_group_size(group_size, args.dim, "the hidden size (dim)")
        check_group_size(group_size, args.moe_hidden_dim, "the experts' hidden size")
    except ValueError as error:
        raise ConversionError(f"--group-size: {error}") from error
    shared_expert = method == "int4_mixed"
    config = Llama4Int4Config(group_size=group_size, quantize_shared_expert=shared_expert)
    return Int4Experts(group_size, shared_expert), config.to_dict()


def fp8_modules_to_not_convert(args: NativeArgs) -> list[str]:
    """Every linear layer but the routed experts', as Meta's FP8 checkpoints list them: attention, shared experts,
    dense feed-forward layers, head, and the vision tower and projector."""
    prefix = "language_model." if args.vision_args is not None else ""
    layers = f"{prefix}model.layers"
    modules = [f"{layers}.*.self_attn", f"{layers}.*.feed_forward.shared_expert", f"{prefix}lm_head"]
    modules += [f"{layers}.{i}.feed_forward" for i in range(args.n_layers) if not args.is_moe_layer(i)]
    if args.vision_args is not None:
        modules += ["vision_model", "multi_modal_projector"]
    return modules
