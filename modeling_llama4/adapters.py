"""LoRA adapters with PEFT and transformers: expert LoRA for every ``LoraConfig``, and checked adapter loading.

PEFT has no global registry for custom LoRA layers: a layer for a new module type is registered per config
(``LoraConfig._register_custom_module``, PEFT's documented extension point), and the registration is not saved with
the adapter. :func:`enable_expert_lora` therefore wraps ``LoraConfig.__post_init__`` once, so that every
``LoraConfig`` — built by the user, read back by ``PeftModel.from_pretrained``, by transformers' ``load_adapter`` /
``from_pretrained(adapter_dir)`` or by Trainer's ``resume_from_checkpoint`` — maps Llama 4's routed experts to
:class:`~modeling_llama4.lora_experts.Llama4ExpertsLoraLayer`. ``import modeling_llama4`` calls it; configs that
target no Llama 4 experts are unaffected (the mapping matches only this package's expert classes). Tested with PEFT
0.19.0 and 0.21.2 (from 0.19 PEFT hands the config to custom layers; 0.17 does not import with transformers 5.24).

:func:`load_adapter` is ``PeftModel.from_pretrained`` with the checks a local folder needs first: the config parses,
the weights file is there (PEFT would otherwise look for it on the Hub) and every weight is finite.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .lora_experts import LoraConfig, register_expert_lora

try:
    from peft import PeftModel
except ImportError:  # importable without peft; load_adapter raises
    PeftModel = None

__all__ = ["check_adapter_folder", "enable_expert_lora", "load_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT looks for, in its order


def enable_expert_lora() -> bool:
    """Make every ``LoraConfig`` route Llama 4 experts to the per-expert LoRA layer; ``False`` without PEFT.

    Idempotent: the wrapper is installed once per process.
    """
    if LoraConfig is None:
        return False
    post_init = LoraConfig.__post_init__
    if getattr(post_init, "registers_llama4_experts", False):
        return True

    @functools.wraps(post_init)
    def __post_init__(self: LoraConfig) -> None:
        post_init(self)
        register_expert_lora(self)

    __post_init__.registers_llama4_experts = True
    LoraConfig.__post_init__ = __post_init__
    logger.debug("modeling_llama4: every LoraConfig now maps Llama 4 experts to Llama4ExpertsLoraLayer")
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
