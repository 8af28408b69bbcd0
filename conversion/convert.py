"""Native Llama 4 checkpoint → Hugging Face checkpoint, streamed one layer at a time.

1. Check everything that can be checked without reading weights: params.json, tokenizer.model, the shard files
   and every tensor's name and shape in every shard (their pickled indexes only; ``native``).
2. In a staging folder beside the output: the tokenizer or processor, config.json and generation_config.json,
   then the weights. For each read group (a layer) the shards are memory-mapped and CRC-checked, each HF tensor is
   produced in row blocks (merged across ranks, fused, cast, checked finite) and streamed into the safetensors
   file being written, and the mappings are dropped. Last, what makes the folder a Hub repository (the modeling
   code, every ``auto_map``, the model card: ``modeling_llama4.hub.save_hub_files``, as ``save_pretrained``).
3. Optionally ``--verify`` the staged checkpoint, then rename it into place.

With ``--quantize int4|fp8`` the routed experts are written quantized as they stream (``conversion.quantize``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from modeling_llama4.hub import save_hub_files

from . import ConversionError
from .hf_config import SpecialTokenIds, build_hf_config
from .mapping import HFTensor, hf_tensors
from .native import NativeCheckpoint, Shard, read_group
from .params import DEFAULT_MAX_POSITION_EMBEDDINGS, NativeArgs, load_params
from .quantize import QUANTIZE_METHODS, Fp8Experts, Int4Experts, expert_quantizer
from .writer import ShardedSafetensorsWriter, TensorEntry, check_output_dir, parse_size, staged_output

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STOP_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")  # Meta's Tokenizer.stop_tokens: instruct eos
BASE_EOS_TOKEN = "<|end_of_text|>"
# Meta's sampling defaults (llama_models/llama4/scripts/completion.py and chat_completion.py).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
CHUNK_BYTES = 64 * 2**20  # the largest block of an output tensor built in memory at once


def convert_native_to_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    instruct: bool = False,
    max_shard_size: str | int = "5GB",
    max_position_embeddings: int | None = None,
    overwrite: bool = False,
    verify: bool = False,
    quantize: str | None = None,
    group_size: int = 128,
) -> Path:
    """Convert the native checkpoint in ``input_dir`` into an HF checkpoint at ``output_dir``.

    Args:
        dtype: weight dtype of the output (``bfloat16``, ``float16`` or ``float32``).
        instruct: an instruct checkpoint: eos is any of Meta's stop tokens (``<|eot|>``, ``<|eom|>``,
            ``<|end_of_text|>``) instead of ``<|end_of_text|>`` alone.
        max_shard_size: largest safetensors file (``"5GB"``, ``"2GiB"``, or bytes); a bigger tensor gets its own.
        max_position_embeddings: context length for config.json (params.json does not hold one).
        overwrite: replace a non-empty ``output_dir`` (only once the new checkpoint is complete).
        verify: load the result and run it in a child process before publishing it (see ``conversion.verify``).
        quantize: ``"int4"``: write the routed experts as int4 groups of ``group_size`` along their input dim
            (``"int4_mixed"``: the shared experts too); ``"fp8"``: in Meta's FP8 layout (both load with ``from_pretrained`` as is; see ``conversion.quantize``).

    Returns the output folder. Raises ``ConversionError`` for bad inputs; ``output_dir`` is then left as it was.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        max_file_bytes = parse_size(max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size: {error}") from error
    if quantize not in (None, *QUANTIZE_METHODS):
        raise ConversionError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_METHODS)}")
    if quantize and verify:
        raise ConversionError("--verify compares with the unquantized reference; run it without --quantize")
    if max_position_embeddings is not None and max_position_embeddings <= 0:
        raise ConversionError(f"--max-position-embeddings must be positive, got {max_position_embeddings}")
    check_output_dir(output_dir, input_dir, overwrite)
    args = load_params(input_dir)
    quantizer, quantization_config = expert_quantizer(args, quantize, group_size) if quantize else (None, None)
    tokenizer_model = input_dir / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise ConversionError(f"missing {tokenizer_model}: the tokenizer ships with the native checkpoint")
    checkpoint = NativeCheckpoint(input_dir, args)
    check_tokenizer_model(tokenizer_model, checkpoint.vocab_size)

    with staged_output(output_dir, overwrite) as staging:
        tokens = save_tokenizer_files(staging, tokenizer_model, args, instruct)
        context = max_position_embeddings or DEFAULT_MAX_POSITION_EMBEDDINGS
        config = build_hf_config(args, checkpoint.vocab_size, tokens, context, dtype)
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.save_pretrained(staging)
        save_generation_config(staging, tokens)
        write_weights(checkpoint, staging, DTYPES[dtype], max_file_bytes, quantizer=quantizer)
        save_hub_files(staging, config, name=output_dir.resolve().name)
        if verify:
            from .verify import verify_conversion

            verify_conversion(staging, input_dir, dtype)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer or processor, generation config


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


# ----------------------------------------------------------------------------------------------------------------
# Weights


def write_weights(
    checkpoint: NativeCheckpoint,
    directory: Path,
    dtype: torch.dtype,
    max_file_bytes: int,
    chunk_bytes: int = CHUNK_BYTES,
    quantizer: Int4Experts | Fp8Experts | None = None,
) -> None:
    """Stream every HF tensor of ``checkpoint`` into sharded safetensors files in ``directory``; with ``quantizer``
    the routed experts quantized (``conversion.quantize``)."""
    recipes = hf_tensors(checkpoint.schema, multimodal=checkpoint.args.vision_args is not None)
    quantized = {recipe.name for recipe in recipes if quantizer and quantizer.quantizes(recipe.name)}
    entries = []
    for recipe in recipes:
        shape = _shape(recipe, checkpoint)
        if recipe.name in quantized:
            entries.extend(quantizer.entries(recipe.name, shape))
        else:
            entries.append(TensorEntry(recipe.name, shape, dtype))
    with (
        ShardedSafetensorsWriter(directory, entries, max_file_bytes) as writer,
        tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="Converting", disable=None) as progress,
    ):
        for group in read_groups(recipes, checkpoint):
            with checkpoint.open({read_group(key) for recipe in group for key in recipe.sources}) as shards:
                for recipe in group:
                    chunks = _chunks(recipe, checkpoint, shards, dtype, chunk_bytes)
                    if recipe.name in quantized:
                        tensors = quantizer.tensors(recipe.name, chunks)
                    else:
                        tensors = [(recipe.name, chunks)]
                    for name, tensor_chunks in tensors:
                        writer.write(name, _counted(tensor_chunks, progress))


def read_groups(recipes: list[HFTensor], checkpoint: NativeCheckpoint) -> list[list[HFTensor]]:
    """Recipes batched into groups read under one opening of the shards.

    Each group holds whole read units (a layer, a block, a tensor outside them: ``native.read_group``); consecutive
    units share a group while their input bytes stay within the largest unit's, which bounds resident memory
    anyway. Fewer openings means fewer parses of the shards' pickled indexes.
    """
    units = [list(unit) for _, unit in itertools.groupby(recipes, key=lambda recipe: read_group(recipe.sources[0]))]
    sizes = [sum(checkpoint.nbytes[key] for recipe in unit for key in recipe.sources) for unit in units]
    budget = max(sizes)
    groups: list[list[HFTensor]] = []
    group_bytes = 0
    for unit, size in zip(units, sizes):
        if not groups or group_bytes + size > budget:
            groups.append([])
            group_bytes = 0
        groups[-1].extend(unit)
        group_bytes += size
    logger.debug("%d read units in %d groups of at most %.2f GB", len(units), len(groups), budget / 1e9)
    return groups


def _shape(recipe: HFTensor, checkpoint: NativeCheckpoint) -> tuple[int, ...]:
    shapes = [checkpoint.schema[key].shape for key in recipe.sources]
    shape = list(shapes[0])
    shape[recipe.dim] = sum(s[recipe.dim] for s in shapes)
    return tuple(reversed(shape)) if recipe.transpose else tuple(shape)


def _chunks(
    recipe: HFTensor, checkpoint: NativeCheckpoint, shards: list[Shard], dtype: torch.dtype, chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """The HF tensor as consecutive row blocks: every rank's piece of every source, concatenated, then cast."""
    pieces = [piece for key in recipe.sources for piece in checkpoint.pieces(shards, key)]
    if recipe.transpose:  # the router: small and replicated
        blocks = [torch.cat(pieces, dim=recipe.dim).t().contiguous()]
    else:
        ndim = pieces[0].ndim
        split_dims = {checkpoint.schema[key].split_dim for key in recipe.sources}
        if len(recipe.sources) > 1 and split_dims - {None, recipe.dim % ndim}:
            raise RuntimeError(f"{recipe.name}: sources are split on {split_dims}, not on the fused dim {recipe.dim}")
        dim = recipe.dim % ndim if len(recipe.sources) > 1 else (split_dims.pop() or 0)
        blocks = concat_row_blocks(pieces, dim, chunk_bytes)
    for block in blocks:
        block = block.to(dtype)
        if not _is_finite(block):
            raise ConversionError(
                f"{recipe.name}: non-finite weights (NaN or infinity in {dtype}) in {', '.join(recipe.sources)} "
                f"of {checkpoint.paths[0].parent}"
            )
        yield block


def _is_finite(block: torch.Tensor) -> bool:
    """No NaN or infinity in ``block``, by its min and max (NaN propagates), without a block-sized mask."""
    return block.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(block))).all())


def concat_row_blocks(pieces: list[torch.Tensor], dim: int, max_bytes: int) -> Iterator[torch.Tensor]:
    """``torch.cat(pieces, dim)`` as consecutive blocks of rows (dim 0) of about ``max_bytes`` each.

    On dim 0 the pieces are the blocks (no copy); on another dim each block concatenates the same rows of every
    piece, so at most one block is ever in memory.
    """
    if dim == 0 or len(pieces) == 1:
        for piece in pieces:
            yield from _row_blocks(piece, max_bytes)
        return
    rows = pieces[0].shape[0]
    row_bytes = sum(piece[:1].nbytes for piece in pieces)
    step = max(1, max_bytes // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield torch.cat([piece[start : start + step] for piece in pieces], dim=dim)


def _row_blocks(tensor: torch.Tensor, max_bytes: int) -> Iterator[torch.Tensor]:
    rows = tensor.shape[0] if tensor.ndim else 1
    step = max(1, max_bytes * rows // max(tensor.nbytes, 1))
    for start in range(0, rows, step):
        yield tensor[start : start + step]


def _counted(chunks: Iterator[torch.Tensor], progress: tqdm) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        yield chunk
        progress.update(chunk.nbytes)
