"""``--verify``: load a converted checkpoint with the model classes and run it; where Meta's reference
(``llama_models`` + ``fairscale``) is installed, compare its logits and image features with the reference's.

Both models are built in float32 from the same weights (the native ones rounded to the output dtype), so they
should agree to float32 rounding. This holds the model in memory twice: meant for small models or big machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

import torch

from .errors import ConversionError
from .shards import NativeCheckpoint

logger = logging.getLogger(__name__)

SEQ_LEN = 32
TOLERANCE = 1e-3  # on max |difference|, relative to the reference's largest magnitude when that exceeds 1


def verify_conversion(hf_dir: Path, checkpoint: NativeCheckpoint, dtype: torch.dtype, seed: int = 0) -> None:
    """Raise ``ConversionError`` unless the checkpoint in ``hf_dir`` loads strictly and runs (and matches Meta's)."""
    model = load_converted(hf_dir)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, checkpoint.vocab_size, (1, SEQ_LEN), generator=generator)
    with torch.no_grad():
        logits = text_logits(model, tokens)
    if logits.shape != (1, SEQ_LEN, checkpoint.vocab_size) or not torch.isfinite(logits).all():
        raise ConversionError(
            f"{hf_dir}: the converted model gives logits of shape {tuple(logits.shape)} or non-finite"
        )
    reference = meta_reference(checkpoint, dtype)
    if reference is None:
        logger.info("verify: the converted model loads and runs; Meta's reference is not installed to compare")
        return
    _compare("logits", logits, meta_logits(reference, tokens))
    vision = checkpoint.args.vision_args
    if vision is not None:
        pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=generator)
        with torch.no_grad():
            _compare("image features", image_features(model, pixels), meta_image_features(reference, pixels))
    logger.info("verify: logits%s match Meta's reference", " and image features" if vision else "")


def load_converted(hf_dir: Path, dtype: torch.dtype = torch.float32):
    """The converted checkpoint in this package's model class (transformers' while ours does not exist), strict."""
    model_type = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    model, info = model_class(model_type).from_pretrained(hf_dir, dtype=dtype, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}  # missing, unexpected, mismatched keys, errors
    if problems:
        raise ConversionError(f"{hf_dir} does not load cleanly: {problems}")
    return model.eval()


def model_class(model_type: str):
    """``Llama4ForCausalLM`` for ``llama4_text``; for ``llama4`` this package's ``Llama4ForConditionalGeneration``
    once it exists, else transformers'."""
    import modeling_llama4

    if model_type == "llama4_text":
        return modeling_llama4.Llama4ForCausalLM
    ours = getattr(modeling_llama4, "Llama4ForConditionalGeneration", None)
    if ours is not None:
        return ours
    import transformers

    return transformers.Llama4ForConditionalGeneration


def text_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits for ``tokens``; transformers' multimodal forward fails in 5.24, so its language model is run."""
    import transformers

    if isinstance(model, transformers.Llama4ForConditionalGeneration):
        return model.language_model(input_ids=tokens).logits.float()
    return model(input_ids=tokens).logits.float()


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected vision features ``[tiles, tokens per tile, text hidden]`` of ``[tiles, 3, H, W]`` pixels."""
    encoded = model.vision_model(pixel_values.to(model.dtype)).last_hidden_state
    return model.multi_modal_projector(encoded).float()


# ----------------------------------------------------------------------------------------------------------------
# Meta's reference


def meta_reference(checkpoint: NativeCheckpoint, dtype: torch.dtype):
    """Meta's ``Transformer`` in float32 with the checkpoint's weights rounded to ``dtype`` (as converted), or None
    when ``llama_models`` and ``fairscale`` are not installed."""
    try:
        import fairscale  # noqa: F401
        from llama_models.llama4.args import ModelArgs
        from llama_models.llama4.model import Transformer
    except ImportError:
        return None
    init_model_parallel()
    raw = checkpoint.args.raw
    params = {**raw, "vocab_size": checkpoint.vocab_size, "max_seq_len": SEQ_LEN, "max_batch_size": 1}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with cuda_is_noop():
            model = Transformer(ModelArgs(**params))
    finally:
        torch.set_default_dtype(previous)
    model.float()  # Meta keeps its vision encoder in bfloat16; compare in float32
    model.load_state_dict({key: tensor.to(dtype).float() for key, tensor in checkpoint.state_dict().items()})
    return model.eval()


def meta_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from llama_models.llama4.datatypes import TransformerInput

    with cuda_is_noop():
        return model(TransformerInput(tokens=tokens, tokens_position=0)).logits.float()


@torch.inference_mode()
def meta_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Meta's encoder → adapter → projection for ``[tiles, 3, H, W]`` (each tile its own one-chunk image)."""
    vision = model.vision_embeddings
    encoded = vision.vision_encoder(pixel_values[:, None])
    return model.vision_projection(vision.vision_adapter(encoded)).float()


def init_model_parallel() -> None:
    """torch.distributed (gloo, one process) and fairscale model parallel of size 1, as Meta's layers require."""
    import fairscale.nn.model_parallel.initialize as fs_init

    if not torch.distributed.is_initialized():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@contextlib.contextmanager
def cuda_is_noop():
    """Meta's reference calls ``Tensor.cuda()`` unconditionally; on CPU let it return the tensor."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _compare(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    difference = (got - expected).abs().max().item()
    allowed = TOLERANCE * max(1.0, expected.abs().max().item())
    logger.info("verify: %s max |difference| from Meta's reference %.3g (allowed %.3g)", what, difference, allowed)
    if not difference <= allowed:
        raise ConversionError(f"verification failed: {what} differ from Meta's reference by {difference:.3g}")
