"""LoRA adapters with PEFT and transformers: per-expert LoRA on this package's models, and checked adapter loading.

PEFT picks the LoRA layer for a module in ``LoraModel._create_new_module``: from a per-config mapping
(``LoraConfig._register_custom_module``, experimental, not saved with the adapter), else by the module's class (Linear,
Embedding, Conv…). Neither the model nor its modules can declare their own layer, and the configs that
``PeftModel.from_pretrained``, transformers' ``load_adapter`` / ``from_pretrained(adapter_dir)`` and Trainer's
``resume_from_checkpoint`` read back are built inside PEFT. :func:`enable_expert_lora` (called by ``import
modeling_llama4``) therefore wraps that one static method: a routed-experts module of this package
(``Llama4TextExperts``, ``Llama4Int4TextExperts``, ``Llama4Fp8TextExperts``) targeted as a module gets
:class:`~modeling_llama4.lora_experts.Llama4ExpertsLoraLayer`; every other module, of every other model, goes to
PEFT's own method unchanged, and no ``LoraConfig`` is touched. PEFT 0.21 (the series CI runs; listed in ``upstream``).

:func:`load_adapter` is ``PeftModel.from_pretrained`` with the checks a local folder needs first: the config parses,
the weights file is there (PEFT would otherwise look for it on the Hub) and every weight is finite. Without it, a
plain ``PeftModel.from_pretrained`` (also ``PeftModel.load_adapter``, Trainer's resume) refuses non-finite factors of
the routed experts only (the expert layer's ``load_state_dict`` hook); PEFT's own layers (attention, shared expert)
take any values, and transformers' ``model.load_adapter`` reads the file with its own loader, which no module hook
sees. Load adapters you did not train with :func:`load_adapter`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .lora_experts import expert_lora_layer

try:
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
except ImportError:  # importable without peft; load_adapter raises
    PeftModel = LoraModel = None

__all__ = ["check_adapter_folder", "enable_expert_lora", "load_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT looks for, in its order


def enable_expert_lora() -> bool:
    """Make PEFT's LoRA put :class:`~modeling_llama4.lora_experts.Llama4ExpertsLoraLayer` on this package's routed
    experts, whatever ``LoraConfig`` targets them; ``False`` without PEFT.

    Wraps ``LoraModel._create_new_module`` once per process; the wrapper hands every module that is not one of our
    experts to PEFT's method as is.
    """
    if LoraModel is None:
        return False
    create_new_module = LoraModel._create_new_module
    if getattr(create_new_module, "routes_llama4_experts", False):
        return True

    @functools.wraps(create_new_module)
    def _create_new_module(lora_config, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        layer = expert_lora_layer(target, adapter_name, lora_config, **kwargs)
        return layer if layer is not None else create_new_module(lora_config, adapter_name, target, **kwargs)

    _create_new_module.routes_llama4_experts = True
    LoraModel._create_new_module = staticmethod(_create_new_module)
    logger.debug("modeling_llama4: PEFT's LoRA puts Llama4ExpertsLoraLayer on this package's routed experts")
    return True


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def check_adapter_folder(folder: str | Path) -> None:
    """Check a local PEFT adapter folder before loading it.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights file (named in the message).
        ValueError: the config is not valid JSON for a PEFT config, or a weight is NaN or infinite.
    """
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {folder} is not a PEFT adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{config_file} is not a PEFT adapter config (expected a JSON object with a 'peft_type')")
    weights_file = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(
            f"{folder / ADAPTER_WEIGHTS[0]} not found (nor {ADAPTER_WEIGHTS[1]}): no adapter weights"
        )
    try:
        weights = _load_weights(weights_file)
    except Exception as error:  # safetensors and torch raise assorted types for a damaged file
        raise ValueError(f"{weights_file} cannot be read as adapter weights: {error}") from error
    for name, weight in weights.items():
        if weight.is_floating_point() and not torch.isfinite(weight).all():
            raise ValueError(f"{weights_file} holds non-finite values (NaN or inf) in {name}: refusing the adapter")


def load_adapter(model: nn.Module, adapter: str | Path, is_trainable: bool = False) -> PeftModel:
    """Wrap ``model`` with the adapter in ``adapter`` (a local folder, checked first, or a Hub id)."""
    if PeftModel is None:
        raise ImportError("Loading a LoRA adapter needs PEFT: pip install 'modeling-llama4[peft]'")
    if Path(adapter).is_dir():
        check_adapter_folder(adapter)
    elif Path(adapter).exists() or str(adapter).startswith((".", "/", "~")) or str(adapter).count("/") > 1:
        raise FileNotFoundError(f"adapter {str(adapter)!r} is not a folder (expected a PEFT adapter folder or Hub id)")
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
