"""``quantization_config=Llama4Int4Config(...)``: int4 routed experts (optionally shared experts) in transformers.

``from_pretrained(path, quantization_config=Llama4Int4Config(group_size=128))`` swaps every ``Llama4TextExperts`` for
a ``Llama4Int4TextExperts`` on the meta device (with ``quantize_shared_expert=True`` also the shared experts' linear
layers for ``Llama4Int4Linear``, Meta's ``int4_mixed`` recipe) and quantizes each dense tensor as it is read
(transformers loads on-the-fly-quantized models one tensor at a time). ``save_pretrained`` writes the int4 checkpoint
format of ``modeling_llama4.int4`` and ``quantization_config`` (``quant_method: "llama4_int4"``), which
``from_pretrained`` loads back as is. Once loaded, the weights are repacked for torch's int4 CPU kernel where it
applies; ``model.dequantize()`` gives back a dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .int4 import SCALE_DTYPE, quantize_int4
from .moe import Llama4TextExperts
from .parallel import (
    add_quantized_expert_rules,
    check_quantized_linears_unsharded,
    expose_quantized_experts,
    keep_local_shards,
)
from .quantized_experts import PROJECTIONS, Llama4Int4Linear, Llama4Int4TextExperts, _Int4Weights, dequantize_modules

logger = logging.get_logger(__name__)

QUANT_METHOD = "llama4_int4"
SHARED_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


class Llama4Int4Config(QuantizationConfigMixin):
    """``quantization_config`` for int4 routed experts: ``bits`` (only 4), ``group_size`` along the input dim, and
    ``quantize_shared_expert`` (the shared experts too, as in Meta's ``int4_mixed`` recipe).

    The group size must be even and divide both ``hidden_size`` and ``intermediate_size``; that is checked against
    the model when it is built.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        quantize_shared_expert: bool = False,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if kwargs:
            raise ValueError(
                f"Unknown Llama4Int4Config fields {sorted(kwargs)}; expected `bits`, `group_size` and "
                "`quantize_shared_expert`."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"Llama4Int4Config: `quant_method` = {quant_method!r}; expected {QUANT_METHOD!r}.")
        if bits != 4:
            raise ValueError(f"Llama4Int4Config: `bits` = {bits!r}; only 4-bit weights are supported.")
        if not (isinstance(group_size, int) and group_size > 0 and group_size % 2 == 0):
            raise ValueError(f"Llama4Int4Config: `group_size` = {group_size!r}; expected a positive even integer.")
        if not isinstance(quantize_shared_expert, bool):
            raise ValueError(
                f"Llama4Int4Config: `quantize_shared_expert` = {quantize_shared_expert!r}; expected a bool."
            )
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.quantize_shared_expert = quantize_shared_expert


def is_dense_experts(module: nn.Module) -> bool:
    """Our ``Llama4TextExperts``, also when loaded as Hub remote code (a copy of ``moe.py`` in another package)."""
    cls = type(module)
    return isinstance(module, Llama4TextExperts) or (
        cls.__name__ == Llama4TextExperts.__name__ and cls.__module__.rpartition(".")[2] == "moe"
    )


def replace_with_int4(model: nn.Module, config: Llama4Int4Config, load_slots: bool = False) -> int:
    """Swap every dense experts module of ``model`` for an (empty) ``Llama4Int4TextExperts``, and with
    ``config.quantize_shared_expert`` its MoE's shared-expert linears for ``Llama4Int4Linear``; returns the number of
    MoE layers.

    With ``load_slots`` each new module keeps meta parameters under the dense names (``gate_up_proj``, ``weight``) so
    that transformers' loader collects the dense checkpoint tensors and hands them to ``Llama4Int4Quantize``.
    """
    text_config = model.config.get_text_config()
    targets = [name for name, module in model.named_modules() if is_dense_experts(module)]
    for name in targets:
        moe_name, _, child = name.rpartition(".")
        moe = model.get_submodule(moe_name)
        dense = getattr(moe, child)
        _swap(moe, child, Llama4Int4TextExperts(text_config, config.group_size), dense, PROJECTIONS, load_slots)
        if config.quantize_shared_expert:
            for linear_name in SHARED_EXPERT_LINEARS:
                linear = getattr(moe.shared_expert, linear_name)
                quantized = Llama4Int4Linear(linear.in_features, linear.out_features, config.group_size)
                _swap(moe.shared_expert, linear_name, quantized, linear, ("weight",), load_slots)
    return len(targets)


def replicate_load_slots(model: nn.Module) -> None:
    """Under FSDP alone (``DistributedConfig(fsdp_size > 1)``, no tensor or expert parallel), the load slots become
    buffers: FSDP would shard them by expert, while the int4 tensors quantized from them are buffers, which FSDP
    keeps whole on every rank, so each rank must quantize every expert."""
    distributed = getattr(model.config, "distributed_config", None)
    if (
        getattr(distributed, "fsdp_size", 1) <= 1
        or max(getattr(distributed, "tp_size", 1), getattr(distributed, "ep_size", 1)) > 1
    ):
        return
    for module in model.modules():
        if isinstance(module, _Int4Weights):
            for name, slot in list(module.named_parameters(recurse=False)):
                if slot.is_meta:
                    del module._parameters[name]
                    module.register_buffer(name, slot.data)


def _swap(parent: nn.Module, child: str, quantized: nn.Module, dense: nn.Module, slots: tuple, load_slots: bool):
    if load_slots:
        for slot in slots:
            meta = torch.empty_like(getattr(dense, slot), device="meta")
            quantized.register_parameter(slot, nn.Parameter(meta, requires_grad=False))
    setattr(parent, child, quantized)


def int4_checkpoint_tensors(module: _Int4Weights, slot: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (names under ``module``) of the dense tensor ``slot`` of an int4 module: expert weights
    ``[E, K, N]`` quantized one expert at a time, a linear ``weight [out, in]`` as ``weightᵀ``."""
    if isinstance(module, Llama4Int4Linear):
        qweight, scales = quantize_int4(weight.T, module.group_size)
        return {"qweight": qweight, "scales": scales}
    pairs = [quantize_int4(expert, module.group_size) for expert in weight]
    return {
        f"{slot}_qweight": torch.stack([qweight for qweight, _ in pairs]),
        f"{slot}_scales": torch.stack([scales for _, scales in pairs]),
    }


class QuantizeOnLoad(ConversionOps):
    """Loader op: one dense checkpoint tensor (``experts.gate_up_proj``, ``shared_expert.up_proj.weight`` …) → the
    quantized checkpoint tensors of its module, which ``checkpoint_tensors(module, slot, weight)`` computes (int4 here,
    FP8 in ``quantization_fp8``).

    With ``drops_load_slot`` (int4), the slot of the dense tensor is the meta load slot ``replace_with_int4(
    load_slots=True)`` made for it: it is dropped (the dense tensor is not kept) and no longer counts as missing. FP8
    keeps the slot: the FP8 tensor takes the dense tensor's name.
    """

    checkpoint_tensors: Callable[[nn.Module, str, torch.Tensor], dict[str, torch.Tensor]]
    drops_load_slot: bool

    def __init__(self, hf_quantizer: HfQuantizer):
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
        module_name, _, slot = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        if self.drops_load_slot:
            delattr(module, slot)  # the meta load slot (a buffer once sharded by expert): the dense tensor is not kept
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
        quantized = self.checkpoint_tensors(module, slot, weight)
        return {f"{module_name}.{name}": tensor for name, tensor in quantized.items()}


class Llama4Int4Quantize(QuantizeOnLoad):
    """Loader op: a dense checkpoint tensor → its int4 checkpoint tensors."""

    checkpoint_tensors = staticmethod(int4_checkpoint_tensors)
    drops_load_slot = True


class Llama4Int4HfQuantizer(HfQuantizer):
    """Quantizes on load (from a dense checkpoint) or loads an int4 checkpoint as saved; then repacks for the CPU
    kernel."""

    requires_calibration = False
    quantization_config: Llama4Int4Config

    @property
    def quantized_element_size(self) -> float:
        return 0.5 + SCALE_DTYPE.itemsize / self.quantization_config.group_size

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replaced = replace_with_int4(model, self.quantization_config, load_slots=not self.pre_quantized)
        if replaced == 0 and model.config.get_text_config().moe_layers:
            raise ValueError(f"{type(model).__name__} has MoE layers but no Llama4TextExperts to quantize.")
        logger.info(f"int4: {replaced} MoE layers, group size {self.quantization_config.group_size}")
        check_quantized_linears_unsharded(model, (Llama4Int4Linear,))
        expose_quantized_experts(model, Llama4Int4TextExperts)
        replicate_load_slots(model)

    def update_parallel_plan(self, model: nn.Module, plan: dict[str, str]) -> None:
        add_quantized_expert_rules(model, plan)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for module in model.modules():
            if isinstance(module, _Int4Weights):
                keep_local_shards(module)  # under tensor or expert parallel, this rank's share
                module.use_kernel_layout()
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        slots = PROJECTIONS if isinstance(module, Llama4Int4TextExperts) else ("weight",)
        return not self.pre_quantized and isinstance(module, _Int4Weights) and tensor_name in slots

    def get_quantize_ops(self) -> Llama4Int4Quantize:
        return Llama4Int4Quantize(self)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_modules(model, dtype or torch.get_default_dtype())

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top (``lora_experts``: QLoRA); the int4 buffers themselves stay frozen."""
        return True


def register_once(
    quant_method: str, config_class: type[QuantizationConfigMixin], quantizer_class: type[HfQuantizer]
) -> None:
    """Register ``quant_method``'s config and quantizer with transformers unless they are registered already (a Hub
    remote-code copy of this package registers the same names; whichever comes first serves both)."""
    try:
        register_quantization_config(quant_method)(config_class)
    except ValueError:  # "Config '...' already registered"
        return
    register_quantizer(quant_method)(quantizer_class)


register_once(QUANT_METHOD, Llama4Int4Config, Llama4Int4HfQuantizer)
