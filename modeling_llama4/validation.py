"""Checks on what callers pass to the Llama 4 models, run before any computation.

Each raises a ``ValueError`` naming the input, what it holds and what was expected, where the model would otherwise
fail deep inside (an ``IndexError`` in the embedding, a matmul shape error in the vision tower), fail late (``generate``
reaching the context limit after minutes of decoding) or, worse, run and give wrong results (an attention mask of the
wrong length, ``<|patch|>`` tokens left as plain embeddings without their image).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .continuous_batching import is_paged

__all__ = ["Llama4GenerationMixin", "check_generate_inputs", "check_multimodal_inputs", "check_text_inputs"]


def _past_length(cache: Cache | None) -> int | None:
    """Tokens already cached; None under continuous batching, whose one batch mixes prompts and decode steps."""
    if is_paged(cache):
        return None
    return cache.get_seq_length() if cache is not None else 0


def _reads_values(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values: not while compiling or capturing a CUDA graph."""
    capturing = tensor.is_cuda and torch.cuda.is_current_stream_capturing()
    return not torch.compiler.is_compiling() and not capturing


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int, cache: Cache | None) -> None:
    """``input_ids [batch, seq]``: a non-empty integer tensor of ids in ``[0, vocab_size)``.

    Reading the ids' range waits for the device, so on accelerators it is read at prefill only: the decode steps
    of ``generate`` feed back the model's own tokens, and a host sync per step would stall the GPU. Inside a
    compiled graph (``torch.compile``) it is not read either: a value read would break the graph.
    """
    if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(
            f"input_ids must be an integer tensor [batch, sequence], got {input_ids.dtype} of shape "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one token per row")
    if not _reads_values(input_ids) or (input_ids.device.type != "cpu" and _past_length(cache) != 0):
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_text_inputs(
    config: Llama4TextConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | dict | None,
    cache: Cache | None,
) -> None:
    """The text model's inputs: token ids in the vocabulary, embeddings ``[batch, seq, hidden]``, and a 2-D
    ``attention_mask`` covering exactly the cached and the new tokens (``[batch, past + seq]``)."""
    if input_ids is not None:
        _check_token_ids(input_ids, config.vocab_size, cache)
        batch, length = input_ids.shape
    elif inputs_embeds is not None:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, sequence >= 1, hidden_size={config.hidden_size}], got shape "
                f"{tuple(inputs_embeds.shape)}"
            )
        batch, length = inputs_embeds.shape[:2]
    else:
        return
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not is_paged(cache):
        expected = (batch, _past_length(cache) + length)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected}: one row per sequence, "
                "one column per cached and new token"
            )


def check_multimodal_inputs(
    config: Llama4Config, input_ids: torch.Tensor | None, pixel_values: torch.Tensor | None, cache: Cache | None
) -> None:
    """Token ids in the vocabulary, tiles ``[num_tiles, channels, S, S]``, and no ``<|patch|>`` token without an
    image at prefill (its features would silently be the placeholder's embedding)."""
    if input_ids is not None:
        _check_token_ids(input_ids, config.text_config.vocab_size, cache)
    vision = config.vision_config
    if pixel_values is not None:
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        expected = ("num_tiles", vision.num_channels, side, side)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected[1:]:
            raise ValueError(
                f"pixel_values must be image tiles of shape {expected}, got {tuple(pixel_values.shape)}; "
                "build them with the processor"
            )
    elif input_ids is not None and _past_length(cache) == 0 and bool((input_ids == config.image_token_id).any()):
        raise ValueError(
            f"input_ids holds image patch tokens (id {config.image_token_id}) but no pixel_values were given: "
            "pass the images the prompt was built with"
        )
    elif is_paged(cache) and _reads_values(input_ids) and bool((input_ids == config.image_token_id).any()):
        raise ValueError(
            f"A continuous-batching request holds image patch tokens (id {config.image_token_id}): its requests "
            "carry token ids only, so the image would be lost. Send prompts with images through generate(...)."
        )


def _prompt_length(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int | None:
    """Tokens in the prompt ``generate`` starts from (cached ones included), from whichever input it was given."""
    prompt = input_ids if input_ids is not None else inputs_embeds
    return prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.ndim >= 2 else None


def _check_prompt_fits(prompt_length: int, context: int) -> None:
    if prompt_length >= context:
        raise ValueError(
            f"the prompt is {prompt_length} tokens long, but the model's context is max_position_embeddings="
            f"{context} tokens, so no token can be generated: shorten the prompt to at most {context - 1} tokens"
        )


def _check_generation_token_ids(generation_config: GenerationConfig, overrides: dict, vocab_size: int) -> None:
    """bos, eos and pad ids of the generation config (or of ``generate``'s keyword arguments) in the vocabulary:
    an eos id outside it never stops generation, a pad or bos id outside it fails deep in the embedding."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = overrides.get(name, getattr(generation_config, name, None))
        if value is None:
            continue
        ids = torch.as_tensor(value).flatten().tolist()
        bad = [token for token in ids if not 0 <= token < vocab_size]
        if bad:
            # generate_batch / init_continuous_batching write eos_token_id = -1 ("no stop token") into a config
            # that had none: the same config then reaches generate
            marker = (
                " (continuous batching's 'no stop token' marker)" if name == "eos_token_id" and bad[0] == -1 else ""
            )
            raise ValueError(
                f"{name} = {value!r} holds token id {bad[0]}{marker}, outside the vocabulary [0, {vocab_size}) "
                "(set it in generate's arguments or the model's generation_config)"
            )


def check_generate_inputs(
    model: GenerationMixin,
    input_ids: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    kwargs: dict,
) -> None:
    """What ``generate`` is given, checked before it builds anything from it.

    ``generate`` turns a 2-D ``attention_mask`` into position ids and then drops it when it holds only ones, so the
    forward pass never sees a mask of the wrong length; masks of other ranks fail with an ``IndexError`` inside it.
    """
    text_config = model.config.get_text_config()
    inputs_embeds = kwargs.get("inputs_embeds")
    prompt_length = _prompt_length(input_ids, inputs_embeds)
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and prompt_length is not None:
        prompt = input_ids if input_ids is not None else inputs_embeds
        expected = tuple(prompt.shape[:2])
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected}: generate takes a "
                "2-D mask [batch, prompt tokens] with 1 for each token to attend to and 0 for padding"
            )
    _check_generation_token_ids(generation_config or model.generation_config, kwargs, text_config.vocab_size)
    if prompt_length is not None:
        _check_prompt_fits(prompt_length, text_config.max_position_embeddings)


class Llama4GenerationMixin(GenerationMixin):
    """``GenerationMixin`` that checks its inputs and refuses, before generating anything, a length past the model's
    context."""

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, *args, **kwargs
    ):
        """``GenerationMixin.generate``, after :func:`check_generate_inputs`."""
        check_generate_inputs(
            self, inputs if inputs is not None else kwargs.get("input_ids"), generation_config, kwargs
        )
        return super().generate(inputs, generation_config, *args, **kwargs)

    def _validate_generated_length(
        self, generation_config: GenerationConfig, input_ids_length: int, has_default_max_length: bool
    ) -> None:
        """The total length is only known here, once ``generate`` has resolved ``max_new_tokens``/``max_length``."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        context = getattr(self.config, "text_config", self.config).max_position_embeddings
        _check_prompt_fits(input_ids_length, context)
        if generation_config.max_length > context:
            raise ValueError(
                f"generate would reach {generation_config.max_length} tokens ({input_ids_length} in the prompt + "
                f"max_new_tokens), past the model's context of max_position_embeddings={context}; lower "
                f"max_new_tokens to at most {context - input_ids_length}"
            )
