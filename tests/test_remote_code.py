"""Hub remote code: a saved checkpoint carries its modeling and processing code, loads with ``trust_remote_code=True``
in a process where ``modeling_llama4`` cannot be imported and computes what the package computes; it also loads in
transformers' built-in Llama 4; ``examples/push_to_hub.py`` uploads all of it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from transformers.utils.hub import EntryNotFoundError

from modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration, build_processor
from modeling_llama4.tiny import MAX_TILES, PATCH_SIZE, PIXEL_SHUFFLE_RATIO, TILE_SIZE, tiny_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"
CODE_FILES = {
    "attention.py",
    "configuration_llama4.py",
    "model_card.py",
    "modeling_llama4.py",
    "moe.py",
    "quantization_int4.py",
    "rope.py",
    "vision.py",
}
PROCESSOR_CODE_FILES = {"image_processing_llama4.py", "processing_llama4.py", "tokenization_llama4.py"}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}

# Prepended to every child script: take this repository (the editable install's finder and the repository root on
# sys.path) out of reach, so that only the checkpoint's own copy of the code can be used.
ISOLATE = f"""
import importlib, os, sys
REPO = {str(REPO)!r}
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != REPO]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", None) or "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in (getattr(h, "__module__", None) or "")]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
try:
    import modeling_llama4
except ImportError:
    pass
else:
    raise AssertionError(f"modeling_llama4 is still importable from {{modeling_llama4.__file__}}")
import torch, transformers
from PIL import Image
"""

# With the checkpoints' code only: the Auto classes, the chat through the processor, forward and greedy generate.
REMOTE = """
multimodal, text, image_path, prompt, out = sys.argv[1:]
results = {}
model = transformers.AutoModelForImageTextToText.from_pretrained(multimodal, trust_remote_code=True).eval()
processor = transformers.AutoProcessor.from_pretrained(multimodal, trust_remote_code=True)
messages = [
    {"role": "user", "content": [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": prompt}]}
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
results["multimodal"] = dict(
    modules=[type(o).__module__ for o in (model, model.config, processor, processor.image_processor)],
    input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], logits=logits, generated=generated,
)
model = transformers.AutoModelForCausalLM.from_pretrained(text, trust_remote_code=True).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(text)
inputs = tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
results["text"] = dict(
    modules=[type(o).__module__ for o in (model, model.config)],
    input_ids=inputs["input_ids"], logits=logits, generated=generated,
)
results["imported"] = sorted(name for name in sys.modules if "llama4" in name)
torch.save(results, out)
"""

# Without trust_remote_code: transformers' own Llama 4 classes read the same files.
BUILTIN = """
multimodal, text, input_ids, out = sys.argv[1:]
model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(multimodal, output_loading_info=True)
results = {"multimodal": dict(module=type(model).__module__, info=info)}
model, info = transformers.Llama4ForCausalLM.from_pretrained(text, output_loading_info=True)
with torch.no_grad():
    logits = model.eval()(input_ids=torch.load(input_ids)).logits
results["text"] = dict(module=type(model).__module__, info=info, logits=logits)
torch.save(results, out)
"""


def run_isolated(script: str, *args, tmp: Path) -> None:
    """Run ``script`` in a fresh interpreter, outside the repository, where this package is not importable."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"), TRANSFORMERS_VERBOSITY="error")
    code = ISOLATE + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr[-6000:]}"


def chat_image() -> Image.Image:
    """A 60 x 150 random picture: two tiles and the global view at the tiny tile size."""
    pixels = np.random.default_rng(3).integers(0, 256, (60, 150, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny multimodal and text-only checkpoints, saved by the package, and the package's own outputs on them."""
    root = tmp_path_factory.mktemp("remote_code")
    torch.manual_seed(0)
    multimodal = Llama4ForConditionalGeneration(tiny_config()).eval()
    processor = build_processor(
        tile_size=TILE_SIZE, patch_size=PATCH_SIZE, pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO, max_patches=MAX_TILES
    )
    multimodal.save_pretrained(root / "multimodal")
    processor.save_pretrained(root / "multimodal")
    text = Llama4ForCausalLM(tiny_config().text_config).eval()
    text.save_pretrained(root / "text")
    processor.tokenizer.save_pretrained(root / "text")
    chat_image().save(root / "image.png")

    expected = {}
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(root / "image.png")}, {"type": "text", "text": PROMPT}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = multimodal(**inputs).logits
    generated = multimodal.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected["multimodal"] = dict(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], logits=logits, generated=generated
    )
    inputs = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = text(**inputs).logits
    generated = text.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected["text"] = dict(input_ids=inputs["input_ids"], logits=logits, generated=generated)
    torch.save(expected, root / "expected.pt")
    return SimpleNamespace(root=root, multimodal=root / "multimodal", text=root / "text", expected=expected)


def test_saved_files_and_auto_map(saved):
    config = json.loads((saved.multimodal / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llama4.Llama4Config",
        "AutoModelForImageTextToText": "modeling_llama4.Llama4ForConditionalGeneration",
    }
    processor_config = json.loads((saved.multimodal / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_llama4.Llama4Processor"}
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_llama4.Llama4ImageProcessor"
    )
    files = {path.name for path in saved.multimodal.iterdir()}
    assert CODE_FILES | PROCESSOR_CODE_FILES | PROCESSOR_FILES <= files

    config = json.loads((saved.text / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llama4.Llama4TextConfig",
        "AutoModelForCausalLM": "modeling_llama4.Llama4ForCausalLM",
    }
    assert CODE_FILES <= {path.name for path in saved.text.iterdir()}


@pytest.mark.parametrize(
    "kind, architecture, pipeline_tag",
    [
        ("multimodal", "Llama4ForConditionalGeneration", "image-text-to-text"),
        ("text", "Llama4ForCausalLM", "text-generation"),
    ],
)
def test_model_card(saved, kind, architecture, pipeline_tag):
    card = (getattr(saved, kind) / "README.md").read_text()
    assert f"| architecture | `{architecture}` |" in card
    assert f"pipeline_tag: {pipeline_tag}" in card
    assert ModelCard(card).data.library_name == "transformers"  # valid YAML metadata


def test_loads_as_remote_code_without_the_package(saved):
    out = saved.root / "remote.pt"
    run_isolated(REMOTE, saved.multimodal, saved.text, saved.root / "image.png", PROMPT, out, tmp=saved.root)
    got = torch.load(out)
    # Every class came from the checkpoint's copy of the code, imported by transformers as a dynamic module.
    assert all(
        module.startswith("transformers_modules.")
        for kind in ("multimodal", "text")
        for module in got[kind]["modules"]
    )
    assert not [name for name in got["imported"] if name.split(".")[0] == "modeling_llama4"]
    for kind in ("multimodal", "text"):
        expected = saved.expected[kind]
        for key in expected:
            torch.testing.assert_close(
                got[kind][key], expected[key], msg=lambda m, kind=kind, key=key: f"{kind} {key}: {m}"
            )


def test_loads_in_transformers_builtin_llama4(saved):
    out = saved.root / "builtin.pt"
    input_ids = saved.root / "text_input_ids.pt"
    torch.save(saved.expected["text"]["input_ids"], input_ids)
    run_isolated(BUILTIN, saved.multimodal, saved.text, input_ids, out, tmp=saved.root)
    got = torch.load(out)
    for kind in ("multimodal", "text"):
        assert got[kind]["module"] == "transformers.models.llama4.modeling_llama4"
        info = got[kind]["info"]
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    # transformers' multimodal forward is broken in 5.24; its text model computes what ours does.
    torch.testing.assert_close(got["text"]["logits"], saved.expected["text"]["logits"], atol=1e-4, rtol=1e-4)


def load_example():
    spec = importlib.util.spec_from_file_location("push_to_hub_example", REPO / "examples" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_push_to_hub_example(saved):
    """The example pushes model, processor and model card; the Hub is mocked at `HfApi`, which push_to_hub calls."""
    commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        # The staged folder is deleted once push_to_hub returns: read what matters now.
        files = {}
        for operation in operations:
            source = Path(operation.path_or_fileobj)
            files[operation.path_in_repo] = source.read_text() if source.suffix in {".json", ".md", ".py"} else None
        commits.append(dict(repo_id=repo_id, files=files, message=kwargs.get("commit_message")))

    hub = dict(
        create_repo=mock.DEFAULT,
        file_exists=mock.DEFAULT,
        create_commit=mock.DEFAULT,
        upload_file=mock.DEFAULT,
    )
    with (
        mock.patch.multiple(HfApi, autospec=True, **hub) as api,
        mock.patch.object(ModelCard, "load", side_effect=EntryNotFoundError("no card yet")),
    ):
        api["create_repo"].side_effect = lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)
        api["file_exists"].return_value = False
        api["create_commit"].side_effect = create_commit
        load_example().main(["--checkpoint", str(saved.multimodal), "--repo-id", "someone/tiny-llama4", "--private"])

    assert api["create_repo"].call_args_list[0].args[1] == "someone/tiny-llama4"
    assert api["create_repo"].call_args_list[0].kwargs["private"] is True
    assert [commit["repo_id"] for commit in commits] == ["someone/tiny-llama4"] * 2
    model_files, processor_files = commits[0]["files"], commits[1]["files"]
    assert {"config.json", "generation_config.json", "model.safetensors"} | CODE_FILES <= model_files.keys()
    config = json.loads(model_files["config.json"])
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llama4.Llama4ForConditionalGeneration"
    assert PROCESSOR_FILES | PROCESSOR_CODE_FILES <= processor_files.keys()
    assert json.loads(processor_files["processor_config.json"])["auto_map"] == {
        "AutoProcessor": "processing_llama4.Llama4Processor"
    }
    # push_to_hub uploads transformers' generic card; the example then replaces it with the package's.
    (card_call,) = api["upload_file"].call_args_list
    assert card_call.kwargs["repo_id"] == "someone/tiny-llama4" and card_call.kwargs["path_in_repo"] == "README.md"
    card = card_call.kwargs["path_or_fileobj"].decode()
    assert "| architecture | `Llama4ForConditionalGeneration` |" in card
    assert 'AutoModelForImageTextToText.from_pretrained("someone/tiny-llama4"' in card


def test_push_to_hub_example_dry_run(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default --output-dir: a new folder in tmp_path
    with mock.patch.multiple(
        HfApi, create_repo=mock.DEFAULT, create_commit=mock.DEFAULT, upload_file=mock.DEFAULT
    ) as api:
        load_example().main(["--checkpoint", str(saved.text), "--repo-id", "someone/tiny-text", "--dry-run"])
    assert not any(method.called for method in api.values())
    (output,) = tmp_path.iterdir()
    files = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} | {"tokenizer.json", "tokenizer_config.json"} <= files
    assert CODE_FILES <= files
    assert "# someone/tiny-text" in (output / "README.md").read_text()
    listing = capsys.readouterr().out
    assert "would upload to someone/tiny-text" in listing and "modeling_llama4.py" in listing
