"""The FP8 weight format of Meta's official Llama 4 checkpoints (transformers' ``fbgemm_fp8`` layout).

A weight ``w [..., K, N]`` (``K`` the reduction dim) is stored as ``float8_e4m3fn`` with one float32 scale per output
column, ``scale = absmax(column) / 448`` and ``q = w / scale`` rounded to e4m3, so ``ŵ = q · scale`` (1 byte a weight).
Checkpoint tensors: routed experts ``gate_up_proj [E, D, 2I]`` with ``gate_up_proj_scale [E, 1, 2I]``, ``down_proj
[E, I, D]`` with ``down_proj_scale [E, D, 1]`` (the same per-output-column scales, stored transposed); a linear layer
``weight [out, in]`` with ``weight_scale [out, 1]``.
"""

from __future__ import annotations

import torch

from .fp8_cpu import fp8_dequantize, fp8_dequantize_supported, fp8_gemv, fp8_gemv_supported

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_SCALE_DTYPE = torch.float32


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., K, N]`` → ``(q [..., K, N] float8_e4m3fn, scale [..., 1, N] float32)``, one scale per column."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=-2, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [..., K, N]`` and its column scales ``[..., 1, N]`` → ``ŵ [..., K, N]`` in ``dtype`` (one ``[K, N]`` on
    CPU through ``fp8_cpu``'s conversion: torch's e4m3 conversion is slow there)."""
    if fp8_dequantize_supported(q, scale):
        return fp8_dequantize(q, scale).to(dtype)
    return (q.float() * scale).to(dtype)


def fp8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [n, K] @ ŵ [K, N]``, scaling the ``[n, N]`` output instead of the ``[K, N]`` weight (e4m3 values are exact
    in every activation dtype). A few rows on CPU (decode) go through ``fp8_cpu``'s kernel, which reads ``q`` once
    without dequantizing it."""
    if fp8_gemv_supported(x, q):
        return fp8_gemv(x, q, scale)
    unscaled = dequantize_fp8(q, torch.ones_like(scale), x.dtype)  # [K, N], exact
    return ((x @ unscaled) * scale).to(x.dtype)


def check_fp8_pair(name: str, q: torch.Tensor, scale: torch.Tensor, scale_shape: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``q`` is e4m3 and ``scale`` is float32 of ``scale_shape``, finite
    and positive."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"FP8 checkpoint: `{name}` is {q.dtype}; expected {FP8_DTYPE}.")
    if scale.dtype != FP8_SCALE_DTYPE or tuple(scale.shape) != tuple(scale_shape):
        raise ValueError(
            f"FP8 checkpoint: `{name}` scale is {scale.dtype} {list(scale.shape)}; "
            f"expected {FP8_SCALE_DTYPE} {list(scale_shape)} (one per output channel)."
        )
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"FP8 checkpoint: `{name}` scale has non-finite or non-positive values.")
