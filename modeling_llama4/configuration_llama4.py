"""Llama 4 configurations: text backbone, vision encoder, and the multimodal wrapper.

Field names, defaults and the config.json schema are those of transformers' built-in Llama 4, so official
Hugging Face checkpoints load unchanged. Unlike the built-in, every config validates itself on construction and
names the bad field, its value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils.quantization_config import FbgemmFp8Config

# The scalar types a field annotation names, as the values config.json can hold for them (ints are valid floats).
_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"Invalid Llama 4 config: `{field}` = {value!r}; {allowed}.")


def _check_scalar_types(config: PreTrainedConfig) -> None:
    """A ``ValueError`` naming the field for a scalar of the wrong type (say a string in a hand-edited config.json).

    Runs before the value checks, which would otherwise fail with a ``TypeError`` comparing it. Fields whose
    annotation is not made of scalars (lists, dicts, sub-configs) are checked by the value checks.
    """
    for name, annotation in type(config).__annotations__.items():
        parts = str(annotation).split(" | ")
        if not all(part in _SCALAR_TYPES for part in parts):
            continue
        value = getattr(config, name)
        allowed = tuple(kind for part in parts for kind in _SCALAR_TYPES[part])
        is_bool_as_number = isinstance(value, bool) and bool not in allowed
        _require(isinstance(value, allowed) and not is_bool_as_number, name, value, f"expected {annotation}")


def _check_int_list(field: str, value) -> None:
    _require(
        isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value),
        field,
        value,
        "expected a list of integers",
    )


def _check_activation(config: PreTrainedConfig) -> None:
    _require(
        config.hidden_act in ACT2FN,
        "hidden_act",
        config.hidden_act,
        "expected an activation name of transformers' ACT2FN, say 'silu' or 'gelu'",
    )


def _is_positive_number(value) -> bool:
    """A finite number > 0 (not a bool): ``inf`` or ``nan`` here would make RoPE or a scale degenerate silently."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_positive(field: str, value, what: str = "a positive number") -> None:
    _require(_is_positive_number(value), field, value, f"expected {what}: finite and > 0")


def _check_rope_theta(rope_parameters: dict | None) -> None:
    theta = (rope_parameters or {}).get("rope_theta")
    if theta is not None:
        _check_positive("rope_parameters['rope_theta']", theta, "a positive number (the RoPE base)")


class Fp8ForLlama4:
    """Config mixin: an ``FbgemmFp8Config`` set as ``quantization_config`` is kept as a ``Llama4Fp8Config``.

    transformers sets it while loading (the one read from ``config.json``, or ``from_pretrained(...,
    quantization_config=FbgemmFp8Config())``) and then picks the quantizer it names: this package's FP8 quantizer
    (``quantization_fp8``) for these configs, transformers' own for every other model. It is saved as ``fbgemm_fp8``.
    """

    def __setattr__(self, key: str, value) -> None:
        if key == "quantization_config" and type(value) is FbgemmFp8Config:
            from .quantization_fp8 import Llama4Fp8Config

            value = Llama4Fp8Config.from_fbgemm(value)
        super().__setattr__(key, value)


@strict
class Llama4VisionConfig(PreTrainedConfig):
    """Vision encoder (ViT with 2D RoPE) and pixel-shuffle adapter of Llama 4.

    ``image_size`` is the tile size in pixels; each tile yields ``(image_size / patch_size)**2 *
    pixel_shuffle_ratio**2`` tokens. ``vision_output_dim`` is the adapter's output width, projected to the text
    hidden size by ``multi_modal_projector``.
    """

    model_type = "llama4_vision_model"
    base_config_key = "vision_config"
    base_model_tp_plan = {
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "vision_adapter.mlp.fc1": "colwise",
        "vision_adapter.mlp.fc2": "rowwise",
        "patch_embedding.linear": "colwise_gather_output",
    }
    # FSDP2 keeps the vision tower in the root unit, gathered on every forward: a rank whose batch holds no image
    # skips the tower, so units of its own would mismatch the ranks' all-gathers (mixed batches fail).
    base_model_fsdp_plan = {}

    hidden_size: int = 768
    hidden_act: str = "gelu"
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632
    vision_output_dim: int = 7680
    image_size: int | list[int] | tuple[int, int] = 448
    patch_size: int | list[int] | tuple[int, int] = 14
    norm_eps: float = 1e-5
    vision_feature_select_strategy: str = "default"
    initializer_range: float = 0.02
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    multi_modal_projector_bias: bool = False
    projector_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()

    def _check_values(self):
        """Raise a ``ValueError`` naming the field for sizes that the encoder cannot be built with."""
        _check_scalar_types(self)
        _check_activation(self)
        _check_rope_theta(self.rope_parameters)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "expected a positive integer")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            f"must divide hidden_size ({self.hidden_size})",
        )
        image_size = square_side(self.image_size, "image_size")
        patch_size = square_side(self.patch_size, "patch_size")
        _require(
            patch_size > 0 and image_size % patch_size == 0,
            "patch_size",
            self.patch_size,
            f"must be positive and divide image_size ({self.image_size})",
        )
        _require(
            0 < self.pixel_shuffle_ratio <= 1, "pixel_shuffle_ratio", self.pixel_shuffle_ratio, "expected 0 < r <= 1"
        )
        grid = image_size // patch_size
        shuffled = grid * self.pixel_shuffle_ratio
        _require(
            abs(shuffled - round(shuffled)) < 1e-6,
            "pixel_shuffle_ratio",
            self.pixel_shuffle_ratio,
            f"the patch grid side ({grid}) times the ratio must be an integer",
        )


def square_side(size: int | Sequence[int] | Mapping[str, int], field: str) -> int:
    """The side of a square tile or patch size: an int, a pair of equal ints, or ``{"height": s, "width": s}``.

    Raises a ``ValueError`` naming ``field`` otherwise: Llama 4 tiles and patches are square.
    """
    if isinstance(size, Mapping):
        size = (size.get("height"), size.get("width"))
    if isinstance(size, int):
        return size
    _require(len(size) == 2 and size[0] == size[1], field, size, "expected an int or a pair of equal ints")
    return int(size[0])


@strict
class Llama4TextConfig(Fp8ForLlama4, PreTrainedConfig):
    """Llama 4 text backbone: GQA attention with iRoPE (RoPE layers, chunked; NoPE layers, global) and MoE.

    Derived per-layer fields, as in transformers: ``no_rope_layers[i]`` is 1 for a RoPE layer and 0 for a NoPE
    layer (default: every ``no_rope_layer_interval``-th layer is NoPE), ``moe_layers`` lists the MoE layer indices
    (default: every ``interleave_moe_layer_step``-th layer), and ``layer_types`` is ``"chunked_attention"`` for
    RoPE layers when ``attention_chunk_size`` is set, else ``"full_attention"``.
    """

    model_type = "llama4_text"
    default_theta = 500000.0
    base_model_tp_plan = {
        "layers.*.self_attn": "llama4_attention",  # refuses a tp size that cuts KV heads apart (parallel.py)
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        # MoE layers (see parallel.py): the shared and routed experts sharded along their hidden dim, computed on
        # local shards with the sparse dispatch, one all-reduce of their summed partial outputs.
        "layers.*.feed_forward.shared_expert.gate_proj.weight": "colwise",
        "layers.*.feed_forward.shared_expert.up_proj.weight": "colwise",
        "layers.*.feed_forward.shared_expert.down_proj.weight": "rowwise",
        "layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
        "layers.*.feed_forward.experts.down_proj": "colwise",
        "layers.*.feed_forward": "llama4_moe",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }
    # Expert parallel (see parallel.py): E/W whole experts per rank, tokens brought by transformers' EP dispatch.
    base_model_ep_plan = {
        "layers.*.feed_forward.experts.gate_up_proj": "llama4_grouped_gemm",
        "layers.*.feed_forward.experts.down_proj": "llama4_grouped_gemm",
        "layers.*.feed_forward.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float | int = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_parameters: RopeParameters | dict | None = None
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_scalar_types(self)  # before the derived fields below compare or count with them
        _require(
            self.no_rope_layer_interval is not None and self.no_rope_layer_interval > 0,
            "no_rope_layer_interval",
            self.no_rope_layer_interval,
            "expected a positive integer",
        )
        _require(
            self.interleave_moe_layer_step > 0,
            "interleave_moe_layer_step",
            self.interleave_moe_layer_step,
            "expected a positive integer",
        )
        if not self.no_rope_layers:
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers)
            ]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
        if self.layer_types is None:
            self.layer_types = [
                "chunked_attention" if use_rope and self.attention_chunk_size is not None else "full_attention"
                for use_rope in self.no_rope_layers
            ]
        super().__post_init__(**kwargs)
        self._check_values()

    def validate_rope(self) -> None:
        """RoPE checks, run on construction and by ``validate()`` (``save_pretrained``); errors name the field.

        Meta's llama3 scaling is checked here rather than by transformers, whose check warns about Scout's own
        parameters (``high_freq_factor == low_freq_factor == 1``: no blended band, which Meta's formula allows).
        Other RoPE types get transformers' checks as well.
        """
        params = self.rope_parameters
        _require(isinstance(params, dict), "rope_parameters", params, "expected a dict")
        _check_rope_theta(params)
        if params.get("rope_type", "default") != "llama3":
            super().validate_rope()
            return
        required = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        missing = sorted(required - set(params))
        _require(not missing, "rope_parameters", params, f"llama3 scaling needs {missing}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _check_positive(f"rope_parameters[{name!r}]", params[name])
        _require(params["factor"] >= 1, "rope_parameters['factor']", params["factor"], "expected >= 1")
        _require(
            params["high_freq_factor"] >= params["low_freq_factor"],
            "rope_parameters['high_freq_factor']",
            params["high_freq_factor"],
            f"expected >= low_freq_factor ({params['low_freq_factor']})",
        )

    def _check_values(self):
        """Raise a ``ValueError`` naming the field, its value and what is allowed, for an unbuildable config."""
        _check_activation(self)
        for name in ("moe_layers", "no_rope_layers"):
            _check_int_list(name, getattr(self, name))
        for name in (
            "max_position_embeddings",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "intermediate_size_mlp",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            _require(value > 0, name, value, "expected a positive integer")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            f"must divide hidden_size ({self.hidden_size})",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            self.num_key_value_heads,
            f"must divide num_attention_heads ({self.num_attention_heads})",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        _require(
            self.attention_chunk_size is None or self.attention_chunk_size > 0,
            "attention_chunk_size",
            self.attention_chunk_size,
            "expected a positive integer or None (no chunking)",
        )
        _require(self.num_local_experts >= 0, "num_local_experts", self.num_local_experts, "must not be negative")
        if self.moe_layers:
            _require(self.num_local_experts > 0, "num_local_experts", self.num_local_experts, "MoE layers need >= 1")
            _require(
                1 <= self.num_experts_per_tok <= self.num_local_experts,
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"expected 1 <= top-k <= num_local_experts ({self.num_local_experts})",
            )
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        _require(not bad_layers, "moe_layers", self.moe_layers, f"indices must lie in [0, {self.num_hidden_layers})")
        _require(
            len(self.no_rope_layers) >= self.num_hidden_layers and set(self.no_rope_layers) <= {0, 1},
            "no_rope_layers",
            self.no_rope_layers,
            f"expected {self.num_hidden_layers} flags of 1 (RoPE) or 0 (NoPE)",
        )
        _require(
            self.pad_token_id is None or 0 <= self.pad_token_id < self.vocab_size,
            "pad_token_id",
            self.pad_token_id,
            f"expected None or a token id in [0, vocab_size={self.vocab_size})",
        )
        for name in ("floor_scale", "rms_norm_eps"):
            _check_positive(name, getattr(self, name))
        _require(math.isfinite(self.attn_scale), "attn_scale", self.attn_scale, "expected a finite number")
        self.validate_rope()


@strict
class Llama4Config(Fp8ForLlama4, PreTrainedConfig):
    """Multimodal Llama 4: a text backbone, a vision encoder, and the special token ids that join them."""

    model_type = "llama4"
    attribute_map = {
        "image_token_id": "image_token_index",
        "boi_token_id": "boi_token_index",
        "eoi_token_id": "eoi_token_index",
    }
    sub_configs_defaults = {"text_config": Llama4TextConfig, "vision_config": Llama4VisionConfig}
    base_model_tp_plan = {"multi_modal_projector.linear_1": "colwise_gather_output"}
    base_model_fsdp_plan = {}  # the language model's FSDP2 units are its own plan's (prefixed `language_model.`)

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    image_token_index: int = 200092
    tie_word_embeddings: bool = False


__all__ = ["Llama4Config", "Llama4TextConfig", "Llama4VisionConfig"]
