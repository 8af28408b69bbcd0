"""The one source of small Llama 4 configs: the built-in tiny checkpoint, the tests' tiny configs, the benchmarks'
scaled ones.

``--model tiny`` in every script and in the demo means the tiny checkpoint built here (:func:`ensure_tiny_checkpoint`):
a random-weight multimodal Llama 4, built once and cached.

It has the real Llama 4 tokenizer (202,048 tokens, from the ``tokenizer.model`` shipped with ``llama-models``), the
real chat format and image processing, and a text backbone and vision encoder of the real architecture at toy
sizes, so every code path of the demo runs in seconds on a CPU. Its answers are random tokens.

The checkpoint is written to a temporary folder next to its final place and renamed into place when complete, so
a half-built cache (an interrupted build, a concurrent one) is never loaded.

Tests use the text configs :data:`SCOUT_LIKE` and :data:`MAVERICK_LIKE`, written in Meta's ``params.json`` form (for
the converter and Meta's reference) and turned into ours by :func:`text_config_from_meta`; benchmarks use
:data:`SCALED_SCOUT` and :data:`SCALED_SCOUT_640`. Not part of the modeling code: no modeling file imports this
module, so it is not saved as remote code with checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .modeling_llama4 import Llama4ForConditionalGeneration
from .processing_llama4 import build_processor

__all__ = [
    "MAVERICK_LIKE",
    "SCALED_SCOUT",
    "SCALED_SCOUT_640",
    "SCOUT_LIKE",
    "TILE_SIZE",
    "VOCAB",
    "default_cache_root",
    "ensure_tiny_checkpoint",
    "text_config_from_meta",
    "tiny_checkpoint_dir",
    "tiny_config",
]

logger = logging.getLogger(__name__)

TILE_SIZE = 56  # 4 x 4 patches of 14 px, pixel-shuffled to 4 tokens per tile
PATCH_SIZE = 14
PIXEL_SHUFFLE_RATIO = 0.5
MAX_TILES = 4
CONTEXT = 2048
# Bump when the tiny checkpoint's contents change in a way its config does not show.
TINY_FORMAT = 1
SEED = 0


TINY_TEXT = dict(
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
TINY_VISION = dict(
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


def tiny_config() -> Llama4Config:
    """The tiny model's config: 2 text layers of width 64 (one dense, one with 4 experts), 2 vision layers."""
    return Llama4Config(text_config=TINY_TEXT, vision_config=TINY_VISION)


def scaled_demo_config() -> Llama4Config:
    """The tiny model with the text model of :data:`SCALED_SCOUT` (hidden 512, 4 layers of 16 experts) and the real
    vocabulary: a random-weight demo model whose decode steps are dominated by the layers' weights, as a real
    checkpoint's are (the tiny model's are dominated by its 202,048-word output projection). Uses the tiny processor.
    """
    layers = {
        key: value for key, value in SCALED_SCOUT.items() if key not in ("vocab_size", "max_position_embeddings")
    }
    text = dict(TINY_TEXT, **layers)
    vision = dict(TINY_VISION, projector_output_dim=SCALED_SCOUT["hidden_size"])
    return Llama4Config(text_config=text, vision_config=vision)


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
    """Where the tiny checkpoint lives: ``<cache>/tiny-<package version>-<hash of its config and of the package's
    code>``. The folder carries copies of the package's modules (remote code, chat template), so a changed module
    means a new folder, not a stale copy next to the new package."""
    digest = hashlib.sha256(f"{TINY_FORMAT}:".encode())
    digest.update(json.dumps(tiny_config().to_dict(), sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parent
    for source in sorted([*package.glob("*.py"), *package.glob("*.jinja")]):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / f"tiny-{_package_version()}-{digest.hexdigest()[:10]}"


def build_checkpoint(destination: Path, config: Llama4Config | None = None) -> None:
    """Write a random-weight model (seeded; default the tiny one) and the tiny processor to ``destination``."""
    torch.manual_seed(SEED)
    model = Llama4ForConditionalGeneration(config or tiny_config()).eval()
    model.save_pretrained(destination)
    processor = build_processor(
        tile_size=TILE_SIZE, patch_size=PATCH_SIZE, pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO, max_patches=MAX_TILES
    )
    processor.save_pretrained(destination)


def ensure_tiny_checkpoint(cache_root: str | os.PathLike | None = None) -> Path:
    """Path of the cached tiny checkpoint, building it first if it is not there yet.

    Building needs Meta's ``tokenizer.model``, shipped with ``llama-models`` (the ``[tiny]`` extra; ``[app]`` and
    ``[test]`` bring it too): without it, an ``ImportError`` says what to install.
    """
    final = tiny_checkpoint_dir(cache_root)
    if final.is_dir():
        return final
    if importlib.util.find_spec("llama_models") is None:
        raise ImportError(
            "the tiny model (--model tiny) uses Meta's tokenizer.model from the llama-models package, which is not "
            'installed: pip install "modeling-llama4[tiny]" (or pip install llama-models==0.3.0)'
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the tiny random-weight Llama 4 in %s (once; takes a few seconds)", final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        build_checkpoint(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another builder
            raise
        logger.info("Another process finished building %s first; using its copy", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# Tests' text configs, in Meta's params.json form.
VOCAB = 320

# Scout-like: every layer MoE, scaled RoPE, QK norm, NoPE every 4th layer, temperature tuning that kicks in
# within the test sequence (floor_scale 4), chunks (8) shorter than the sequence.
SCOUT_LIKE = dict(
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=VOCAB,
    multiple_of=16,
    ffn_dim_multiplier=1.0,
    ffn_exp=2.0,
    norm_eps=1e-5,
    attention_chunk_size=8,
    use_scaled_rope=True,
    nope_layer_interval=4,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=4,
    max_seq_len=128,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=1),
)

# Maverick-like: MoE every second layer (dense layers between), no QK norm, no scaled RoPE.
MAVERICK_LIKE = dict(
    SCOUT_LIKE,
    use_scaled_rope=False,
    use_qk_norm=False,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2),
)


# Meta's Llama 3 RoPE scaling as Scout uses it (``use_scaled_rope``): the scaled configs below share it.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=16.0,
    low_freq_factor=1.0,
    high_freq_factor=1.0,
    original_max_position_embeddings=8192,
)


def text_config_from_meta(args: dict, **overrides) -> Llama4TextConfig:
    """Our config for a tiny Meta params dict (Meta's sizing formulas, spelled out for the test sizes)."""
    dim, multiple_of = args["dim"], args["multiple_of"]
    moe = args["moe_args"]
    expert_hidden = int(int(2 * int(args["ffn_exp"] * dim) / 3) * args["ffn_dim_multiplier"] / 2)  # auto_scale_F
    expert_hidden += -expert_hidden % multiple_of
    dense_hidden = int(args["ffn_dim_multiplier"] * int(2 * 4 * dim / 3))
    dense_hidden += -dense_hidden % multiple_of
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if args["use_scaled_rope"]:
        rope = dict(LLAMA3_ROPE)
    fields = dict(
        vocab_size=args["vocab_size"],
        hidden_size=dim,
        intermediate_size=expert_hidden,
        intermediate_size_mlp=dense_hidden,
        num_hidden_layers=args["n_layers"],
        num_attention_heads=args["n_heads"],
        num_key_value_heads=args["n_kv_heads"],
        head_dim=dim // args["n_heads"],
        rms_norm_eps=args["norm_eps"],
        rope_parameters=rope,
        no_rope_layer_interval=args["nope_layer_interval"],
        attention_chunk_size=args["attention_chunk_size"],
        use_qk_norm=args["use_qk_norm"],
        attn_temperature_tuning=args["attn_temperature_tuning"],
        floor_scale=args["floor_scale"],
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        interleave_moe_layer_step=moe["interleave_moe_layer_step"],
        max_position_embeddings=args["max_seq_len"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return Llama4TextConfig(**fields)


# Benchmarks: Scout-like (16 experts top-1, every layer MoE) at hidden 512, the text and LoRA benchmarks' model.
SCALED_SCOUT = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    intermediate_size_mlp=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=256,
    max_position_embeddings=4096,
    rope_parameters=LLAMA3_ROPE,
)

# Scale-out: SCALED_SCOUT with 4 kv heads (attention splits over 4 ranks), a smaller vocabulary (the routed experts
# ~90% of the weights, as in Scout) and default RoPE: the parallel benchmark's model.
SCALED_SCOUT_PARALLEL = dict(SCALED_SCOUT, vocab_size=8192, num_key_value_heads=4, rope_parameters=None)

# Scout's per-layer proportions (experts 16 x 3·D·1.6D, shared expert 3·D·1.6D, 5 query heads per kv head of width
# 128) at hidden 640, so that its routed-expert share of the weights is Scout's: the int4 benchmark's model.
SCALED_SCOUT_640 = dict(
    vocab_size=2048,
    hidden_size=640,
    intermediate_size=1024,
    intermediate_size_mlp=2048,
    num_hidden_layers=4,
    num_attention_heads=5,
    num_key_value_heads=1,
    head_dim=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=256,
    max_position_embeddings=4096,
)

# Long context: Scout's layer pattern (3 chunked RoPE layers, then 1 global NoPE layer) at hidden 256 with chunk
# 1024, small enough for prompts of 128K tokens on a CPU: the long-context benchmark's model.
SCALED_SCOUT_LONG = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    no_rope_layer_interval=4,
    attention_chunk_size=1024,
    max_position_embeddings=2**21,
    rope_parameters=LLAMA3_ROPE,
)
