"""The demo's default model: a tiny random-weight multimodal Llama 4, built once and cached.

It has the real Llama 4 tokenizer (202,048 tokens, from the ``tokenizer.model`` shipped with ``llama-models``), the
real chat format and image processing, and a text backbone and vision encoder of the real architecture at toy
sizes, so every code path of the demo runs in seconds on a CPU. Its answers are random tokens.

The checkpoint is written to a temporary folder next to its final place and renamed into place when complete, so
a half-built cache (an interrupted build, a concurrent one) is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["TILE_SIZE", "default_cache_root", "ensure_tiny_checkpoint", "tiny_checkpoint_dir", "tiny_config"]

logger = logging.getLogger(__name__)

TILE_SIZE = 56  # 4 x 4 patches of 14 px, pixel-shuffled to 4 tokens per tile
PATCH_SIZE = 14
PIXEL_SHUFFLE_RATIO = 0.5
MAX_TILES = 4
CONTEXT = 2048
# Bump when the tiny checkpoint's contents change in a way its config does not show.
TINY_FORMAT = 1
SEED = 0


def tiny_config():
    """The tiny model's ``Llama4Config``: 2 text layers of width 64 (one dense, one with 4 experts), 2 vision layers."""
    from modeling_llama4 import Llama4Config

    text_config = dict(
        vocab_size=202048,  # the real tokenizer's
        hidden_size=64,
        intermediate_size=64,
        intermediate_size_mlp=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # layer 0 dense, layer 1 MoE
        no_rope_layer_interval=2,  # layer 0 RoPE (chunked), layer 1 NoPE
        attention_chunk_size=512,
        max_position_embeddings=CONTEXT,
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
    )
    vision_config = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,  # hidden_size / pixel_shuffle_ratio**2
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
        projector_input_dim=64,
        projector_output_dim=64,
        vision_output_dim=64,
    )
    return Llama4Config(text_config=text_config, vision_config=vision_config)


def default_cache_root() -> Path:
    """``$LLAMA4_DEMO_CACHE``, else ``$XDG_CACHE_HOME/modeling_llama4``, else ``~/.cache/modeling_llama4``."""
    if os.environ.get("LLAMA4_DEMO_CACHE"):
        return Path(os.environ["LLAMA4_DEMO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modeling_llama4"


def _package_version() -> str:
    try:
        return metadata.version("modeling-llama4")
    except metadata.PackageNotFoundError:
        return "dev"


def tiny_checkpoint_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """Where the tiny checkpoint lives: ``<cache>/tiny-<package version>-<hash of its config>``."""
    config_json = json.dumps(tiny_config().to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{TINY_FORMAT}:{config_json}".encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / f"tiny-{_package_version()}-{digest}"


def _build(destination: Path) -> None:
    """Write the tiny model (seeded random weights) and its processor to ``destination``."""
    from modeling_llama4 import Llama4ForConditionalGeneration
    from modeling_llama4.processing_llama4 import build_processor

    torch.manual_seed(SEED)
    model = Llama4ForConditionalGeneration(tiny_config()).eval()
    model.save_pretrained(destination)
    processor = build_processor(
        tile_size=TILE_SIZE, patch_size=PATCH_SIZE, pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO, max_patches=MAX_TILES
    )
    processor.save_pretrained(destination)


def ensure_tiny_checkpoint(cache_root: str | os.PathLike | None = None) -> Path:
    """Path of the cached tiny checkpoint, building it first if it is not there yet."""
    final = tiny_checkpoint_dir(cache_root)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the tiny random-weight Llama 4 in %s (once; takes a few seconds)", final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        _build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another builder
            raise
        logger.info("Another process finished building %s first; using its copy", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
