"""Rotary position embedding of the Llama 4 text model, in Meta's interleaved layout.

Meta rotates the pairs ``(x[2j], x[2j+1])`` (a complex multiply in its code); Hugging Face checkpoints keep
that layout, so q/k weights are not permuted. The rotation here is written with real cos/sin tensors, which
gives the same numbers without complex dtypes (friendlier to bf16, compile and every backend).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configuration_llama4 import Llama4TextConfig


def llama3_scaled_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Meta's ``apply_scaling``: keep high frequencies, divide low ones by ``factor``, blend the band between.

    With ``low_freq_factor == high_freq_factor`` (Scout) the blended band is empty.
    """
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    if low_freq_factor != high_freq_factor:
        smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        scaled = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled


def rope_inverse_frequencies(config: Llama4TextConfig) -> torch.Tensor:
    """``[head_dim / 2]`` inverse frequencies for the config's ``rope_parameters`` (``default`` or ``llama3``)."""
    params = config.rope_parameters
    dim = config.head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    rope_type = params.get("rope_type", "default")
    if rope_type == "llama3":
        return llama3_scaled_frequencies(
            inv_freq,
            factor=params["factor"],
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 1.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings", 8192),
        )
    if rope_type != "default":
        raise ValueError(
            f"Invalid Llama 4 config: `rope_parameters['rope_type']` = {rope_type!r}; expected 'default' or 'llama3'."
        )
    return inv_freq


class Llama4TextRotaryEmbedding(nn.Module):
    """Maps ``position_ids [B, S]`` to the ``(cos, sin)`` pair ``[B, S, head_dim / 2]`` shared by all RoPE layers."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.inv_freq = nn.Buffer(rope_inverse_frequencies(config), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, S, H, head_dim]`` by ``cos, sin [B, S, head_dim / 2]`` in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, head_dim / 2] each
    cos, sin = cos[:, :, None], sin[:, :, None]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention_temperature(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """NoPE layers' query scale ``1 + attn_scale · log(floor((pos + 1) / floor_scale) + 1)`` → ``[B, S, 1, 1]``.

    ``pos`` is each token's absolute position. The floor is taken in integer arithmetic, exact at any position
    (float32 holds integers exactly only up to 2**24 ≈ 16.8M, and a float32 quotient can round up to the next
    integer just below a multiple of ``floor_scale``); the log is float32, as in Meta's reference.
    """
    floors = torch.div(position_ids + 1, floor_scale, rounding_mode="floor")
    return (torch.log(floors.float() + 1.0) * attn_scale + 1.0)[..., None, None]
