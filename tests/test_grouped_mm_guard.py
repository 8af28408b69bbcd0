"""``_grouped_mm_supported``: grouped_mm only where torch runs a CUDA kernel for it, the per-expert loop elsewhere.

No GPU here: CUDA devices are simulated by patching ``torch.cuda.get_device_capability`` and giving the guard
tensors that report a CUDA device (``x.device`` is all it reads besides shapes, strides, dtypes and pointers).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from modeling_llama4.moe import Llama4TextExperts, _grouped_mm_supported
from modeling_llama4.tiny import SCOUT_LIKE, text_config_from_meta


class FakeCuda:
    """A tensor stand-in on ``cuda:0`` with the attributes the guard reads."""

    def __init__(self, tensor: torch.Tensor, offset_bytes: int = 0):
        self.tensor, self.offset_bytes = tensor, offset_bytes
        self.device, self.dtype, self.shape = torch.device("cuda", 0), tensor.dtype, tensor.shape
        self.requires_grad = False

    def stride(self) -> tuple[int, ...]:
        return self.tensor.stride()

    def data_ptr(self) -> int:
        return 4096 + self.offset_bytes


def cuda_case(dtype=torch.bfloat16, hidden=64, inner=48, offset_bytes=0, capability=(9, 0)):
    x = FakeCuda(torch.empty(5, hidden, dtype=dtype), offset_bytes)
    weights = (
        FakeCuda(torch.empty(4, hidden, 2 * inner, dtype=dtype)),
        FakeCuda(torch.empty(4, inner, hidden, dtype=dtype)),
    )
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        return _grouped_mm_supported(x, *weights)


def test_cuda_hopper_bf16_aligned_is_supported():
    assert cuda_case()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(capability=(8, 0)),  # A100: no grouped_mm kernel
        dict(capability=(7, 5)),
        dict(dtype=torch.float32),  # the CUDA kernel is bf16
        dict(offset_bytes=8),  # data pointer not 16-byte aligned
        dict(hidden=60),  # a row of 60 bf16 is 120 bytes: strides not 16-byte multiples
        dict(inner=44),
    ],
)
def test_unsupported_cuda_cases_fall_back(kwargs):
    assert not cuda_case(**kwargs)


def test_cpu_takes_the_loop():
    """torch's CPU grouped_mm multiplies every expert, idle ones included; the loop skips them."""
    x, gate_up, down = torch.randn(5, 64), torch.randn(4, 64, 96), torch.randn(4, 48, 64)
    assert not _grouped_mm_supported(x, gate_up, down)
    assert not _grouped_mm_supported(x.bfloat16(), gate_up.bfloat16(), down.bfloat16())


def test_loop_matches_grouped_mm_and_casts_the_input():
    """Activations in another dtype than the experts' (float64 here) are cast to it; the loop on CPU gives what
    torch's grouped_mm gives on the same rows."""
    experts = Llama4TextExperts(text_config_from_meta(SCOUT_LIKE)).requires_grad_(False)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x, counts = torch.randn(12, 64, dtype=torch.float64), torch.tensor([4, 0, 6, 2])
    with mock.patch.object(experts, "forward_grouped", side_effect=AssertionError("took grouped_mm")):
        out = experts(x, counts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, experts.forward_grouped(x, counts), atol=1e-5, rtol=0)
