"""The files of an HF checkpoint besides the weights: tokenizer or processor, generation config.

The tokenizer and processor are this package's builders (``modeling_llama4.tokenization_llama4`` /
``processing_llama4``); the token ids that config.json and generation_config.json carry are read from the
tokenizer they build, so the three always agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import GenerationConfig

from .errors import ConversionError
from .params import NativeArgs, SpecialTokenIds

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")  # Meta's Tokenizer.stop_tokens: instruct eos
BASE_EOS_TOKEN = "<|end_of_text|>"
# Meta's sampling defaults (llama_models/llama4/scripts/completion.py and chat_completion.py).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


def check_tokenizer_model(path: Path, vocab_size: int) -> None:
    """Refuse a ``tokenizer.model`` that is not a tiktoken file or does not give ``vocab_size`` token ids (its BPE
    ranks, then Meta's special tokens), as Meta's ``Llama4.build`` requires of the embedding."""
    from modeling_llama4.tokenization_llama4 import LLAMA4_SPECIAL_TOKENS, load_tiktoken_ranks

    try:
        ranks = sorted(load_tiktoken_ranks(path).values())
    except (OSError, ValueError) as error:  # ValueError: not base64, not UTF-8, not "token rank" lines
        raise ConversionError(f"{path} is not a tiktoken BPE file: {error}") from error
    if ranks != list(range(len(ranks))):
        raise ConversionError(f"{path}: the BPE ranks are not 0, 1, 2, ... (found {len(ranks)} ranks)")
    size = len(ranks) + len(LLAMA4_SPECIAL_TOKENS)
    if size != vocab_size:
        raise ConversionError(
            f"{path} gives {size} token ids ({len(ranks)} BPE ranks + {len(LLAMA4_SPECIAL_TOKENS)} special tokens), "
            f"the token embedding has {vocab_size} rows: a tokenizer of another model, or a damaged one"
        )


def save_tokenizer_files(directory: Path, tokenizer_model: Path, args: NativeArgs, instruct: bool) -> SpecialTokenIds:
    """Save the tokenizer (text-only checkpoints) or the processor with its tile size (multimodal ones).

    Returns the special token ids of the saved tokenizer.
    """
    from modeling_llama4.processing_llama4 import Llama4Processor, build_processor
    from modeling_llama4.tokenization_llama4 import build_tokenizer

    if args.vision_args is None:
        tokenizer = build_tokenizer(tokenizer_model, instruct=instruct)
        tokenizer.save_pretrained(directory)
    else:
        vision = args.vision_args
        processor = build_processor(
            tokenizer_model_path=tokenizer_model,
            tile_size=vision.image_size,
            patch_size=vision.patch_size,
            pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
            instruct=instruct,
        )
        processor.save_pretrained(directory)
        tokenizer = processor.tokenizer

    def token_id(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or value == tokenizer.unk_token_id:
            raise ConversionError(f"{tokenizer_model}: the Llama 4 tokenizer has no {token}")
        return value

    return SpecialTokenIds(
        bos=tokenizer.bos_token_id,
        eos=[token_id(token) for token in STOP_TOKENS] if instruct else token_id(BASE_EOS_TOKEN),
        pad=tokenizer.pad_token_id,
        image=token_id(Llama4Processor.patch_token),
        image_start=token_id(Llama4Processor.image_start_token),
        image_end=token_id(Llama4Processor.image_end_token),
    )


def save_generation_config(directory: Path, tokens: SpecialTokenIds) -> None:
    """Stop on Meta's stop tokens (instruct) or end of text (base), with Meta's sampling defaults."""
    GenerationConfig(
        bos_token_id=tokens.bos, eos_token_id=tokens.eos, pad_token_id=tokens.pad, **SAMPLING_DEFAULTS
    ).save_pretrained(directory)
