"""Hugging Face Llama 4 checkpoint → Meta's native layout: ``params.json``, one ``consolidated.00.pth`` in module
naming (model-parallel degree 1), and ``tokenizer.model`` rebuilt from ``tokenizer.json``.

Tensors are the HF ones un-fused and renamed, bit for bit (unless a ``dtype`` is given), so native → HF → native
gives back the module-named tensors exactly. params.json reproduces the config's sizes through Meta's formulas
(``conversion.hf_config``). The native file is one pickle: the model is held in memory
once while it is written.
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open

from . import ConversionError
from .convert import _is_finite
from .hf_config import native_args_from_config
from .mapping import hf_tensors, hf_to_native_tensors
from .native import native_schema
from .params import read_json_object
from .writer import INDEX_FILE, check_output_dir, staged_output

logger = logging.getLogger(__name__)

NATIVE_SHARD = "consolidated.00.pth"


def convert_hf_to_native(
    input_dir: str | Path, output_dir: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the HF checkpoint in ``input_dir`` as a native one in ``output_dir``; returns ``output_dir``.

    ``dtype`` (``bfloat16``, ``float16``, ``float32``) casts the weights; by default they keep their dtype.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"input folder {input_dir} does not exist or is not a folder")
    check_output_dir(output_dir, input_dir, overwrite)
    config = load_hf_config(input_dir)
    args = native_args_from_config(config)
    text = getattr(config, "text_config", None) or config
    schema = native_schema(args, text.vocab_size)
    hf_files = _weight_files(input_dir)
    recipes = hf_tensors(schema, multimodal=args.vision_args is not None)
    unknown = sorted(set(hf_files) - {recipe.name for recipe in recipes})
    if unknown:
        raise ConversionError(f"{input_dir}: tensors with no native counterpart: {', '.join(unknown[:8])}")

    native: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = {name: stack.enter_context(_open_safetensors(input_dir / name)) for name in set(hf_files.values())}
        for recipe in recipes:
            if recipe.name not in hf_files:
                raise ConversionError(f"{input_dir}: missing tensor {recipe.name!r}")
            hf_tensor = _read_tensor(files[hf_files[recipe.name]], recipe.name, input_dir / hf_files[recipe.name])
            if hf_tensor.is_floating_point() and not _is_finite(hf_tensor):
                raise ConversionError(
                    f"{hf_files[recipe.name]}: {recipe.name!r} has non-finite weights (NaN or infinity)"
                )
            for key, tensor in hf_to_native_tensors(recipe, hf_tensor).items():
                if tuple(tensor.shape) != schema[key].shape:
                    raise ConversionError(
                        f"{hf_files[recipe.name]}: {recipe.name!r} gives {key!r} of shape {tuple(tensor.shape)}, "
                        f"config.json implies {schema[key].shape}"
                    )
                native[key] = tensor if dtype is None else tensor.to(getattr(torch, dtype))

    with staged_output(output_dir, overwrite) as staging:
        torch.save(native, staging / NATIVE_SHARD)
        (staging / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n", encoding="utf-8")
        tokenizer_json = input_dir / "tokenizer.json"
        if tokenizer_json.is_file():
            write_tiktoken_model(tokenizer_json, staging / "tokenizer.model")
        else:
            logger.warning("%s has no tokenizer.json: the native checkpoint gets no tokenizer.model", input_dir)
    return output_dir


def load_hf_config(input_dir: Path):
    """This package's ``Llama4Config`` or ``Llama4TextConfig`` from ``input_dir/config.json``."""
    from modeling_llama4 import Llama4Config, Llama4TextConfig

    path = input_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"missing {path}")
    content = read_json_object(path)
    model_type = content.get("model_type")
    classes = {"llama4": Llama4Config, "llama4_text": Llama4TextConfig}
    if model_type not in classes:
        raise ConversionError(f"{path}: model_type {model_type!r} is not a Llama 4 one ({', '.join(classes)})")
    try:
        return classes[model_type].from_pretrained(input_dir)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:  # the config's own checks
        raise ConversionError(f"{path}: {error}") from error


def _weight_files(input_dir: Path) -> dict[str, str]:
    """HF tensor name → safetensors file, from the index, or from a single ``model.safetensors``."""
    index = input_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a safetensors index: {error!r}") from error
    single = input_dir / "model.safetensors"
    if not single.is_file():
        raise ConversionError(f"{input_dir} has neither {INDEX_FILE} nor model.safetensors")
    with _open_safetensors(single) as weights:
        return {name: single.name for name in weights.keys()}


def _open_safetensors(path: Path):
    if not path.is_file():
        raise ConversionError(f"missing {path}, which {INDEX_FILE} names")
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise ConversionError(f"cannot read {path} as safetensors (truncated or damaged?): {error}") from error


def _read_tensor(weights, name: str, path: Path) -> torch.Tensor:
    try:
        return weights.get_tensor(name)
    except Exception as error:  # SafetensorError: a header naming bytes the file lacks
        raise ConversionError(f"cannot read {name!r} from {path} (truncated or damaged?): {error}") from error


def write_tiktoken_model(tokenizer_json: Path, path: Path) -> None:
    """Meta's ``tokenizer.model`` (``base64(token) rank`` per line) from a byte-level BPE ``tokenizer.json``: the
    BPE vocabulary without the added (special) tokens, ids as ranks."""
    content = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    added = {token["id"] for token in content.get("added_tokens", [])}
    ranks = sorted((rank, token) for token, rank in content["model"]["vocab"].items() if rank not in added)
    if [rank for rank, _ in ranks] != list(range(len(ranks))):
        raise ConversionError(f"{tokenizer_json}: BPE ids are not 0..{len(ranks) - 1}, not a tiktoken vocabulary")
    to_byte = _unicode_to_byte()
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}\n" for rank, token in ranks]
    path.write_text("".join(lines), encoding="utf-8")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte → printable character map, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + extra)
            extra += 1
    return {character: byte for byte, character in characters.items()}
