"""Push a Llama 4 checkpoint folder to the Hugging Face Hub as it is: weights, configs, code, model card.

    llama4-convert --input NATIVE --output OUT            # writes a complete repository folder
    python examples/push_to_hub.py --model OUT --repo-id user/name [--private]
    python examples/push_to_hub.py --model tiny --repo-id user/tiny-llama4 --dry-run

A folder written by ``llama4-convert`` or ``save_pretrained`` is a complete Hub repository (``modeling_llama4.hub``):
its modeling and processing code, an ``auto_map`` for every Auto class it serves, and a model card. It is checked
first (``check_folder``: the weights index names files that hold exactly the tensors it lists, config.json and
processor_config.json carry the complete ``auto_map``, the code files it names are there, README.md too), then
uploaded in one commit without loading anything, so pushing Maverick (~800 GB) takes no more memory than pushing the
tiny model. The large files go through the Hub's large-file protocol one by one, and files already uploaded are not
sent again: after an interruption, run the same command to resume.

A folder lacking the code (saved by transformers' own classes, or by an older converter) is loaded with this
package's classes and saved again to ``--output`` (a new temporary folder by default), then checked and pushed the
same way. The model card names its folder; the uploaded README.md names the repository instead.

``--dry-run`` uploads nothing and lists what would be uploaded. Log in first (``hf auth login``) or pass ``--token``.
"""
# huggingface_hub, safetensors and modeling_llama4 load in the functions that use them: ``--help`` answers at once.

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

logger = logging.getLogger("push_to_hub")
CARD_FILE = "README.md"


class IncompleteFolder(ValueError):
    """A folder that lacks the code, an ``auto_map`` or the model card: saving it again with this package fixes it."""


def check_folder(folder: Path) -> list[str]:
    """The files to upload (every file of ``folder`` but hidden ones), after checking the folder is complete.

    Raises ``ValueError`` naming the file for inconsistent weights, ``IncompleteFolder`` for missing code,
    ``auto_map`` or model card.
    """
    from modeling_llama4.hub import CONFIG_FILE, MODEL_AUTO_MAPS, PROCESSOR_AUTO_MAP, PROCESSOR_FILE, code_files

    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a checkpoint folder")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_AUTO_MAPS:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is not a Llama 4 one ({', '.join(MODEL_AUTO_MAPS)})"
        )
    check_weights(folder)
    auto_maps = {CONFIG_FILE: MODEL_AUTO_MAPS[model_type]}
    if (folder / PROCESSOR_FILE).is_file():
        auto_maps[PROCESSOR_FILE] = PROCESSOR_AUTO_MAP
    for file, auto_map in auto_maps.items():
        found = json.loads((folder / file).read_text(encoding="utf-8")).get("auto_map")
        if found != auto_map:
            raise IncompleteFolder(f"{folder / file}: auto_map is {found}, expected {auto_map}")
    missing = [path.name for path in code_files(auto_maps.values()) if not (folder / path.name).is_file()]
    if not (folder / CARD_FILE).is_file():
        missing.append(CARD_FILE)
    if missing:
        raise IncompleteFolder(f"{folder} lacks {', '.join(missing)}")
    return sorted(path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def check_weights(folder: Path) -> None:
    """Every weights file the index names exists and holds exactly the tensors the index assigns to it; no stray
    safetensors file beside them."""
    from safetensors import safe_open

    from modeling_llama4.hub import WEIGHTS_INDEX_FILE, weight_files

    files = weight_files(folder)
    stray = sorted({path.name for path in folder.glob("*.safetensors")} - set(files))
    if stray:
        raise ValueError(f"{folder}: {', '.join(stray)} not in {WEIGHTS_INDEX_FILE}")
    index = folder / WEIGHTS_INDEX_FILE
    expected = {file: set() for file in files}
    if index.is_file():
        for name, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items():
            expected[file].add(name)
    for file, names in expected.items():
        if not (folder / file).is_file():
            raise ValueError(f"{folder}: missing weights file {file}")
        with safe_open(folder / file, framework="pt") as weights:
            found = set(weights.keys())
        if index.is_file() and found != names:
            difference = sorted(found ^ names)
            raise ValueError(f"{folder / file} does not hold the tensors {index.name} lists: {difference[:8]}")


def resave_with_code(checkpoint: Path, output: Path) -> Path:
    """Load ``checkpoint`` with this package's classes and save it to ``output`` with the code, auto_maps and card."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from modeling_llama4 import Llama4Config, Llama4PreTrainedModel, Llama4Processor

    config = AutoConfig.from_pretrained(checkpoint)
    if isinstance(config, Llama4Config):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype="auto")
        preprocessor = Llama4Processor.from_pretrained(checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto")
        preprocessor = AutoTokenizer.from_pretrained(checkpoint)
    if not isinstance(model, Llama4PreTrainedModel):  # only our classes save the code
        raise TypeError(f"{checkpoint} loaded as {type(model).__module__}.{type(model).__name__}")
    preprocessor.save_pretrained(output)
    model.save_pretrained(output)  # last: it completes the processor's auto_maps too
    return output


def repository_card(folder: Path, repo_id: str) -> bytes:
    """README.md as uploaded: the package's card names the repository instead of the folder."""
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    name = folder.resolve().name
    card = card.replace(f"\n# {name}\n", f"\n# {repo_id}\n", 1).replace(
        f'from_pretrained("{name}"', f'from_pretrained("{repo_id}"'
    )
    return card.encode("utf-8")


def push_folder(folder: Path, files: list[str], repo_id: str, private: bool | None, token: str | None) -> None:
    """Create ``repo_id`` if needed and upload ``files`` of ``folder`` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=repository_card(folder, repo_id) if name == CARD_FILE else folder / name,
        )
        for name in files
    ]
    api.create_commit(repo_id, operations, commit_message=f"Upload Llama 4 checkpoint {folder.name}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, or 'tiny' (the demo model)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, 'user/name' or 'org/name'")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument(
        "--output", type=Path, help="where a folder lacking the code is saved again (default: a new temporary folder)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the files instead of uploading them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.model == "tiny":
        from modeling_llama4.tiny import ensure_tiny_checkpoint

        folder = ensure_tiny_checkpoint()
    else:
        folder = Path(args.model)
    try:
        files = check_folder(folder)
    except IncompleteFolder as error:
        output = args.output or Path(tempfile.mkdtemp(prefix=f"{args.repo_id.rsplit('/', 1)[-1]}-"))
        logger.info("%s; loading it with modeling_llama4 to save it again to %s", error, output)
        folder = resave_with_code(folder, output)
        files = check_folder(folder)
    except ValueError as error:
        raise SystemExit(f"push_to_hub: {error}") from None

    if args.dry_run:
        visibility = "private" if args.private else "public"
        print(f"dry run: would upload {folder} to {args.repo_id} ({visibility} if new):")
        for name in files:
            print(f"  {name:<40} {_size((folder / name).stat().st_size):>10}")
        return
    push_folder(folder, files, args.repo_id, private=args.private or None, token=args.token)
    print(f"pushed {folder} to https://huggingface.co/{args.repo_id}")


if __name__ == "__main__":
    main()
