"""A saved Llama 4 folder as a complete Hub repository: the code of every class it names, an ``auto_map`` for every
Auto class it serves, and its model card.

``Llama4PreTrainedModel.save_pretrained`` and ``llama4-convert`` both finish with ``save_hub_files``, so either
folder loads with ``trust_remote_code=True`` where this package is not installed, and the two cannot drift.
transformers' ``save_pretrained`` alone maps one Auto class per model class (``register_for_auto_class``), while a
checkpoint serves several (``AutoModel``, ``AutoModelForCausalLM``, ...). The code files are the modules the maps
name plus everything they import relatively (the quantization code included), found from the import graph.

The tokenizer's entry is written by transformers (``Llama4Tokenizer`` is registered for ``AutoTokenizer``);
``save_hub_files`` adds it to a tokenizer_config.json saved without it, so the folder loads our tokenizer as remote code.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import HfApi
from transformers import PretrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files

from .model_card import write_model_card

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "processor_config.json"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

# config.json's auto_map per model_type: the Auto classes this package registers for it (see ``__init__``).
MODEL_AUTO_MAPS: dict[str, dict[str, str]] = {
    "llama4": {
        "AutoConfig": "configuration_llama4.Llama4Config",
        "AutoModel": "modeling_llama4.Llama4ForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_llama4.Llama4ForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_llama4.Llama4ForConditionalGeneration",
        # `transformers serve` loads a model type of MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES with this Auto class
        "AutoModelForMultimodalLM": "modeling_llama4.Llama4ForConditionalGeneration",
    },
    "llama4_text": {
        "AutoConfig": "configuration_llama4.Llama4TextConfig",
        "AutoModel": "modeling_llama4.Llama4TextModel",
        "AutoModelForCausalLM": "modeling_llama4.Llama4ForCausalLM",
    },
    "llama4_vision_model": {
        "AutoConfig": "configuration_llama4.Llama4VisionConfig",
        "AutoModel": "vision.Llama4VisionModel",
    },
}
# processor_config.json's auto_map, and that of the image processor it nests.
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_llama4.Llama4Processor"}
IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_llama4.Llama4ImageProcessor"}
# tokenizer_config.json's auto_map, as transformers writes it: [slow class, fast class]; AutoTokenizer takes the fast
# one, else the slow one, and our class (not named ...Fast) counts as slow.
TOKENIZER_FILE = "tokenizer_config.json"
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_llama4.Llama4Tokenizer", None]}
# Quantized weights: tensors packing several weights per element, and tensors describing others' quantization.
PACKED_SUFFIXES = {"qweight": 2}  # int4 (routed `_qweight`, shared expert `.qweight`): two weights per uint8
QUANTIZATION_METADATA_SUFFIXES = ("scales", "_scale")  # int4 group scales; FP8 per-channel scales


def save_hub_files(save_directory: str | Path, config: PretrainedConfig, name: str | None = None) -> None:
    """Complete the saved folder ``save_directory`` (config.json and weights already there): code, auto_maps, card
    (titled ``name``, by default the folder's name)."""
    directory = Path(save_directory)
    auto_maps = {CONFIG_FILE: MODEL_AUTO_MAPS[config.model_type]}
    if (directory / PROCESSOR_FILE).is_file():
        auto_maps[PROCESSOR_FILE] = PROCESSOR_AUTO_MAP
    if (directory / TOKENIZER_FILE).is_file():
        auto_maps[TOKENIZER_FILE] = TOKENIZER_AUTO_MAP
    for file, auto_map in auto_maps.items():
        _set_auto_map(directory / file, auto_map)
    for source in code_files(auto_maps.values()):
        shutil.copyfile(source, directory / source.name)
    if config.model_type != "llama4_vision_model":
        write_model_card(directory, config, parameter_count(directory), name)


HUB_OPTIONS = ("repo_id", "commit_message", "create_pr", "private")  # save_pretrained's options for its push


def push_folder(
    directory: str | Path,
    repo_id: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    token: bool | str | None = None,
) -> None:
    """``save_pretrained(push_to_hub=True)``'s upload, run once the folder is complete: ``directory`` goes to
    ``repo_id`` (by default the folder's name; created if needed) in one commit, through ``HfApi.upload_folder``
    (files the Hub already holds are not sent again)."""
    api = HfApi(token=token)
    repo = api.create_repo(repo_id or Path(directory).resolve().name, exist_ok=True, private=private)
    api.upload_folder(repo_id=repo.repo_id, folder_path=directory, commit_message=commit_message, create_pr=create_pr)


def code_files(auto_maps: Iterable[dict[str, str]]) -> list[Path]:
    """The modules named by ``auto_maps`` (the image processor's too, with the processor) and their imports."""
    references = [reference for auto_map in auto_maps for value in auto_map.values() for reference in _listed(value)]
    modules = {reference.split(".")[0] for reference in references}
    if PROCESSOR_AUTO_MAP["AutoProcessor"].split(".")[0] in modules:
        modules.add(IMAGE_PROCESSOR_AUTO_MAP["AutoImageProcessor"].split(".")[0])
    files = set()
    for module in modules:
        source = PACKAGE_DIR / f"{module}.py"
        files.update([source, *map(Path, get_relative_import_files(source))])
    return sorted(files)


def weight_files(directory: str | Path) -> list[str]:
    """The safetensors files of the folder: those its index names, else ``model.safetensors``."""
    index = Path(directory) / WEIGHTS_INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return [WEIGHTS_FILE]


def parameter_count(directory: str | Path) -> int:
    """Weights of the model the folder stores, from the safetensors headers: a quantized tensor counts the weights
    it packs, its scales none (so an int4 checkpoint counts what its unquantized model holds)."""
    from safetensors import safe_open

    total = 0
    for file in weight_files(directory):
        with safe_open(Path(directory) / file, framework="pt") as weights:
            for name in weights.keys():
                if name.endswith(QUANTIZATION_METADATA_SUFFIXES):
                    continue
                per_element = next((n for suffix, n in PACKED_SUFFIXES.items() if name.endswith(suffix)), 1)
                total += per_element * math.prod(weights.get_slice(name).get_shape())
    return total


def _listed(value: str | list[str | None]) -> list[str]:
    """The class references of an auto_map value: one, or a tokenizer's [slow, fast] pair."""
    return [value] if isinstance(value, str) else [reference for reference in value if reference is not None]


def _set_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    """Add ``auto_map`` to that of the JSON file ``path`` (and to the image processor a processor config nests)."""
    content = json.loads(path.read_text(encoding="utf-8"))
    content["auto_map"] = {**content.get("auto_map", {}), **auto_map}
    if isinstance(content.get("image_processor"), dict):
        nested = content["image_processor"]
        nested["auto_map"] = {**nested.get("auto_map", {}), **IMAGE_PROCESSOR_AUTO_MAP}
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
