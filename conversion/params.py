"""Meta's ``params.json`` (``llama_models.llama4.args.ModelArgs``): parsed, type-checked and validated as Meta's
code would, with Meta's formulas for the sizes it implies.

Every size comes from params.json through Meta's own formulas and defaults (``args.py``, ``model.py``, ``moe.py``,
``vision/``), never from a table of known models. The few numbers below are constants of Meta's *code*, which
params.json cannot change, and each names where it comes from. ``hf_config`` maps these args to config.json and
back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling_llama4.configuration_llama4 import square_side

from . import ConversionError

logger = logging.getLogger(__name__)

# Constants of Meta's code (llama_models 0.3.0), not of a checkpoint.
LLAMA3_LOW_FREQ_FACTOR = 1.0  # model.apply_scaling: low_freq_factor
LLAMA3_ORIGINAL_CONTEXT = 8192  # model.apply_scaling: old_context_len
DEFAULT_ROPE_SCALING_FACTOR = 16.0  # args.ModelArgs.validate, when use_scaled_rope and the factor is absent
DEFAULT_ROPE_HIGH_FREQ_FACTOR = 1.0  # args.ModelArgs.validate, likewise
VISION_ROPE_THETA = 10000.0  # vision.encoder.VisionEncoder.get_rope_freqs
VISION_NORM_EPS = 1e-5  # vision.encoder.LayerNorm: torch's default eps
IMAGE_CHANNELS = 3  # vision.encoder.VisionEncoder: conv1 in_channels

# Accepted without a warning though they do not shape the weights: generation-time settings Meta's loader passes
# next to params.json (``Llama4.build``), and ``head_dim``, which Meta's text attention ignores (dim // n_heads).
QUIET_KEYS = frozenset({"max_seq_len", "max_batch_size", "head_dim"})
# Context length written to config.json when the caller gives none: transformers' value for the base checkpoints.
DEFAULT_MAX_POSITION_EMBEDDINGS = 256 * 1024


@dataclass(frozen=True)
class MoEArgs:
    """``moe_args`` of params.json, with ``MoEArgs``' defaults."""

    num_experts: int
    top_k: int = 1
    interleave_moe_layer_step: int = 1
    capacity_factor: float = 1.0
    auto_scale_F: bool = True


@dataclass(frozen=True)
class VisionArgs:
    """``vision_args`` of params.json; tiles and patches are square, so one side each."""

    image_size: int
    patch_size: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: float
    output_dim: int
    pixel_shuffle_ratio: float

    @property
    def hidden_dim(self) -> int:
        """Encoder MLP width (``vision.encoder._TransformerBlock``)."""
        return int(self.mlp_ratio * self.dim)

    @property
    def adapter_input_dim(self) -> int:
        """Pixel-shuffled patch width entering the adapter (``vision.embedding.PixelShuffleMLP``)."""
        return int(self.dim // (self.pixel_shuffle_ratio**2))

    @property
    def num_positions(self) -> int:
        """Patches per tile plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class NativeArgs:
    """The model args of a native checkpoint, with ``ModelArgs``' defaults for what params.json leaves out."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_exp: float | None = None
    norm_eps: float = 1e-5
    attention_chunk_size: int | None = None
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None
    rope_high_freq_factor: float | None = None
    nope_layer_interval: int | None = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    moe_args: MoEArgs | None = None
    vision_args: VisionArgs | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # params.json as read (model args level)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], source: str = "params.json") -> NativeArgs:
        """Parse params.json's content (args may be nested under ``"model"``); raise ``ConversionError`` if invalid."""
        raw = dict(params["model"] if isinstance(params.get("model"), Mapping) else params)
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        _warn_ignored(raw, known, source)
        for name in ("dim", "n_layers", "n_heads"):
            if not isinstance(raw.get(name), int) or raw[name] <= 0:
                raise ConversionError(f"{source}: `{name}` must be a positive integer, got {raw.get(name)!r}")
        values = {k: v for k, v in raw.items() if k in known and k not in ("moe_args", "vision_args")}
        _check_types(values, cls, source)
        for name in ("moe_args", "vision_args"):
            if raw.get(name) is not None and not isinstance(raw[name], Mapping):
                raise ConversionError(f"{source}: `{name}` must be an object, got {raw[name]!r}")
        try:
            if raw.get("moe_args") is not None:
                moe = _known(raw["moe_args"], MoEArgs, f"{source} moe_args")
                _check_types(moe, MoEArgs, f"{source} moe_args")
                values["moe_args"] = MoEArgs(**moe)
            if raw.get("vision_args") is not None:
                values["vision_args"] = _vision_args(raw["vision_args"], source)
        except TypeError as error:
            raise ConversionError(f"{source}: {error}") from error
        args = cls(**values, raw=raw)
        args.validate(source)
        return args

    def validate(self, source: str = "params.json") -> None:
        """The checks of Meta's ``ModelArgs.validate`` and of the layers' constructors, as ``ConversionError``."""
        kv = self.kv_heads
        require(
            0 < kv <= self.n_heads and self.n_heads % kv == 0,
            source,
            f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})",
        )
        require(self.dim % self.n_heads == 0, source, f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        require(self.head_dim % 2 == 0, source, f"head_dim = dim / n_heads ({self.head_dim}) must be even for RoPE")
        require(self.multiple_of > 0, source, f"multiple_of must be positive, got {self.multiple_of}")
        for name in ("norm_eps", "rope_theta", "floor_scale"):
            value = getattr(self, name)
            require(
                math.isfinite(value) and value > 0, source, f"{name} must be a finite positive number, got {value}"
            )
        require(math.isfinite(self.attn_scale), source, f"attn_scale must be a finite number, got {self.attn_scale}")
        require(
            self.attention_chunk_size is None or self.attention_chunk_size > 0,
            source,
            f"attention_chunk_size must be positive or null (no chunking), got {self.attention_chunk_size}",
        )
        if self.use_scaled_rope:
            minimums = {"rope_scaling_factor": 1, "rope_high_freq_factor": LLAMA3_LOW_FREQ_FACTOR}
            for name, minimum in minimums.items():
                value = getattr(self, name)
                require(
                    value is None or math.isfinite(value) and value >= minimum,
                    source,
                    f"{name} must be a finite number >= {minimum}, got {value}",
                )
        if self.moe_args is not None:
            moe = self.moe_args
            require(moe.num_experts > 0, source, f"moe_args.num_experts must be positive, got {moe.num_experts}")
            require(
                1 <= moe.top_k <= moe.num_experts,
                source,
                f"moe_args.top_k must be in [1, num_experts], got {moe.top_k}",
            )
            require(moe.interleave_moe_layer_step > 0, source, "moe_args.interleave_moe_layer_step must be positive")
            require(
                math.isfinite(moe.capacity_factor) and moe.capacity_factor >= 0,
                source,
                f"moe_args.capacity_factor must be a finite number >= 0, got {moe.capacity_factor}",
            )
            require(
                self.ffn_exp is not None and self.ffn_dim_multiplier is not None,
                source,
                "an MoE model (moe_args) needs ffn_exp and ffn_dim_multiplier to size its experts",
            )
        for name in ("ffn_exp", "ffn_dim_multiplier"):
            value = getattr(self, name)
            require(
                value is None or math.isfinite(value) and value > 0,
                source,
                f"{name} must be a finite positive number or null, got {value}",
            )
        if self.vision_args is not None:
            vision = self.vision_args
            for name in ("image_size", "patch_size", "dim", "n_layers", "n_heads", "output_dim"):
                value = getattr(vision, name)
                require(value > 0, source, f"vision_args.{name} must be positive, got {value}")
            require(
                math.isfinite(vision.mlp_ratio) and vision.mlp_ratio > 0,
                source,
                f"vision_args.mlp_ratio must be a finite positive number, got {vision.mlp_ratio}",
            )
            grid = vision.image_size / vision.patch_size
            ratio = vision.pixel_shuffle_ratio
            require(
                0 < ratio <= 1 and (grid * ratio).is_integer(),
                source,
                f"vision_args.pixel_shuffle_ratio must be in (0, 1] and turn the {grid:g} patches per side into a "
                f"whole number, got {ratio}",
            )
            require(vision.dim % vision.n_heads == 0, source, "vision_args.n_heads must divide vision_args.dim")
            require(
                vision.image_size % vision.patch_size == 0,
                source,
                f"vision_args.patch_size ({vision.patch_size}) must divide image_size ({vision.image_size})",
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Meta's text attention uses ``dim // n_heads`` (the ``head_dim`` arg only sizes the vision encoder's)."""
        return self.dim // self.n_heads

    @property
    def moe_hidden_dim(self) -> int | None:
        """Width of each routed expert and of the shared expert; None for a dense model."""
        if self.moe_args is None:
            return None
        moe = self.moe_args
        return moe_hidden_dim(
            self.dim, self.ffn_exp, self.ffn_dim_multiplier, self.multiple_of, moe.auto_scale_F, moe.capacity_factor
        )

    @property
    def dense_hidden_dim(self) -> int:
        """Width of the SwiGLU FFN of the dense (non-MoE) layers."""
        return dense_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_args is not None and (layer + 1) % self.moe_args.interleave_moe_layer_step == 0

    def is_nope_layer(self, layer: int) -> bool:
        return self.nope_layer_interval is not None and (layer + 1) % self.nope_layer_interval == 0

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers' ``rope_parameters``: Meta's llama3-style scaling when ``use_scaled_rope``."""
        if not self.use_scaled_rope:
            return {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        factor = DEFAULT_ROPE_SCALING_FACTOR if self.rope_scaling_factor is None else self.rope_scaling_factor
        high = DEFAULT_ROPE_HIGH_FREQ_FACTOR if self.rope_high_freq_factor is None else self.rope_high_freq_factor
        return {
            "rope_type": "llama3",
            "rope_theta": float(self.rope_theta),
            "factor": float(factor),
            "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": float(high),
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
        }

    def to_params(self) -> dict[str, Any]:
        """params.json content (unset optionals left out), which ``from_dict`` and Meta's ``ModelArgs`` read back."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}
        if self.moe_args is not None:
            params["moe_args"] = dataclasses.asdict(self.moe_args)
        if self.vision_args is not None:
            vision = dataclasses.asdict(self.vision_args)
            for name in ("image_size", "patch_size"):
                vision[name] = {"height": vision[name], "width": vision[name]}
            params["vision_args"] = vision
        return {name: value for name, value in params.items() if value is not None}


def load_params(input_dir: Path) -> NativeArgs:
    """Read ``input_dir/params.json``; ``ConversionError`` naming the file when it is missing or invalid."""
    path = input_dir / "params.json"
    if not input_dir.is_dir():
        raise ConversionError(f"input folder {input_dir} does not exist or is not a folder")
    if not path.is_file():
        raise ConversionError(f"missing {path}: a native Llama 4 checkpoint has params.json next to its shards")
    return NativeArgs.from_dict(read_json_object(path), source=str(path))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a :class:`ConversionError` naming the file (not UTF-8 JSON, not an object)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not valid UTF-8 JSON: {error}") from error
    if not isinstance(content, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


# ----------------------------------------------------------------------------------------------------------------
# Meta's FFN sizing formulas


def _round_up(value: int, multiple: int) -> int:
    return value + (-value % multiple)


def dense_hidden_dim(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """``model.TransformerBlock``: ``int(2 * 4 dim / 3)``, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * int(4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return _round_up(hidden, multiple_of)


def moe_hidden_dim(
    dim: int,
    ffn_exp: float,
    ffn_dim_multiplier: float,
    multiple_of: int,
    auto_scale_F: bool,
    capacity_factor: float,
) -> int:
    """``moe.MoE``: ``int(2 ffn_exp dim / 3)``, times the multiplier, ``/ (capacity_factor + 1)`` when
    ``auto_scale_F`` (same active parameters as a dense layer), rounded up to ``multiple_of``."""
    hidden = int(2 * int(ffn_exp * dim) / 3)
    hidden = int(ffn_dim_multiplier * hidden)
    if auto_scale_F:
        hidden = int(hidden / (capacity_factor + 1))
    return _round_up(hidden, multiple_of)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def require(condition: bool, source: str, message: str) -> None:
    """Raise ``ConversionError("{source}: {message}")`` unless ``condition``."""
    if not condition:
        raise ConversionError(f"{source}: {message}")


def _known(values: Mapping[str, Any], cls, source: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    _warn_ignored(values, names, source)
    return {k: v for k, v in values.items() if k in names}


# JSON types accepted for the annotations of the args dataclasses (an int is a valid float; a bool is no number).
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def _check_types(values: Mapping[str, Any], cls, source: str) -> None:
    """``ConversionError`` naming the first field of ``values`` whose JSON type ``cls`` does not accept."""
    for f in dataclasses.fields(cls):
        kinds = [kind.strip() for kind in str(f.type).split("|")]
        if f.name not in values or not set(kinds) <= _JSON_TYPES.keys():
            continue
        value, allowed = values[f.name], tuple(t for kind in kinds for t in _JSON_TYPES[kind])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join("null" if kind == "None" else kind for kind in kinds)
            raise ConversionError(f"{source}: `{f.name}` must be {expected}, got {value!r}")


def _warn_ignored(values: Mapping[str, Any], known: set[str], source: str) -> None:
    ignored = sorted(set(values) - set(known) - QUIET_KEYS)
    if ignored:
        logger.warning("%s: ignoring keys that do not describe the weights: %s", source, ", ".join(ignored))


def _vision_args(values: Mapping[str, Any], source: str) -> VisionArgs:
    vision = _known(values, VisionArgs, f"{source} vision_args")
    try:
        vision["image_size"] = square_side(vision["image_size"], "vision_args.image_size")
        vision["patch_size"] = square_side(vision["patch_size"], "vision_args.patch_size")
    except (KeyError, TypeError, ValueError) as error:
        raise ConversionError(f"{source}: vision_args.image_size / patch_size: {error!r}") from error
    _check_types(vision, VisionArgs, f"{source} vision_args")
    return VisionArgs(**vision)
