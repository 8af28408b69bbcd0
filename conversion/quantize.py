"""``--quantize int4``: the routed experts written as int4 (``modeling_llama4.quantization_int4``'s format).

Each MoE layer's ``experts.gate_up_proj [E, D, 2I]`` and ``experts.down_proj [E, I, D]`` become
``{name}_qweight [E, K/2, N]`` uint8 and ``{name}_scales [E, K/G, N]`` bfloat16 (``K`` the reduction dim), the
buffers ``Llama4Int4TextExperts`` loads. Streaming is kept: the dense tensor arrives in blocks of whole experts and
each expert is quantized as it passes (the same per-expert ``quantize_int4`` as ``quantize_experts``), so memory
holds one block, plus one tensor's scales (``2 / G`` bytes per weight) until they are written after its qweight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from modeling_llama4.int4 import SCALE_DTYPE, check_group_size, quantize_int4
from modeling_llama4.quantization_int4 import Llama4Int4Config

from .errors import ConversionError
from .params import NativeArgs
from .writer import TensorEntry

QUANTIZE_METHODS = ("int4",)
_EXPERT_WEIGHT = re.compile(r"(.+\.)?model\.layers\.\d+\.feed_forward\.experts\.(gate_up_proj|down_proj)")


def int4_config(args: NativeArgs, group_size: int) -> dict:
    """config.json's ``quantization_config``; raises ``ConversionError`` unless ``group_size`` suits the experts."""
    if args.moe_args is None:
        raise ConversionError("--quantize int4 quantizes the routed experts, and this checkpoint has no MoE layers")
    try:
        check_group_size(group_size, args.dim, "the hidden size (dim)")
        check_group_size(group_size, args.moe_hidden_dim, "the experts' hidden size")
        return Llama4Int4Config(group_size=group_size).to_dict()
    except ValueError as error:
        raise ConversionError(f"--group-size: {error}") from error


def is_expert_weight(name: str) -> bool:
    return _EXPERT_WEIGHT.fullmatch(name) is not None


def int4_entries(name: str, shape: tuple[int, ...], group_size: int) -> list[TensorEntry]:
    """The two entries that replace the dense ``name [E, K, N]``."""
    experts, k, n = shape
    return [
        TensorEntry(f"{name}_qweight", (experts, k // 2, n), torch.uint8),
        TensorEntry(f"{name}_scales", (experts, k // group_size, n), SCALE_DTYPE),
    ]


def int4_tensors(
    name: str, blocks: Iterable[torch.Tensor], group_size: int
) -> Iterator[tuple[str, Iterable[torch.Tensor]]]:
    """``(qweight name, its chunks)`` then ``(scales name, [scales])`` for the dense ``name`` streamed as ``blocks``
    of whole experts ``[e, K, N]``. The scales are collected while the qweight chunks are consumed, so consume
    those fully before asking for the next pair (as ``ShardedSafetensorsWriter.write`` does)."""
    scales: list[torch.Tensor] = []

    def qweights() -> Iterator[torch.Tensor]:
        for block in blocks:
            for expert in block:  # [K, N]
                qweight, expert_scales = quantize_int4(expert, group_size)
                scales.append(expert_scales)
                yield qweight

    yield f"{name}_qweight", qweights()
    yield f"{name}_scales", [torch.stack(scales)]
