"""The int4 weight format of Llama 4's quantized experts (and, optionally, shared experts): packing and unpacking.

Checkpoint format. A weight ``w [..., K, N]`` (``K`` the reduction dim: ``D`` for ``gate_up_proj [E, D, 2I]``, ``I``
for ``down_proj [E, I, D]``, ``in_features`` for a linear layer's ``weightᵀ``) is split into groups of ``G``
consecutive rows along ``K``. Symmetric round-to-nearest (Meta's ``int4_mixed`` recipe):

    scale [..., K/G, N] = absmax(group) / 7 (bfloat16),   q = clamp(round(w / scale), -8, 7),   ŵ = q · scale

so ``|w - ŵ| <= scale / 2`` element-wise. ``q + 8`` is stored as a nibble, two per byte along ``K`` (row ``2j`` in the
low nibble, row ``2j + 1`` in the high one): ``qweight [..., K/2, N]`` uint8, ``0.5 + 2 / G`` bytes per weight.

CPU kernel layout. ``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies by int4 weights without dequantizing
them; it wants each ``[K, N]`` matrix repacked by ``_convert_weight_to_int4pack_for_cpu`` into ``[N, K/2]`` bytes
(the same nibbles, reordered) and ``(scale, zero)`` pairs ``[K/G, N, 2]`` with ``ŵ = (q + 8 - 8) · scale + zero``,
i.e. zero = 0 here (built per call by :func:`kernel_scale_and_zero`, so memory holds only the scales).
:func:`to_kernel_layout` and :func:`from_kernel_layout` convert between the two exactly.
"""

from __future__ import annotations

import sys

import torch

SCALE_DTYPE = torch.bfloat16
INT4_MIN, INT4_MAX = -8, 7
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
_KERNEL_BLOCK_N = 64  # the CPU layout interleaves output rows n and n + 32 of each block of 64 rows
_UNSIGNED_OF_WIDTH = {2: torch.uint16, 4: torch.uint32}  # bytes → the unsigned integer of that width
_SIGNED_OF_WIDTH = {4: torch.int32, 8: torch.int64}  # bytes → a signed integer wide enough to hold it


def check_group_size(group_size: int, size: int, name: str) -> None:
    """Raise a ``ValueError`` unless ``group_size`` is a positive even divisor of the reduction size ``size``."""
    if not (isinstance(group_size, int) and group_size > 0 and group_size % 2 == 0 and size % group_size == 0):
        raise ValueError(
            f"Invalid int4 `group_size` = {group_size!r}: it must be a positive even integer dividing {name} ({size})."
        )


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., K, N]`` → ``(qweight [..., K/2, N] uint8, scales [..., K/G, N] bfloat16)``, groups along K."""
    *batch, k, n = weight.shape
    check_group_size(group_size, k, "the reduction dim")
    grouped = weight.float().reshape(*batch, k // group_size, group_size, n)
    absmax = grouped.abs().amax(dim=-2)  # [..., K/G, N]
    scales = (absmax / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    q = torch.round(grouped / scales.float().unsqueeze(-2)).clamp(INT4_MIN, INT4_MAX)
    nibbles = (q - INT4_MIN).to(torch.uint8).reshape(*batch, k // 2, 2, n)
    return nibbles[..., 0, :] | (nibbles[..., 1, :] << 4), scales


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``qweight [..., K/2, N]`` and ``scales [..., K/G, N]`` → ``ŵ [..., K, N]`` in ``dtype``."""
    *batch, half_k, n = qweight.shape
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-2).to(dtype) + INT4_MIN  # [..., K/2, 2, N]
    grouped = q.view(*batch, scales.shape[-2], -1, n) * scales.to(dtype).unsqueeze(-2)  # [..., K/G, G, N]
    return grouped.view(*batch, 2 * half_k, n)


def quantize_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Quantize one layer's fused experts for a checkpoint converter.

    ``gate_up_proj [E, D, 2I]``, ``down_proj [E, I, D]`` → the four checkpoint tensors of the experts module, keyed
    by their names under it (``gate_up_proj_qweight`` …). One expert at a time, so the peak extra memory is one
    expert's float32 copy.
    """
    tensors = {}
    for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        pairs = [quantize_int4(expert, group_size) for expert in weight]
        tensors[f"{name}_qweight"] = torch.stack([qweight for qweight, _ in pairs])
        tensors[f"{name}_scales"] = torch.stack([scales for _, scales in pairs])
    return tensors


# --- the CPU kernel layout ----------------------------------------------------------------------------------------


def kernel_supports(k: int, n: int, group_size: int) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` takes a ``[K, N]`` weight in groups of ``group_size``."""
    return group_size in KERNEL_GROUP_SIZES and k % group_size == 0 and n % 16 == 0


def to_kernel_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Checkpoint ``qweight [..., K/2, N]`` → the CPU kernel's ``[..., N, K/2]`` (a reordering of the nibbles)."""
    *batch, half_k, n = qweight.shape
    nibbles = torch.stack((qweight & 0xF, qweight >> 4), dim=-2).reshape(-1, 2 * half_k, n)  # [B, K, N]
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.int().contiguous(), 1) for q in nibbles]
    return torch.stack(packed).view(*batch, n, half_k)


def from_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_kernel_layout`: ``[..., N, K/2]`` → checkpoint ``qweight [..., K/2, N]``.

    The CPU layout (aten ``weight_to_int4pack`` for CPU): output rows in blocks of 64, each stored ``[K, 32]`` bytes
    with rows ``n`` (low nibble) and ``n + 32`` (high) of the block together; the ``N mod 64`` rows left over stored
    ``[K, rest/2]`` with rows ``2m`` and ``2m + 1`` together.
    """
    *batch, n, half_k = packed.shape
    k, head = 2 * half_k, n // _KERNEL_BLOCK_N * _KERNEL_BLOCK_N
    flat = packed.reshape(-1, n * half_k)
    b = flat.shape[0]
    blocks = flat[:, : head * half_k].reshape(b, head // _KERNEL_BLOCK_N, k, _KERNEL_BLOCK_N // 2)  # [B, nb, K, 32]
    head_q = torch.stack((blocks & 0xF, blocks >> 4), dim=2)  # [B, nb, 2, K, 32]
    head_q = head_q.permute(0, 3, 1, 2, 4).reshape(b, k, head)  # [B, K, head]
    rest = flat[:, head * half_k :].reshape(b, k, (n - head) // 2)  # [B, K, rest/2]
    rest_q = torch.stack((rest & 0xF, rest >> 4), dim=-1).reshape(b, k, n - head)  # [B, K, rest]
    q = torch.cat((head_q, rest_q), dim=-1)  # [B, K, N]
    pairs = q.view(b, half_k, 2, n)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).view(*batch, half_k, n)


def kernel_scale_and_zero(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scales [K/G, N]`` → the CPU kernel's ``(scale, zero = 0)`` pairs ``[K/G, N, 2]`` in ``dtype``.

    Each scale's bits zero-extended to an integer twice as wide are, little-endian, the pair itself: one vectorized
    cast. Interleaving with ``torch.stack`` is a strided copy that took a third of a decode GEMV's time (n = 1,
    ``benchmarks/bench_int4.py``).
    """
    values = scales.to(dtype)
    width = dtype.itemsize  # bytes
    if sys.byteorder != "little" or width not in _UNSIGNED_OF_WIDTH:
        return torch.stack((values, torch.zeros_like(values)), dim=-1)
    pairs = values.view(_UNSIGNED_OF_WIDTH[width]).to(_SIGNED_OF_WIDTH[2 * width])  # [K/G, N], bits zero | value
    return pairs.view(dtype).view(*scales.shape, 2)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [n, K] @ ŵ [K, N]`` on the CPU kernel, ``packed [N, K/2]`` in kernel layout, ``scales [K/G, N]``.

    fp32 ``x``: within 1e-6 relative of ``x @ ŵ`` (fp32 accumulation); bf16/fp16 ``x``: the output rounded once.
    """
    scale_and_zero = kernel_scale_and_zero(scales, x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scale_and_zero)
