"""The Hugging Face config.json of a native checkpoint, and the params.json that gives back an HF config's sizes.

- params.json → config.json (``build_hf_config``): each field from Meta's args and the converted tokenizer's ids.
- config.json → params.json (``native_args_from_config``): params.json cannot hold sizes directly, only the args
  Meta derives them from (``multiple_of``, ``ffn_dim_multiplier``, ``ffn_exp``, ``moe_args.capacity_factor`` /
  ``auto_scale_F``), and several args give the same sizes: round values are tried first, exact ones constructed
  otherwise, and the result is always checked against the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from modeling_llama4.configuration_llama4 import square_side

from . import ConversionError
from .params import (
    IMAGE_CHANNELS,
    LLAMA3_LOW_FREQ_FACTOR,
    LLAMA3_ORIGINAL_CONTEXT,
    VISION_NORM_EPS,
    VISION_ROPE_THETA,
    MoEArgs,
    NativeArgs,
    VisionArgs,
    dense_hidden_dim,
    moe_hidden_dim,
    require,
)

# ----------------------------------------------------------------------------------------------------------------
# params.json -> config.json


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the configs carry, read from the converted tokenizer."""

    bos: int
    eos: int | list[int]
    pad: int
    image: int  # <|patch|>: the placeholders that the vision features replace
    image_start: int
    image_end: int


def text_config_kwargs(
    args: NativeArgs, vocab_size: int, tokens: SpecialTokenIds, max_position_embeddings: int
) -> dict[str, Any]:
    """``Llama4TextConfig`` fields for ``args``; ``vocab_size`` comes from the embedding's shape."""
    moe = args.moe_args
    n = args.n_layers
    return dict(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        # A dense model has no experts; its unused expert width is set to the dense one.
        intermediate_size=args.moe_hidden_dim or args.dense_hidden_dim,
        intermediate_size_mlp=args.dense_hidden_dim,
        num_hidden_layers=n,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        rope_parameters=args.rope_parameters,
        no_rope_layers=[int(not args.is_nope_layer(i)) for i in range(n)],
        # Without NoPE layers, an interval past the last layer describes the same (all-RoPE) list.
        no_rope_layer_interval=args.nope_layer_interval or n + 1,
        attention_chunk_size=args.attention_chunk_size,
        use_qk_norm=args.use_qk_norm,
        attn_temperature_tuning=args.attn_temperature_tuning,
        floor_scale=_int_if_integral(args.floor_scale),
        attn_scale=args.attn_scale,
        num_local_experts=moe.num_experts if moe else 0,
        num_experts_per_tok=moe.top_k if moe else 1,
        interleave_moe_layer_step=moe.interleave_moe_layer_step if moe else 1,
        moe_layers=[i for i in range(n) if args.is_moe_layer(i)],
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        tie_word_embeddings=False,
    )


def vision_config_kwargs(vision: VisionArgs) -> dict[str, Any]:
    """``Llama4VisionConfig`` fields: the adapter's and projector's widths are all ``output_dim``."""
    return dict(
        hidden_size=vision.dim,
        num_hidden_layers=vision.n_layers,
        num_attention_heads=vision.n_heads,
        intermediate_size=vision.hidden_dim,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
        vision_output_dim=vision.output_dim,
        projector_input_dim=vision.output_dim,
        projector_output_dim=vision.output_dim,
        norm_eps=VISION_NORM_EPS,
        num_channels=IMAGE_CHANNELS,
        rope_parameters={"rope_type": "default", "rope_theta": VISION_ROPE_THETA},
    )


def build_hf_config(
    args: NativeArgs, vocab_size: int, tokens: SpecialTokenIds, max_position_embeddings: int, dtype: str
):
    """``Llama4Config`` (with vision) or ``Llama4TextConfig`` (text-only checkpoint) for a native checkpoint."""
    from modeling_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig

    text = text_config_kwargs(args, vocab_size, tokens, max_position_embeddings)
    if args.vision_args is None:
        return Llama4TextConfig(**text, architectures=["Llama4ForCausalLM"], dtype=dtype)
    return Llama4Config(
        text_config=Llama4TextConfig(**text, dtype=dtype),
        vision_config=Llama4VisionConfig(**vision_config_kwargs(args.vision_args), dtype=dtype),
        boi_token_index=tokens.image_start,
        eoi_token_index=tokens.image_end,
        image_token_index=tokens.image,
        tie_word_embeddings=False,
        architectures=["Llama4ForConditionalGeneration"],
        dtype=dtype,
    )


def _int_if_integral(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


# ----------------------------------------------------------------------------------------------------------------
# config.json -> params.json


def native_args_from_config(config) -> NativeArgs:
    """params.json values for an HF Llama 4 config (``Llama4Config`` or ``Llama4TextConfig``).

    Raises ``ConversionError`` for configs Meta's code cannot express (custom head_dim, irregular MoE or NoPE
    layer patterns, other RoPE scalings).
    """
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    n = text.num_hidden_layers
    require(
        text.head_dim == text.hidden_size // text.num_attention_heads,
        "config.json",
        f"head_dim {text.head_dim} != hidden_size / num_attention_heads: Meta's attention cannot express it",
    )
    moe_step = _interval(sorted(text.moe_layers), n, "moe_layers")
    nope_interval = _interval([i for i in range(n) if not text.no_rope_layers[i]], n, "no_rope_layers")
    moe_hidden = text.intermediate_size if moe_step else None
    ffn = solve_ffn_args(text.hidden_size, moe_hidden, text.intermediate_size_mlp)
    moe_args = None
    if moe_step:
        moe_args = MoEArgs(
            num_experts=text.num_local_experts,
            top_k=text.num_experts_per_tok,
            interleave_moe_layer_step=moe_step,
            capacity_factor=ffn.capacity_factor,
            auto_scale_F=ffn.auto_scale_F,
        )
    args = NativeArgs(
        dim=text.hidden_size,
        n_layers=n,
        n_heads=text.num_attention_heads,
        n_kv_heads=text.num_key_value_heads,
        vocab_size=text.vocab_size,
        multiple_of=ffn.multiple_of,
        ffn_dim_multiplier=ffn.ffn_dim_multiplier,
        ffn_exp=ffn.ffn_exp if moe_step else None,
        norm_eps=text.rms_norm_eps,
        attention_chunk_size=text.attention_chunk_size,
        nope_layer_interval=nope_interval,
        use_qk_norm=text.use_qk_norm,
        attn_temperature_tuning=bool(text.attn_temperature_tuning),
        floor_scale=float(text.floor_scale),
        attn_scale=text.attn_scale,
        moe_args=moe_args,
        vision_args=_vision_args_from_config(vision) if vision is not None else None,
        **_rope_args_from_config(text.rope_parameters),
    )
    args.validate("config.json")
    return args


@dataclass(frozen=True)
class FfnArgs:
    multiple_of: int
    ffn_dim_multiplier: float
    ffn_exp: float
    auto_scale_F: bool
    capacity_factor: float


def solve_ffn_args(dim: int, moe_hidden: int | None, dense_hidden: int) -> FfnArgs:
    """Sizing args that give ``moe_hidden`` (unless None) and ``dense_hidden`` through Meta's formulas.

    Tries round values first (multiple_of a power of two, multipliers on a coarse grid, Meta's default capacity
    factor), which finds Meta's own kind of params.json for its kind of sizes; otherwise constructs exact,
    unrounded values. The result is always checked against the formulas.
    """
    for candidate in _round_ffn_candidates(dim, moe_hidden, dense_hidden):
        if _reproduces(candidate, dim, moe_hidden, dense_hidden):
            return candidate
    candidate = _exact_ffn_args(dim, moe_hidden, dense_hidden)
    if not _reproduces(candidate, dim, moe_hidden, dense_hidden):
        raise ConversionError(
            f"found no params.json FFN args giving intermediate_size={moe_hidden}, "
            f"intermediate_size_mlp={dense_hidden} for dim={dim}"
        )
    return candidate


def _reproduces(ffn: FfnArgs, dim: int, moe_hidden: int | None, dense_hidden: int) -> bool:
    if dense_hidden_dim(dim, ffn.ffn_dim_multiplier, ffn.multiple_of) != dense_hidden:
        return False
    return moe_hidden is None or moe_hidden == moe_hidden_dim(
        dim, ffn.ffn_exp, ffn.ffn_dim_multiplier, ffn.multiple_of, ffn.auto_scale_F, ffn.capacity_factor
    )


def _round_ffn_candidates(dim: int, moe_hidden: int | None, dense_hidden: int) -> Iterator[FfnArgs]:
    common = math.gcd(dense_hidden, moe_hidden or dense_hidden)
    multiples = [2**k for k in range(common.bit_length(), -1, -1) if common % 2**k == 0]
    multipliers = [x / 20 for x in range(20, 81)] + [x / 20 for x in range(19, 0, -1)]
    exps = sorted((x / 4 for x in range(1, 65)), key=lambda e: (e % 1 != 0, e % 0.5 != 0, e)) if moe_hidden else [1.0]
    for multiple_of in multiples:
        for multiplier in multipliers:
            if dense_hidden_dim(dim, multiplier, multiple_of) != dense_hidden:
                continue
            for auto_scale in (True, False):  # Meta's default first
                for exp in exps:  # whole numbers first, then halves, then quarters
                    yield FfnArgs(multiple_of, multiplier, exp, auto_scale, 1.0)


def _exact_ffn_args(dim: int, moe_hidden: int | None, dense_hidden: int) -> FfnArgs:
    """multiple_of 1 and the multiplier that hits ``dense_hidden`` exactly; then an ``ffn_exp`` (and, when the
    multiplier skips ``moe_hidden``, a capacity factor) that hits the expert width."""
    base = int(2 * int(4 * dim) / 3)
    multiplier = (dense_hidden + 0.5) / base
    if moe_hidden is None:
        return FfnArgs(1, multiplier, 1.0, False, 1.0)
    start = max(1, int(moe_hidden / multiplier) - 1)
    for x in range(start, start + 4):  # x = int(2 int(ffn_exp dim) / 3), before the multiplier
        if int(multiplier * x) == moe_hidden:
            return FfnArgs(1, multiplier, _ffn_exp_for(x, dim), False, 1.0)
    x = math.ceil((moe_hidden + 1) / multiplier) + 1
    scaled = int(multiplier * x)
    return FfnArgs(1, multiplier, _ffn_exp_for(x, dim), True, scaled / (moe_hidden + 0.5) - 1)


def _ffn_exp_for(x: int, dim: int) -> float:
    """An ``ffn_exp`` with ``int(2 * int(ffn_exp * dim) / 3) == x``."""
    k = math.ceil(3 * x / 2)
    return (k + 0.5) / dim


def _interval(layers: list[int], n_layers: int, field_name: str) -> int | None:
    """k such that ``layers`` are exactly the layers ``i`` with ``(i + 1) % k == 0`` (None when empty)."""
    if not layers:
        return None
    step = layers[0] + 1
    if layers != list(range(step - 1, n_layers, step)):
        raise ConversionError(
            f"config.json {field_name} selects layers {layers}, not every k-th layer: params.json cannot express it"
        )
    return step


def _rope_args_from_config(rope: Mapping[str, Any]) -> dict[str, Any]:
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {"rope_theta": rope["rope_theta"]}
    require(
        kind == "llama3"
        and rope["low_freq_factor"] == LLAMA3_LOW_FREQ_FACTOR
        and rope["original_max_position_embeddings"] == LLAMA3_ORIGINAL_CONTEXT,
        "config.json",
        f"rope_parameters {dict(rope)}: Meta's code has only llama3 scaling with low_freq_factor "
        f"{LLAMA3_LOW_FREQ_FACTOR} and original_max_position_embeddings {LLAMA3_ORIGINAL_CONTEXT}",
    )
    return {
        "rope_theta": rope["rope_theta"],
        "use_scaled_rope": True,
        "rope_scaling_factor": rope["factor"],
        "rope_high_freq_factor": rope["high_freq_factor"],
    }


def _vision_args_from_config(vision) -> VisionArgs:
    require(
        vision.vision_output_dim == vision.projector_input_dim == vision.projector_output_dim,
        "config.json",
        "vision_output_dim, projector_input_dim and projector_output_dim differ: Meta's adapter has one output_dim",
    )
    theta = (vision.rope_parameters or {}).get("rope_theta", VISION_ROPE_THETA)
    require(
        theta == VISION_ROPE_THETA,
        "config.json",
        f"vision rope_theta {theta}: Meta's encoder uses {VISION_ROPE_THETA}",
    )
    require(
        vision.norm_eps == VISION_NORM_EPS,
        "config.json",
        f"vision norm_eps {vision.norm_eps}: Meta's is {VISION_NORM_EPS}",
    )
    mlp_ratio = vision.intermediate_size / vision.hidden_size
    require(int(mlp_ratio * vision.hidden_size) == vision.intermediate_size, "config.json", "vision intermediate_size")
    return VisionArgs(
        image_size=square_side(vision.image_size, "vision_config.image_size"),
        patch_size=square_side(vision.patch_size, "vision_config.patch_size"),
        dim=vision.hidden_size,
        n_layers=vision.num_hidden_layers,
        n_heads=vision.num_attention_heads,
        mlp_ratio=mlp_ratio,
        output_dim=vision.vision_output_dim,
        pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
    )
