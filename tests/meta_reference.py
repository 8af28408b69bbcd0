"""Build Meta's reference Llama 4 (``llama_models.llama4``) on CPU with tiny random weights, and map its state dict
to HF names.

Meta's code expects CUDA and an initialised fairscale model-parallel group. Here fairscale runs at world
size 1 over gloo and ``Tensor.cuda`` is a no-op while the reference is built or run, so it runs on any CPU machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

import torch

from conversion.mapping import hf_tensors


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


def native_to_hf_state_dict(native: Mapping[str, torch.Tensor], multimodal: bool) -> dict[str, torch.Tensor]:
    """A whole native state dict (module naming, shards merged) under HF names and layouts, by the converter's
    recipes (``conversion.mapping.hf_tensors``)."""
    converted: dict[str, torch.Tensor] = {}
    for recipe in hf_tensors(native, multimodal):
        tensor = torch.cat([native[key] for key in recipe.sources], dim=recipe.dim)
        converted[recipe.name] = tensor.t().contiguous() if recipe.transpose else tensor
    return converted


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Fill every parameter with seeded random values (norm weights around 1), in place.

    Meta's layers are built with ``init_method=lambda x: x`` over ``torch.empty``, i.e. uninitialised memory.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            is_norm = param.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name)
            value = 1.0 + 0.1 * noise if is_norm else std * noise
            param.copy_(value.to(param.dtype))


def build_reference(model_args: dict, seed: int = 0):
    """Return Meta's ``Transformer`` for ``model_args`` (a params.json-like dict), fp32, random weights, eval."""
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.model import Transformer

    init_model_parallel()
    args = ModelArgs(**model_args)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with cuda_is_noop():
            model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    randomize_(model, seed=seed)
    return model.eval()


def reference_logits(model, tokens: torch.Tensor, image_embedding=None) -> torch.Tensor:
    """Full-sequence forward of Meta's reference from position 0: logits [batch, seq, vocab] in fp32."""
    from llama_models.llama4.datatypes import TransformerInput

    with cuda_is_noop():
        out = model(TransformerInput(tokens=tokens, tokens_position=0, image_embedding=image_embedding))
    return out.logits
