"""Push a converted Llama 4 checkpoint to the Hugging Face Hub, with its modeling code and model card.

    python examples/push_to_hub.py --checkpoint path/to/converted --repo-id user/name [--private]
    python examples/push_to_hub.py --checkpoint tiny --repo-id user/tiny-llama4 --dry-run

The model is loaded with this package's classes, so ``push_to_hub`` saves their code beside the weights and writes an
``auto_map`` into the configs: the repository loads with ``trust_remote_code=True`` where ``modeling_llama4`` is not
installed, and in transformers' built-in Llama 4 without it. A multimodal checkpoint goes up with its processor (image
processor, tokenizer, chat template and the processor's code), a text-only one with its tokenizer.

``push_to_hub`` uploads transformers' generic model card (or keeps the card already in the repository), not the one
``save_pretrained`` writes, so this script uploads the package's model card afterwards, unless the repository already
had a card before the push (``--overwrite-card`` replaces it anyway).

``--dry-run`` uploads nothing: it writes the files that would be uploaded to ``--output-dir`` (a new temporary folder
by default) and lists them. Log in first (``hf auth login``) or pass ``--token``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from modeling_llama4 import Llama4Config, Llama4PreTrainedModel, Llama4Processor
from modeling_llama4.model_card import write_model_card


def load_checkpoint(checkpoint: str | Path, dtype: str = "auto"):
    """(model, processor) for a multimodal checkpoint, (model, tokenizer) for a text-only one, as this package's classes."""
    config = AutoConfig.from_pretrained(checkpoint)
    if isinstance(config, Llama4Config):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
        # By class, not AutoProcessor: the saved name "Llama4Processor" resolves to transformers' own class.
        preprocessor = Llama4Processor.from_pretrained(checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        preprocessor = AutoTokenizer.from_pretrained(checkpoint)
    if not isinstance(model, Llama4PreTrainedModel):  # only our classes save their code (`register_for_auto_class`)
        raise TypeError(
            f"{checkpoint} loaded as {type(model).__module__}.{type(model).__name__}, not a modeling_llama4 model"
        )
    return model, preprocessor


def model_card(model: Llama4PreTrainedModel, repo_id: str) -> str:
    """The package's model card for ``model``, naming the Hub repository ``repo_id``."""
    name = repo_id.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name  # the card is titled after its folder
        folder.mkdir()
        write_model_card(folder, model.config, model.num_parameters())
        text = (folder / "README.md").read_text(encoding="utf-8")
    return text.replace(f"\n# {name}\n", f"\n# {repo_id}\n", 1).replace(
        f'from_pretrained("{name}"', f'from_pretrained("{repo_id}"'
    )


def stage(model, preprocessor, folder: str | Path, repo_id: str) -> list[Path]:
    """Write to ``folder`` what the push uploads (weights, configs, code, preprocessor files, model card)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model, repo_id), encoding="utf-8")
    return sorted(path for path in folder.rglob("*") if path.is_file())


def push(
    model,
    preprocessor,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    overwrite_card: bool = False,
) -> None:
    """Upload the model (weights, config, code), its preprocessor and the model card to ``repo_id``."""
    api = HfApi(token=token)
    had_card = api.file_exists(repo_id, "README.md")
    model.push_to_hub(repo_id, private=private, token=token, commit_message="Upload Llama 4 model and modeling code")
    preprocessor.push_to_hub(repo_id, token=token, commit_message=f"Upload {type(preprocessor).__name__}")
    if had_card and not overwrite_card:
        print(f"kept the model card already in {repo_id} (--overwrite-card to replace it)")
        return
    api.upload_file(
        path_or_fileobj=model_card(model, repo_id).encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        commit_message="Add model card",
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint folder, or 'tiny' (the demo model)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, 'user/name' or 'org/name'")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--token", default=None, help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument("--dtype", default="auto", help="dtype to load and upload the weights in (default: as saved)")
    parser.add_argument("--overwrite-card", action="store_true", help="replace a model card already in the repository")
    parser.add_argument("--dry-run", action="store_true", help="write the files to --output-dir instead of uploading")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where --dry-run writes (default: a temp folder)"
    )
    args = parser.parse_args(argv)

    if args.checkpoint == "tiny":
        from modeling_llama4.tiny import ensure_tiny_checkpoint

        checkpoint = ensure_tiny_checkpoint()
    else:
        checkpoint = Path(args.checkpoint)
    model, preprocessor = load_checkpoint(checkpoint, dtype=args.dtype)

    if args.dry_run:
        output = args.output_dir or Path(tempfile.mkdtemp(prefix=f"{args.repo_id.rsplit('/', 1)[-1]}-"))
        files = stage(model, preprocessor, output, args.repo_id)
        visibility = "private" if args.private else "public"
        print(f"dry run: would upload to {args.repo_id} ({visibility} if new) these files, written to {output}:")
        for path in files:
            print(f"  {str(path.relative_to(output)):<32} {_size(path.stat().st_size):>10}")
        return

    push(
        model,
        preprocessor,
        args.repo_id,
        private=args.private or None,
        token=args.token,
        overwrite_card=args.overwrite_card,
    )
    print(f"pushed {checkpoint} to https://huggingface.co/{args.repo_id}")


if __name__ == "__main__":
    main()
