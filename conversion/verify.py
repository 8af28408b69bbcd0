"""``--verify``: in a child process, load a converted checkpoint with this package's classes and run it; where Meta's
reference (``llama_models`` + ``fairscale``) is installed, compare its logits and image features with the reference's.

A child process, because Meta's reference on a CPU needs process-wide changes: a one-process gloo group, fairscale
model parallel of size 1, and ``Tensor.cuda`` made a no-op (Meta's code calls it unconditionally); and because it
holds the model twice, which the converting process then never does. Both models are built in float32 from the
same weights (the native ones rounded to the output dtype), so they should agree to float32 rounding: meant for
small models or big machines.

    python -m conversion.verify HF_DIR NATIVE_DIR DTYPE TOLERANCE   # the child; exit status 2 and the reason on stdout
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import ConversionError
from .native import NativeCheckpoint
from .params import load_params

logger = logging.getLogger(__name__)

SEQ_LEN = 32
TOLERANCE = 1e-5  # on max |difference|, relative to the reference's largest magnitude when that exceeds 1


def verify_conversion(hf_dir: Path, input_dir: Path, dtype: str) -> None:
    """Raise ``ConversionError`` unless the checkpoint in ``hf_dir`` loads strictly and runs, and matches Meta's
    reference built from ``input_dir`` where that is installed. Runs in a child process (its log goes to stderr)."""
    command = [sys.executable, "-m", __name__, str(hf_dir), str(input_dir), dtype, repr(TOLERANCE)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        reason = result.stdout.strip().splitlines()[-1:] or [f"it exited with status {result.returncode}"]
        raise ConversionError(f"verification of {hf_dir} failed: {reason[0]}")


def main(argv: Sequence[str]) -> int:
    """The child: exit status 0 when the checkpoint passes, 2 with the reason on stdout when it does not."""
    hf_dir, input_dir, dtype, tolerance = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = NativeCheckpoint(Path(input_dir), load_params(Path(input_dir)))
        check(Path(hf_dir), checkpoint, getattr(torch, dtype), float(tolerance))
    except ConversionError as error:
        print(error)
        return 2
    return 0


def check(hf_dir: Path, checkpoint: NativeCheckpoint, dtype: torch.dtype, tolerance: float, seed: int = 0) -> None:
    model = load_converted(hf_dir)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, checkpoint.vocab_size, (1, SEQ_LEN), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    if logits.shape != (1, SEQ_LEN, checkpoint.vocab_size) or not torch.isfinite(logits).all():
        raise ConversionError(f"the converted model gives logits of shape {tuple(logits.shape)} or non-finite")
    reference = meta_reference(checkpoint, dtype)
    if reference is None:
        logger.info("verify: the converted model loads and runs; Meta's reference is not installed to compare")
        return
    _compare("logits", logits, meta_logits(reference, tokens), tolerance)
    vision = checkpoint.args.vision_args
    if vision is not None:
        pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=generator)
        with torch.no_grad():
            features = model.multi_modal_projector(model.vision_model(pixels).last_hidden_state).float()
        _compare("image features", features, meta_image_features(reference, pixels), tolerance)
    logger.info("verify: logits%s match Meta's reference", " and image features" if vision else "")


def load_converted(hf_dir: Path):
    """The converted checkpoint in this package's model class, float32, loaded strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import modeling_llama4

    try:
        multimodal = isinstance(AutoConfig.from_pretrained(hf_dir), modeling_llama4.Llama4Config)
        auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model, info = auto.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as error:  # what from_pretrained raises for a missing or invalid file
        raise ConversionError(f"{hf_dir} does not load: {error}") from error
    problems = {kind: keys for kind, keys in info.items() if keys}  # missing, unexpected, mismatched keys, errors
    if problems:
        raise ConversionError(f"{hf_dir} does not load cleanly: {problems}")
    return model.eval()


def meta_reference(checkpoint: NativeCheckpoint, dtype: torch.dtype):
    """Meta's ``Transformer`` in float32 with the checkpoint's weights rounded to ``dtype`` (as converted), or None
    when ``llama_models`` and ``fairscale`` are not installed."""
    try:
        import fairscale.nn.model_parallel.initialize as fs_init
        from llama_models.llama4.args import ModelArgs
        from llama_models.llama4.model import Transformer
    except ImportError:
        return None
    with socket.socket() as probe:  # a free port for the one-process group
        probe.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(probe.getsockname()[1]))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    fs_init.initialize_model_parallel(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # this process only: Meta's code calls .cuda() on CPU
    params = {**checkpoint.args.raw, "vocab_size": checkpoint.vocab_size, "max_seq_len": SEQ_LEN, "max_batch_size": 1}
    torch.set_default_dtype(torch.float32)
    model = Transformer(ModelArgs(**params)).float()  # Meta keeps its vision encoder in bfloat16; compare in float32
    model.load_state_dict({key: tensor.to(dtype).float() for key, tensor in checkpoint.state_dict().items()})
    return model.eval()


def meta_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from llama_models.llama4.datatypes import TransformerInput

    return model(TransformerInput(tokens=tokens, tokens_position=0)).logits.float()


@torch.inference_mode()
def meta_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Meta's encoder → adapter → projection for ``[tiles, 3, H, W]`` (each tile its own one-chunk image)."""
    vision = model.vision_embeddings
    encoded = vision.vision_encoder(pixel_values[:, None])
    return model.vision_projection(vision.vision_adapter(encoded)).float()


def _compare(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    difference = (got - expected).abs().max().item()
    allowed = tolerance * max(1.0, expected.abs().max().item())
    logger.info("verify: %s max |difference| from Meta's reference %.3g (allowed %.3g)", what, difference, allowed)
    if not difference <= allowed:
        raise ConversionError(f"{what} differ from Meta's reference by {difference:.3g}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
