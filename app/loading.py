"""Load the demo's model and processor: the tiny default, a local folder or a Hub id, optionally a LoRA adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LoadedModel", "load", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for ``generate``, its processor and a short description for the page."""

    model: torch.nn.Module
    processor: object
    label: str
    is_tiny: bool


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``mps`` on Apple silicon, else ``cpu``."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` → bfloat16 on a GPU that supports it, float32 otherwise; else one of :data:`DTYPES`."""
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _open_checkpoint(path: str, dtype: torch.dtype, device_map: str) -> tuple[torch.nn.Module, object]:
    """The model and processor of a checkpoint, by its config: multimodal (with a vision config) or text-only.

    A text-only checkpoint gets a processor around its own tokenizer (and a default image processor, unused: the
    model has no vision tower), so that text chats run the same way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from modeling_llama4 import Llama4ImageProcessor
    from modeling_llama4.processing_llama4 import Llama4Processor

    if getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None:
        auto_class, processor = AutoModelForImageTextToText, Llama4Processor.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        auto_class, processor = AutoModelForCausalLM, Llama4Processor(Llama4ImageProcessor(), tokenizer)
    model = auto_class.from_pretrained(path, dtype=dtype, device_map=device_map).eval()
    return model, processor


def load(
    model: str = "tiny",
    device: str = "auto",
    dtype: str = "auto",
    adapter: str | None = None,
    cache_root: str | Path | None = None,
) -> LoadedModel:
    """Load a Llama 4 (multimodal or text-only) and its processor for the demo.

    Args:
        model: ``tiny`` (the built-in random-weight model, see :mod:`modeling_llama4.tiny`), a folder in the Hugging
            Face format (from ``llama4-convert``, ``finetune_lora.py --merge`` or the Hub) or a Hub id.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        adapter: a LoRA adapter folder or Hub id (PEFT format), applied on top of the model; a folder is checked
            first (:func:`modeling_llama4.adapters.load_adapter`).
        cache_root: where the tiny model is cached (default: see :func:`modeling_llama4.tiny.default_cache_root`).
    """
    import modeling_llama4  # noqa: F401 - registers Llama 4 with the transformers Auto classes
    from modeling_llama4.adapters import load_adapter
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    is_tiny = model == "tiny"
    path = str(ensure_tiny_checkpoint(cache_root)) if is_tiny else model
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    logger.info("Loading %s on %s in %s", path, resolved_device, torch_dtype)
    device_map = "auto" if resolved_device == "cuda" else resolved_device
    network, processor = _open_checkpoint(path, torch_dtype, device_map)
    if adapter:
        logger.info("Loading the LoRA adapter %s", adapter)
        network = load_adapter(network, adapter).eval()
    label = "tiny random-weight Llama 4" if is_tiny else model
    if adapter:
        label += f" + LoRA {adapter}"
    return LoadedModel(model=network, processor=processor, label=label, is_tiny=is_tiny)
