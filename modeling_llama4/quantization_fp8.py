"""Meta's official FP8 checkpoints (``quant_method: "fbgemm_fp8"``) on any device, without fbgemm.

transformers' ``fbgemm_fp8`` quantizer needs a CUDA GPU of compute capability >= 9.0 with the fbgemm-gpu kernels, and
its FP8 experts expect transformers' built-in (dense-dispatch) Llama 4. This module registers its own quantizer under
its own name, ``llama4_fp8`` (transformers' public ``register_quantization_config`` / ``register_quantizer``), that
puts the checkpoint's FP8 tensors in :class:`~modeling_llama4.quantized_experts.Llama4Fp8TextExperts` (routed experts,
sparse dispatch, only the routed experts dequantized) and :class:`~modeling_llama4.quantized_experts.Llama4Fp8Linear`
(linear layers not in ``modules_to_not_convert``), 1 byte a weight on every device.

Only this package's Llama 4 configs route ``fbgemm_fp8`` here: transformers hands them the ``FbgemmFp8Config`` it
reads from ``config.json`` (or gets as ``from_pretrained(..., quantization_config=FbgemmFp8Config())``), and they keep
it as a :class:`Llama4Fp8Config` (``configuration_llama4``). Every other model, in the same process too, goes
through transformers' own ``fbgemm_fp8`` quantizer. A :class:`Llama4Fp8Config` is saved as ``fbgemm_fp8``, so a saved
folder keeps the official format (transformers' built-in Llama 4 and vLLM load it). A dense checkpoint loaded with
``quantization_config=FbgemmFp8Config()`` is quantized to that layout while loading; ``model.dequantize()`` goes back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging
from transformers.utils.quantization_config import FbgemmFp8Config

from .fp8 import FP8_DTYPE, check_fp8_pair, quantize_fp8
from .parallel import (
    add_quantized_expert_rules,
    check_quantized_linears_unsharded,
    expose_quantized_experts,
    keep_local_shards,
)
from .quantization_int4 import QuantizeOnLoad, is_dense_experts, register_once
from .quantized_experts import PROJECTIONS, Llama4Fp8Linear, Llama4Fp8TextExperts, dequantize_modules

logger = logging.get_logger(__name__)

QUANT_METHOD = "llama4_fp8"  # our quantizer's name in transformers' registry; never written to config.json
OFFICIAL_QUANT_METHOD = "fbgemm_fp8"  # what Meta's checkpoints (and folders we save) say


class Llama4Fp8Config(FbgemmFp8Config):
    """``FbgemmFp8Config`` (same fields, same ``config.json``) as this package's Llama 4 configs keep it: it names
    :class:`Llama4Fp8HfQuantizer` (``quant_method`` ``"llama4_fp8"``) and is saved as ``"fbgemm_fp8"``."""

    def __init__(
        self, activation_scale_ub: float = 1200.0, modules_to_not_convert: list[str] | None = None, **kwargs: Any
    ):
        super().__init__(activation_scale_ub=activation_scale_ub, modules_to_not_convert=modules_to_not_convert)
        self.quant_method = QUANT_METHOD

    @classmethod
    def from_fbgemm(cls, config: FbgemmFp8Config) -> Llama4Fp8Config:
        """The same settings as ``config``, served by this package's quantizer."""
        return cls(config.activation_scale_ub, config.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "quant_method": OFFICIAL_QUANT_METHOD}


def is_llama4_model(model: nn.Module) -> bool:
    """A model of this package (or of its Hub remote-code copy), not transformers' built-in Llama 4."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type in ("llama4", "llama4_text") and not type(model).__module__.startswith("transformers.")


def replace_with_fp8(model: nn.Module, modules_to_not_convert: list[str]) -> tuple[int, int]:
    """Swap (on the meta device) our dense experts for ``Llama4Fp8TextExperts`` and plain ``nn.Linear`` layers (not
    the router, a ``Linear`` subclass) for ``Llama4Fp8Linear``, skipping ``modules_to_not_convert``; returns the
    counts ``(experts, linears)``."""
    text_config = model.config.get_text_config()
    experts = linears = 0
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, modules_to_not_convert):
            continue
        if is_dense_experts(module):
            new = Llama4Fp8TextExperts(text_config)
            experts += 1
        elif type(module) is nn.Linear:
            new = Llama4Fp8Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linears += 1
        else:
            continue
        model.set_submodule(name, new.to(device="meta"))
    return experts, linears


def fp8_checkpoint_tensors(module: nn.Module, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (names under ``module``) for its dense tensor ``name``, in the fbgemm_fp8 layout."""
    if isinstance(module, Llama4Fp8Linear):
        q, scale = quantize_fp8(weight.T)  # [in, out], [1, out]
        return {"weight": q.T, "weight_scale": scale.T}
    pairs = [quantize_fp8(expert) for expert in weight]  # one expert at a time: [K, N], [1, N]
    q, scale = torch.stack([q for q, _ in pairs]), torch.stack([scale for _, scale in pairs])
    return {name: q, f"{name}_scale": scale if name == "gate_up_proj" else scale.transpose(1, 2)}


def check_fp8_module(name: str, module: nn.Module) -> None:
    """Raise a ``ValueError`` naming the tensor unless ``module``'s FP8 tensors and scales are well formed."""
    if isinstance(module, Llama4Fp8Linear):
        check_fp8_pair(f"{name}.weight", module.weight, module.weight_scale, (module.out_features, 1))
    elif isinstance(module, Llama4Fp8TextExperts):
        experts, columns = module.num_experts, {p: getattr(module, p).shape[-1] for p in PROJECTIONS}  # local shapes
        scale_shapes = {
            "gate_up_proj": (experts, 1, columns["gate_up_proj"]),
            "down_proj": (experts, columns["down_proj"], 1),
        }
        for projection in PROJECTIONS:
            weight, scale = getattr(module, projection), getattr(module, f"{projection}_scale")
            check_fp8_pair(f"{name}.{projection}", weight, scale, scale_shapes[projection])


class Llama4Fp8Quantize(QuantizeOnLoad):
    """Loader op: a dense checkpoint tensor (``experts.gate_up_proj``, ``q_proj.weight`` …) → FP8 and its scale."""

    checkpoint_tensors = staticmethod(fp8_checkpoint_tensors)
    drops_load_slot = False


class Llama4Fp8HfQuantizer(HfQuantizer):
    """The ``fbgemm_fp8`` format for this package's Llama 4 on any device (:class:`Llama4Fp8Config`)."""

    requires_calibration = False
    quantization_config: Llama4Fp8Config

    @property
    def quantized_element_size(self) -> float:
        return 1

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not is_llama4_model(model):
            raise ValueError(
                f"Llama4Fp8Config (quant_method {QUANT_METHOD!r}) serves this package's Llama 4 models, not "
                f"{type(model).__name__}; use transformers' FbgemmFp8Config for other models."
            )
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        experts, linears = replace_with_fp8(model, self.modules_to_not_convert)
        logger.info(f"fp8: {experts} expert modules and {linears} linear layers in FP8")
        check_quantized_linears_unsharded(model, (Llama4Fp8Linear,))
        distributed = getattr(model.config, "distributed_config", None)
        if (
            not self.pre_quantized
            and getattr(distributed, "tp_size", 1) > 1
            and getattr(distributed, "ep_size", 1) == 1
        ):
            raise NotImplementedError(
                "Quantizing experts to FP8 while loading under tensor parallel: each scale of down_proj spans its "
                "whole input dim, which tensor parallel splits over the ranks. Save the FP8 model from one process "
                "(or `llama4-convert --quantize fp8`) and load that checkpoint with `tp_plan`, or quantize on load "
                "under expert parallel (`DistributedConfig(..., ep_size=N)`)."
            )
        expose_quantized_experts(model, Llama4Fp8TextExperts)

    def update_parallel_plan(self, model: nn.Module, plan: dict[str, str]) -> None:
        add_quantized_expert_rules(model, plan)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in model.named_modules():
            if isinstance(module, Llama4Fp8TextExperts):
                keep_local_shards(module)  # under tensor or expert parallel, this rank's share
            check_fp8_module(name, module)
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        slots = PROJECTIONS if isinstance(module, Llama4Fp8TextExperts) else ("weight",)
        return not self.pre_quantized and isinstance(module, (Llama4Fp8TextExperts, Llama4Fp8Linear)) and name in slots

    def get_quantize_ops(self) -> ConversionOps:
        return Llama4Fp8Quantize(self)

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """Refuse a checkpoint tensor that should be FP8 but is not (it would otherwise be cast silently)."""
        if self.pre_quantized and dtype == FP8_DTYPE:
            stored = param.get_dtype() if hasattr(param, "get_dtype") else str(param.dtype)
            if stored not in ("F8_E4M3", str(FP8_DTYPE)):
                raise ValueError(
                    f"FP8 checkpoint: a tensor stored as {stored} goes into an FP8 weight; expected float8_e4m3fn "
                    "(F8_E4M3). Is `quantization_config` (quant_method fbgemm_fp8) right for this checkpoint?"
                )
        return super().get_new_dtype(converter, param, dtype)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_modules(model, dtype or torch.get_default_dtype())

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top of our FP8 layers, which stay frozen."""
        return True


register_once(QUANT_METHOD, Llama4Fp8Config, Llama4Fp8HfQuantizer)
