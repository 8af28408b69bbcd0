"""Weight-only int4 for Llama 4's routed experts, and the model's memory on paper.

Format. Each expert weight ``w [E, K, N]`` (``K`` the reduction dim: ``D`` for ``gate_up_proj [E, D, 2I]``, ``I``
for ``down_proj [E, I, D]``) is split into groups of ``G`` consecutive rows along ``K``. Symmetric round-to-nearest:

    scale [E, K/G, N] = absmax(group) / 7 (bfloat16),   q = clamp(round(w / scale), -8, 7),   ŵ = q · scale

so ``|w - ŵ| <= scale / 2`` element-wise. ``q + 8`` is stored as a nibble, two per byte along ``K`` (row ``2j`` in the
low nibble, row ``2j + 1`` in the high one): ``qweight [E, K/2, N]`` uint8. An expert module keeps
``gate_up_proj_qweight``, ``gate_up_proj_scales``, ``down_proj_qweight``, ``down_proj_scales`` (persistent buffers,
the checkpoint names), i.e. ``0.5 + 2 / G`` bytes per weight. Attention, shared expert, dense MLPs, router,
embeddings, head and vision stay in the model's dtype.

Compute (pure PyTorch): the routed rows arrive sorted by expert; only the experts that received tokens are
dequantized, one at a time, to the activation dtype, then multiplied.

transformers integration: ``from_pretrained(..., quantization_config=Llama4Int4Config(group_size=128))`` swaps every
``Llama4TextExperts`` for ``Llama4Int4TextExperts`` on the meta device and quantizes each fused expert tensor as it is
read (transformers loads on-the-fly-quantized models one tensor at a time); ``save_pretrained`` writes the packed
buffers and ``quantization_config`` (``quant_method: "llama4_int4"``), which ``from_pretrained`` loads back as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .moe import Llama4TextExperts

logger = logging.get_logger(__name__)

QUANT_METHOD = "llama4_int4"
SCALE_DTYPE = torch.bfloat16
INT4_MIN, INT4_MAX = -8, 7
PROJECTIONS = ("gate_up_proj", "down_proj")


# --- int4 tensors -------------------------------------------------------------------------------------------------


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

    ``gate_up_proj [E, D, 2I]``, ``down_proj [E, I, D]`` → the four tensors an ``Llama4Int4TextExperts`` loads,
    keyed by their names under the experts module (``gate_up_proj_qweight`` …). One expert at a time, so the peak
    extra memory is one expert's float32 copy.
    """
    tensors = {}
    for name, weight in zip(PROJECTIONS, (gate_up_proj, down_proj)):
        pairs = [quantize_int4(expert, group_size) for expert in weight]
        tensors[f"{name}_qweight"] = torch.stack([qweight for qweight, _ in pairs])
        tensors[f"{name}_scales"] = torch.stack([scales for _, scales in pairs])
    return tensors


# --- the quantized experts module ---------------------------------------------------------------------------------


class Llama4Int4TextExperts(nn.Module):
    """``Llama4TextExperts`` with int4 weights (see the module docstring); same ``forward``.

    Buffers: ``gate_up_proj_qweight [E, D/2, 2I]``, ``gate_up_proj_scales [E, D/G, 2I]``,
    ``down_proj_qweight [E, I/2, D]``, ``down_proj_scales [E, I/G, D]``.
    """

    def __init__(self, config: Llama4TextConfig, group_size: int):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.group_size = group_size
        check_group_size(group_size, self.hidden_size, "hidden_size")
        check_group_size(group_size, self.intermediate_size, "intermediate_size")
        experts, hidden, inner = self.num_experts, self.hidden_size, self.intermediate_size
        for name, k, n in (("gate_up_proj", hidden, 2 * inner), ("down_proj", inner, hidden)):
            self.register_buffer(f"{name}_qweight", torch.empty(experts, k // 2, n, dtype=torch.uint8))
            self.register_buffer(f"{name}_scales", torch.empty(experts, k // group_size, n, dtype=SCALE_DTYPE))
        self.act_fn = ACT2FN[config.hidden_act]

    @classmethod
    def from_dense(
        cls, experts: Llama4TextExperts, config: Llama4TextConfig, group_size: int
    ) -> Llama4Int4TextExperts:
        """Quantize a dense ``Llama4TextExperts``."""
        module = cls(config, group_size).to(experts.gate_up_proj.device)
        tensors = quantize_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(), group_size)
        for name, tensor in tensors.items():
            getattr(module, name).copy_(tensor)
        return module

    @property
    def qweight(self) -> torch.Tensor:
        """``gate_up_proj_qweight``, under the name where PEFT looks for a quantized layer's device."""
        return self.gate_up_proj_qweight

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert dequantized: ``(gate_up [D, 2I], down [I, D])`` in ``dtype``."""
        gate_up = dequantize_int4(self.gate_up_proj_qweight[expert], self.gate_up_proj_scales[expert], dtype)
        down = dequantize_int4(self.down_proj_qweight[expert], self.down_proj_scales[expert], dtype)
        return gate_up, down

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` grouped by expert, ``tokens_per_expert [E]`` → ``[N, D]``; idle experts stay packed."""
        out = x.new_empty(x.shape)
        start = 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count:
                rows = slice(start, start + count)
                gate_up, down = self.expert_weights(expert, x.dtype)
                gate, up = (x[rows] @ gate_up).chunk(2, dim=-1)
                out[rows] = (self.act_fn(gate) * up) @ down
                start += count
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.intermediate_size}, int4 g={self.group_size}"


def is_dense_experts(module: nn.Module) -> bool:
    """Our ``Llama4TextExperts``, also when loaded as Hub remote code (a copy of ``moe.py`` in another package)."""
    cls = type(module)
    return isinstance(module, Llama4TextExperts) or (
        cls.__name__ == Llama4TextExperts.__name__ and cls.__module__.rpartition(".")[2] == "moe"
    )


def replace_experts_with_int4(model: nn.Module, group_size: int, load_slots: bool = False) -> int:
    """Swap every dense experts module of ``model`` for an (empty) ``Llama4Int4TextExperts``; returns the count.

    With ``load_slots`` each new module keeps meta ``gate_up_proj`` / ``down_proj`` parameters under the dense names,
    so that transformers' loader collects the bf16 checkpoint tensors and hands them to ``Llama4Int4Quantize``.
    """
    config = model.config.get_text_config()
    targets = [name for name, module in model.named_modules() if is_dense_experts(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        dense = model.get_submodule(name)
        quantized = Llama4Int4TextExperts(config, group_size)
        if load_slots:
            for proj in PROJECTIONS:
                slot = torch.empty_like(getattr(dense, proj), device="meta")
                quantized.register_parameter(proj, nn.Parameter(slot, requires_grad=False))
        setattr(model.get_submodule(parent_name), child, quantized)
    return len(targets)


# --- transformers integration -------------------------------------------------------------------------------------


class Llama4Int4Config(QuantizationConfigMixin):
    """``quantization_config`` for int4 routed experts: ``bits`` (only 4) and ``group_size`` along the input dim.

    The group size must be even and divide both ``hidden_size`` and ``intermediate_size``; that is checked against
    the model when it is built.
    """

    def __init__(self, bits: int = 4, group_size: int = 128, quant_method: str = QUANT_METHOD, **kwargs: Any):
        if kwargs:
            raise ValueError(f"Unknown Llama4Int4Config fields {sorted(kwargs)}; expected `bits` and `group_size`.")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"Llama4Int4Config: `quant_method` = {quant_method!r}; expected {QUANT_METHOD!r}.")
        if bits != 4:
            raise ValueError(f"Llama4Int4Config: `bits` = {bits!r}; only 4-bit weights are supported.")
        if not (isinstance(group_size, int) and group_size > 0 and group_size % 2 == 0):
            raise ValueError(f"Llama4Int4Config: `group_size` = {group_size!r}; expected a positive even integer.")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size


class Llama4Int4Quantize(ConversionOps):
    """Loader op: one checkpoint tensor ``experts.gate_up_proj`` (or ``down_proj``) → its qweight and scales."""

    def __init__(self, hf_quantizer: Llama4Int4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        (tensors,) = input_dict.values()
        weight = tensors[0] if isinstance(tensors, list) else tensors
        module_name, _, proj = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        pairs = [quantize_int4(expert, module.group_size) for expert in weight]
        del module._parameters[proj]  # the meta load slot: the dense tensor is not kept
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {
            f"{full_layer_name}_qweight": torch.stack([qweight for qweight, _ in pairs]),
            f"{full_layer_name}_scales": torch.stack([scales for _, scales in pairs]),
        }


class Llama4Int4HfQuantizer(HfQuantizer):
    """Quantizes the routed experts on load (from a bf16 checkpoint) or loads an int4 checkpoint as saved."""

    requires_calibration = False
    quantization_config: Llama4Int4Config

    @property
    def quantized_element_size(self) -> float:
        return 0.5 + SCALE_DTYPE.itemsize / self.quantization_config.group_size

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replaced = replace_experts_with_int4(
            model, self.quantization_config.group_size, load_slots=not self.pre_quantized
        )
        if replaced == 0 and model.config.get_text_config().moe_layers:
            raise ValueError(f"{type(model).__name__} has MoE layers but no Llama4TextExperts to quantize.")
        logger.info(f"int4: {replaced} expert modules, group size {self.quantization_config.group_size}")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        return not self.pre_quantized and isinstance(module, Llama4Int4TextExperts) and tensor_name in PROJECTIONS

    def get_quantize_ops(self) -> Llama4Int4Quantize:
        return Llama4Int4Quantize(self)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every int4 experts module back to a frozen ``Llama4TextExperts`` in ``dtype``
        (e.g. to merge LoRA adapters, which int4 weights cannot absorb)."""
        config, dtype = model.config.get_text_config(), dtype or SCALE_DTYPE
        for name, int4 in [(name, m) for name, m in model.named_modules() if isinstance(m, Llama4Int4TextExperts)]:
            dense = Llama4TextExperts(config).to(int4.gate_up_proj_qweight.device, dtype).requires_grad_(False)
            weights = [int4.expert_weights(expert, dtype) for expert in range(int4.num_experts)]
            dense.gate_up_proj.copy_(torch.stack([gate_up for gate_up, _ in weights]))  # [E, D, 2I]
            dense.down_proj.copy_(torch.stack([down for _, down in weights]))  # [E, I, D]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top (``lora_experts``: QLoRA); the int4 buffers themselves stay frozen."""
        return True


def _register() -> None:
    """Register the config and quantizer once (a Hub remote-code copy of this file may be imported as well)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Llama4Int4Config)
        register_quantizer(QUANT_METHOD)(Llama4Int4HfQuantizer)


_register()


# --- memory on paper ----------------------------------------------------------------------------------------------


def vision_parameter_count(vision: Llama4VisionConfig, text_hidden_size: int) -> int:
    """Vision encoder + pixel-shuffle adapter + projector to the text width (transformers' module layout)."""
    hidden, inner = vision.hidden_size, vision.intermediate_size
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inner + inner + hidden + 4 * hidden  # attn, MLP, 2 LNs
    embeddings = vision.num_channels * patch * patch * hidden + hidden + ((image // patch) ** 2 + 1) * hidden
    adapter_in = round(hidden / vision.pixel_shuffle_ratio**2)
    adapter = adapter_in * vision.projector_input_dim + vision.projector_output_dim**2
    return (
        vision.num_hidden_layers * layer
        + embeddings
        + 4 * hidden
        + adapter
        + vision.vision_output_dim * text_hidden_size
    )


def parameter_counts(config: Llama4TextConfig | Llama4Config) -> dict[str, int]:
    """Parameters of Llama 4 by part, from the config alone (``vision`` is 0 for a text-only config)."""
    text = config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    moe_layers, experts = len(text.moe_layers), text.num_local_experts
    q_width, kv_width = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    attention_bias = (q_width + 2 * kv_width + hidden) if text.attention_bias else 0
    vision = getattr(config, "vision_config", None)
    return {
        "embeddings": vocab * hidden,
        "attention": layers * (2 * hidden * q_width + 2 * hidden * kv_width + attention_bias),
        "routed experts": moe_layers * experts * 3 * hidden * text.intermediate_size,
        "shared experts": moe_layers * 3 * hidden * text.intermediate_size,
        "dense MLPs": (layers - moe_layers) * 3 * hidden * text.intermediate_size_mlp,
        "router": moe_layers * hidden * experts,
        "norms": (2 * layers + 1) * hidden,
        "head": 0 if text.tie_word_embeddings else vocab * hidden,
        "vision": vision_parameter_count(vision, hidden) if vision is not None else 0,
    }


def footprint_bytes(counts: dict[str, int], dtype_bytes: int = 2, int4_group_size: int | None = None) -> int:
    """Weight bytes of ``counts``; with ``int4_group_size`` the routed experts take ``0.5 + 2 / G`` bytes each."""
    total = sum(count * dtype_bytes for part, count in counts.items() if part != "routed experts")
    experts = counts["routed experts"]
    if int4_group_size is None:
        return total + experts * dtype_bytes
    return total + experts // 2 + experts // int4_group_size * SCALE_DTYPE.itemsize


def kv_cache_bytes(config: Llama4TextConfig | Llama4Config, tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """KV cache for ``tokens`` of context: full-attention (NoPE) layers keep all of them, chunked layers at most
    ``attention_chunk_size`` (what the chunked cache keeps between decode steps)."""
    text = config.get_text_config()
    chunk = text.attention_chunk_size or tokens
    kept = sum(tokens if kind == "full_attention" else min(tokens, chunk) for kind in text.layer_types)
    return 2 * batch * kept * text.num_key_value_heads * text.head_dim * dtype_bytes


def official_configs() -> dict[str, Llama4Config]:
    """Scout and Maverick (Llama-4-*-17B-16E / -128E) at the released sizes of their Hugging Face config.json."""
    vision = dict(
        hidden_size=1408,
        intermediate_size=5632,
        num_hidden_layers=34,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=4096,
        projector_input_dim=4096,
        projector_output_dim=4096,
    )
    text = dict(
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        vocab_size=202048,
        attention_chunk_size=8192,
        no_rope_layer_interval=4,
    )
    scout = dict(text, num_local_experts=16, interleave_moe_layer_step=1)
    maverick = dict(text, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False)
    return {
        name: Llama4Config(text_config=Llama4TextConfig(**fields), vision_config=Llama4VisionConfig(**vision))
        for name, fields in (("Scout", scout), ("Maverick", maverick))
    }


__all__ = [
    "Llama4Int4Config",
    "Llama4Int4HfQuantizer",
    "Llama4Int4TextExperts",
    "quantize_experts",
    "quantize_int4",
    "dequantize_int4",
    "replace_experts_with_int4",
    "parameter_counts",
    "footprint_bytes",
    "kv_cache_bytes",
    "official_configs",
]
