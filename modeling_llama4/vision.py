"""Llama 4 vision tower: a ViT with 2D RoPE over each image tile, a pixel-shuffle adapter, and the projector.

``pixel_values [T, 3, S, S]`` (T tiles) → patches (unfold + linear, ``N = (S/p)²`` per tile) → class token appended
*last* → learned positional embedding → ``layernorm_pre`` → encoder layers (LayerNorm → attention with 2D RoPE →
LayerNorm → GELU MLP, each with a residual) → ``layernorm_post`` → class token dropped → pixel shuffle (ratio r:
each ``1/r × 1/r`` block of patches becomes one token, ``1/r²`` times wider) → adapter MLP → ``[T, N·r², D_out]``.
``Llama4MultiModalProjector`` then maps these features to the text model's width.

Numerics follow Meta's reference (``llama_models/llama4/vision``); state-dict keys are those of transformers'
built-in Llama 4. Unlike the built-in, the adapter's first layer is sized from the pixel-shuffled width
``hidden_size / r²``, not from ``intermediate_size`` (the two only coincide when ``mlp_ratio = 1 / r²``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .attention import eager_attention_forward
from .configuration_llama4 import Llama4Config, Llama4VisionConfig, square_side
from .rope import apply_rotary_emb


class Llama4VisionPatchEmbedding(nn.Module):
    """Non-overlapping ``p × p`` patches, each flattened and projected: ``[T, C, S, S]`` → ``[T, N, hidden]``.

    A stride-p convolution written as unfold + linear without bias, as Meta's ``ColumnParallelConv2dPatch``.
    """

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        patch = square_side(config.patch_size, "patch_size")
        self.unfold = nn.Unfold(kernel_size=patch, stride=patch)
        self.linear = nn.Linear(config.num_channels * patch * patch, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.unfold(pixel_values).transpose(1, 2)  # [T, N, C·p·p], patches in row-major order
        return self.linear(patches)


class Llama4VisionRotaryEmbedding(nn.Module):
    """2D RoPE of a tile's ``N + 1`` tokens as real ``(cos, sin)`` tables (Meta's ``VisionEncoder.freq_cis``).

    A head's ``head_dim / 2`` rotated pairs split in halves: pair ``j < head_dim / 4`` turns by ``(col + 1)·f_j``,
    pair ``head_dim / 4 + j`` by ``(row + 1)·f_j``, where ``f_j = theta^(-4j / head_dim)`` and ``(row, col)`` is
    the patch's place in the grid. The class token (last) is not rotated.
    """

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        if head_dim % 4 != 0:
            raise ValueError(
                f"Invalid Llama 4 vision config: head_dim = hidden_size / num_attention_heads = {head_dim}; 2D RoPE "
                "needs a multiple of 4 (rotated pairs split between the x and y axes)."
            )
        self.grid_size = square_side(config.image_size, "image_size") // square_side(config.patch_size, "patch_size")
        self.rotated_pairs = head_dim // 2
        self.theta = config.rope_parameters["rope_theta"]

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[1, N + 1, head_dim / 2]`` in fp32, on ``hidden_states``' device."""
        device = hidden_states.device
        pairs = self.rotated_pairs
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, pairs, 2, device=device).float() / pairs))  # [head_dim/4]
        patch = torch.arange(self.grid_size**2, device=device)
        rows, cols = patch // self.grid_size, patch % self.grid_size
        angles = torch.cat([(cols + 1).float()[:, None] * inv_freq, (rows + 1).float()[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles.new_zeros(1, pairs)])  # [N + 1, head_dim / 2]; class token: angle 0
        return angles.cos()[None], angles.sin()[None]


class Llama4VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over one tile, with biases and 2D RoPE on queries and keys."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        width = config.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [T, N + 1, hidden]`` → ``([T, N + 1, hidden], attention weights or None)``."""
        tiles, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(tiles, seq, -1, self.head_dim)  # [T, N + 1, H, d]
        key = self.k_proj(hidden_states).view(tiles, seq, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(tiles, seq, -1, self.head_dim)

        cos, sin = position_embeddings
        query, key = apply_rotary_emb(query, cos, sin), apply_rotary_emb(key, cos, sin)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(tiles, seq, -1)), attn_weights


class Llama4VisionMLP(nn.Module):
    """Encoder feed-forward ``fc2(act(fc1(x)))`` with biases; ``intermediate_size = mlp_ratio · hidden_size``."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(hidden_states)))


class Llama4VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))``."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.self_attn = Llama4VisionAttention(config)
        self.mlp = Llama4VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama4VisionEncoder(nn.Module):
    """The stack of ``num_hidden_layers`` encoder layers (state-dict prefix ``model.layers``)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Llama4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, **kwargs)
        return hidden_states


def pixel_shuffle(patches: torch.Tensor, ratio: float) -> torch.Tensor:
    """Meta's ``pixel_shuffle_op``: trade resolution for width, ``[T, N, C]`` → ``[T, N·r², C / r²]``.

    For ``r = 1/k``, output token ``(i, j)`` of the shrunk grid concatenates the ``k × k`` patches
    ``(k·i + a, k·j + b)`` of the ``√N × √N`` grid, ordered by ``a`` then ``b``.
    """
    tiles, num_patches, channels = patches.shape
    side = int(num_patches**0.5)
    short_side = int(side * ratio)
    grid = patches.view(tiles, side, side, channels)  # [T, rows, cols, C]
    # fold each run of 1/r adjacent columns into the channels, then (rows and columns swapped) each run of rows
    grid = grid.view(tiles, side, short_side, int(channels / ratio)).transpose(1, 2)  # [T, cols·r, rows, C/r]
    grid = grid.reshape(tiles, short_side, short_side, int(channels / ratio**2))  # [T, cols·r, rows·r, C/r²]
    grid = grid.transpose(1, 2)  # [T, rows·r, cols·r, C/r²]
    return grid.reshape(tiles, short_side * short_side, -1)


class Llama4VisionAdapterMLP(nn.Module):
    """Adapter MLP ``act(fc2(act(fc1(x))))`` without biases, on the pixel-shuffled width ``hidden_size / r²``."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        shuffled_width = int(config.hidden_size // config.pixel_shuffle_ratio**2)
        self.fc1 = nn.Linear(shuffled_width, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = config.projector_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act_fn(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return self.act_fn(self.fc2(hidden_states))


class Llama4VisionPixelShuffleMLP(nn.Module):
    """``vision_adapter``: pixel shuffle then the adapter MLP, ``[T, N, hidden]`` → ``[T, N·r², D_out]``."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.mlp = Llama4VisionAdapterMLP(config)

    def forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio))


class Llama4VisionModel(PreTrainedModel):
    """Vision encoder and adapter: ``pixel_values [T, 3, S, S]`` → features ``[T, tokens_per_tile, D_out]``.

    ``tokens_per_tile = (S / patch_size)² · pixel_shuffle_ratio²`` and ``D_out = projector_output_dim``; the
    features of all tiles, flattened in order, fill the ``<|patch|>`` placeholders after the projector.
    """

    config_class = Llama4VisionConfig
    config: Llama4VisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Llama4VisionEncoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_record_outputs = {"hidden_states": Llama4VisionEncoderLayer, "attentions": Llama4VisionAttention}

    def __init__(self, config: Llama4VisionConfig):
        super().__init__(config)
        num_patches = (
            square_side(config.image_size, "image_size") // square_side(config.patch_size, "patch_size")
        ) ** 2
        self.patch_embedding = Llama4VisionPatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(num_patches + 1, config.hidden_size))
        self.rotary_embedding = Llama4VisionRotaryEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.model = Llama4VisionEncoder(config)
        self.layernorm_post = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Llama4VisionModel):  # Meta's init: N(0, hidden_size^-1/2)
            init.normal_(module.class_embedding, std=self.config.hidden_size**-0.5)
            init.normal_(module.positional_embedding_vlm, std=self.config.hidden_size**-0.5)

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        """Adapter features of each tile as ``last_hidden_state [T, tokens_per_tile, D_out]``.

        With ``output_hidden_states``, ``hidden_states`` holds the encoder's input and each layer's output
        ``[T, N + 1, hidden]`` (class token last, before ``layernorm_post``).
        """
        hidden_states = self.patch_embedding(pixel_values.to(self.patch_embedding.linear.weight.dtype))
        class_token = self.class_embedding.to(hidden_states.dtype).expand(hidden_states.shape[0], 1, -1)
        hidden_states = torch.cat([hidden_states, class_token], dim=1)  # [T, N + 1, hidden], class token last
        hidden_states = self.layernorm_pre(hidden_states + self.positional_embedding_vlm.to(hidden_states.dtype))

        hidden_states = self.model(hidden_states, self.rotary_embedding(hidden_states), **kwargs)
        patches = self.layernorm_post(hidden_states)[:, :-1]  # [T, N, hidden]
        return BaseModelOutputWithPooling(last_hidden_state=self.vision_adapter(patches))


class Llama4MultiModalProjector(nn.Module):
    """``linear_1``: adapter features ``[..., vision_output_dim]`` → text embeddings ``[..., text hidden_size]``."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        vision_config = config.vision_config
        self.linear_1 = nn.Linear(
            vision_config.vision_output_dim,
            config.text_config.hidden_size,
            bias=vision_config.multi_modal_projector_bias,
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


__all__ = ["Llama4VisionModel", "Llama4MultiModalProjector"]
