"""FP8 on CPU: a decode matmul that reads the e4m3 weight once (1 byte a weight), and an exact dequantization.

torch has no fast FP8 matmul on CPU: ``torch._scaled_mm`` there, and the e4m3 → bf16 conversion that dequantizing
needs, each take 11-17x the time of a bf16 matmul of the same weight (``benchmarks/bench_int4.py``), which made FP8
experts decode at a quarter of bf16's speed. Decode multiplies each weight by a handful of rows and is bound by memory
traffic, so :func:`fp8_gemv` (``x [n, K] @ ŵ [K, N]``, up to ``MAX_ROWS`` rows) streams the weight's rows once for all
``n`` rows of ``x``, converts 16 bytes at a time exactly and accumulates in float32; for more rows (and backward)
:func:`fp8_dequantize` converts with the same instructions before torch's matmul. The conversion is two integer ops:
the e4m3 byte sign-extended to 16 bits and shifted left by 7, bit 14 cleared, is the float16 of ``e4m3 · 2⁻⁸`` (the
same exponent field, bias 7 vs 15; e4m3 subnormals land on float16 subnormals, which the F16C conversion keeps), so
``ŵ = q · scale`` becomes ``(x @ q·2⁻⁸) · (256 · scale)``.

The C++ source is built once per machine with ``torch.utils.cpp_extension.load_inline`` (the host C++ compiler and
ninja, ``-mavx2 -mfma -mf16c``, OpenMP; cached under ``TORCH_EXTENSIONS_DIR``; a few seconds the first time) as a
plain shared library of two ``extern "C"`` functions, called through ``ctypes``. It needs an x86 CPU that torch runs
at AVX2 or above (``torch.backends.cpu.get_cpu_capability()``; those have F16C and FMA too); where it cannot be built
(another CPU, no compiler or ninja), ``fp8_gemv_supported`` and ``fp8_dequantize_supported`` are False, a warning
says why, and callers use torch's conversion instead.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from collections.abc import Callable

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

MAX_ROWS = 16  # about where dequantizing once (same conversion) and running torch's matmul is as fast (bench_int4)
_COLUMNS, _ROWS = 16, 8  # the GEMV's step: 16 output columns (one 16-byte load) by 8 reduction rows

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#if !(defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#error "the FP8 GEMV kernel needs AVX2, F16C and FMA"
#endif
#include <immintrin.h>

// 16 e4m3 bytes -> 16 floats e4m3 * 2^-8, exactly, via float16 bits: the byte sign-extended to 16 bits and shifted
// left by 7 puts the magnitude in bits 7-13 and the sign in bits 14 and 15; clearing bit 14 leaves the float16.
static inline void load_e4m3(const uint8_t* bytes, __m256& low, __m256& high) {
  const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
  low = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  high = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// y [n, N] = x [n, K] @ (w [K, N] * 2^-8), all row-major, w e4m3; N % 16 == 0, K % 8 == 0. Each thread owns a
// panel of columns and streams its part of every row of w once: 8 rows at a time, 16 columns each, for all n rows
// of x (accumulators in y, which stays in cache).
extern "C" void fp8_gemv(const float* x, const uint8_t* w, float* y, int64_t n, int64_t K, int64_t N,
                       int64_t threads) {
  const int64_t panel = (N / 16 + threads - 1) / threads * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j0 = 0; j0 < N; j0 += panel) {
    const int64_t j1 = std::min(j0 + panel, N);
    for (int64_t t = 0; t < n; t++) std::memset(y + t * N + j0, 0, sizeof(float) * (j1 - j0));
    for (int64_t k = 0; k < K; k += 8) {
      for (int64_t j = j0; j < j1; j += 16) {
        __m256 low[8], high[8];
        for (int r = 0; r < 8; r++) load_e4m3(w + (k + r) * N + j, low[r], high[r]);
        for (int64_t t = 0; t < n; t++) {
          float* out = y + t * N + j;
          __m256 acc_low = _mm256_loadu_ps(out), acc_high = _mm256_loadu_ps(out + 8);
          for (int r = 0; r < 8; r++) {
            const __m256 xr = _mm256_set1_ps(x[t * K + k + r]);
            acc_low = _mm256_fmadd_ps(xr, low[r], acc_low);
            acc_high = _mm256_fmadd_ps(xr, high[r], acc_high);
          }
          _mm256_storeu_ps(out, acc_low);
          _mm256_storeu_ps(out + 8, acc_high);
        }
      }
    }
  }
}

// out [K, N] = (w [K, N] * 2^-8) * scale [N] (the column scales times 256), row-major, w e4m3; N % 16 == 0.
extern "C" void fp8_dequantize(const uint8_t* w, const float* scale, float* out, int64_t K, int64_t N, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < K; k++) {
    for (int64_t j = 0; j < N; j += 16) {
      __m256 low, high;
      load_e4m3(w + k * N + j, low, high);
      _mm256_storeu_ps(out + k * N + j, _mm256_mul_ps(low, _mm256_loadu_ps(scale + j)));
      _mm256_storeu_ps(out + k * N + j + 8, _mm256_mul_ps(high, _mm256_loadu_ps(scale + j + 8)));
    }
  }
}
"""
_ARGUMENTS = {  # each kernel's C arguments: pointers (tensors) and int64_t
    "fp8_gemv": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4,
    "fp8_dequantize": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3,
}
_X86 = ("x86_64", "amd64", "i386", "i686")


def unbuildable_reason() -> str | None:
    """Why the kernels cannot run on this machine's CPU, or None where they can (a compiler permitting)."""
    if platform.machine().lower() not in _X86:
        return f"an x86 CPU is needed, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"AVX2 is needed, torch runs this CPU at {capability}"
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernels, or None (with a warning saying why) where they cannot be built."""
    reason = unbuildable_reason()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load_inline  # imported on first use: it probes for CUDA

            path = load_inline(
                name="modeling_llama4_fp8_cpu",
                cpp_sources=[_SOURCE],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                no_implicit_headers=True,  # plain C++: no torch headers to compile
            )
            return ctypes.CDLL(path)
        except Exception as error:  # no compiler or ninja, a failed build: cpp_extension raises assorted types
            reason = repr(error)
    logger.warning(f"fp8: the CPU FP8 kernels are unavailable, torch's slower e4m3 conversion is used ({reason})")
    return None


@functools.cache
def _kernel(name: str) -> Callable[..., None] | None:
    """The kernel ``name`` (``fp8_gemv`` or ``fp8_dequantize``) taking tensors and ints, or None where not built."""
    library = _library()
    if library is None:
        return None
    function = getattr(library, name)
    function.argtypes, function.restype = _ARGUMENTS[name], None

    def call(*arguments: torch.Tensor | int) -> None:
        function(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments))

    return call


def _row_major_e4m3(q: torch.Tensor) -> bool:
    """``q [K, N]``: a row-major e4m3 CPU matrix, ``N`` a multiple of the kernels' 16 columns."""
    return (
        q.dtype == torch.float8_e4m3fn
        and q.device.type == "cpu"
        and q.dim() == 2
        and q.is_contiguous()
        and q.shape[-1] % _COLUMNS == 0
    )


def fp8_gemv_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether :func:`fp8_gemv` takes ``x [n, K]`` and ``q [K, N]``: CPU tensors, at most ``MAX_ROWS`` rows, a
    row-major e4m3 ``q`` with ``N % 16 == 0`` and ``K % 8 == 0``, and a kernel built for this CPU."""
    return (
        _row_major_e4m3(q)
        and q.shape[-2] % _ROWS == 0
        and x.device.type == "cpu"
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and _library() is not None
    )


def fp8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [n, K] @ ŵ [K, N]`` in ``x``'s dtype, ``ŵ = q · scale`` (``q`` e4m3, ``scale [1, N]`` float32), where
    :func:`fp8_gemv_supported`. Accumulates in float32 and rounds once: fp32 ``x`` gives ``x @ ŵ`` to float32
    summation-order error."""
    (n, k), (_, columns) = x.shape, q.shape
    rows = x.float().contiguous()
    out = torch.empty(n, columns, dtype=torch.float32)
    _kernel("fp8_gemv")(rows, q, out, n, k, columns, torch.get_num_threads())
    return (out * (scale * 256.0)).to(x.dtype)


def fp8_dequantize_supported(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`fp8_dequantize` takes ``q [K, N]`` and its ``scale [1, N]``."""
    return (
        _row_major_e4m3(q)
        and scale.dtype == torch.float32
        and scale.shape == (1, q.shape[-1])
        and _library() is not None
    )


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``ŵ = q · scale [K, N]`` in float32, bitwise what ``q.float() * scale`` gives (``q·2⁻⁸ · 256·scale`` is the
    same product), where :func:`fp8_dequantize_supported`."""
    out = torch.empty(q.shape, dtype=torch.float32)
    columns = (scale * 256.0).reshape(-1).contiguous()
    _kernel("fp8_dequantize")(q, columns, out, q.shape[0], q.shape[1], torch.get_num_threads())
    return out
