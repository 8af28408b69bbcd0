"""``llama4-convert``: Meta's native Llama 4 checkpoints to Hugging Face format, and back with ``--to-native``.

llama4-convert --input NATIVE_DIR --output HF_DIR [--dtype bfloat16|float16|float32] [--instruct]
               [--max-shard-size 5GB] [--max-position-embeddings N] [--overwrite] [--verify]
               [--quantize int4|int4_mixed [--group-size 128] | --quantize fp8]
llama4-convert --to-native --input HF_DIR --output NATIVE_DIR [--dtype ...] [--overwrite]

Bad inputs end with a one-line error and exit status 2; Ctrl-C (exit 130) and SIGTERM (exit 143) remove the
half-written output. The parser needs only the standard library: the converter's modules (torch, transformers)
load once the arguments are read.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

from . import DEFAULT_MAX_POSITION_EMBEDDINGS, ConversionError

DEFAULT_GROUP_SIZE = 128
DEFAULT_DTYPE = "bfloat16"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

EXAMPLES = """examples:
  llama4-convert --input Llama-4-Scout-17B-16E-Instruct --output Scout-HF --instruct
  llama4-convert --input Llama-4-Scout-17B-16E-Instruct --output Scout-int4 --instruct --quantize int4
  llama4-convert --to-native --input Scout-HF --output Scout-native

Bad inputs end with a one-line error naming the file and exit status 2; nothing is written. Ctrl-C or SIGTERM
removes the half-written output."""

logger = logging.getLogger(__package__)


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults that depend on the direction (``--dtype``) are spelled out in their help."""
    parser = argparse.ArgumentParser(
        prog="llama4-convert",
        description="Convert a native Llama 4 checkpoint (params.json, consolidated.*.pth, tokenizer.model)\n"
        "into a Hugging Face checkpoint, or back with --to-native.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # One option, two spellings: --input-dir/--output-dir were the first names, so commands written for them work.
    parser.add_argument(
        "--input",
        "--input-dir",
        required=True,
        metavar="DIR",
        help="native checkpoint folder (HF folder with --to-native)",
    )
    parser.add_argument(
        "--output", "--output-dir", required=True, metavar="DIR", help="folder to create; must be absent or empty"
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help=f"weight dtype of the output (default: {DEFAULT_DTYPE}; with --to-native, the input's)",
    )
    parser.add_argument("--instruct", action="store_true", help="instruct model: stop on <|eot|>, <|eom|> too")
    parser.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors file (default: %(default)s)"
    )
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        metavar="N",
        help=f"context length written to config.json (default: {DEFAULT_MAX_POSITION_EMBEDDINGS})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="before publishing, load the result, run it, and compare with Meta's reference when installed "
        "(holds the model in memory twice)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int4", "int4_mixed", "fp8"],
        help="write the routed experts as int4 (modeling_llama4.int4; int4_mixed: the shared experts too, Meta's "
        "recipe) or in Meta's FP8 layout (modeling_llama4.fp8); the rest stays in --dtype",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help=f"with --quantize int4/int4_mixed: weights per scale along the input dim (default: {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument("--to-native", action="store_true", help="convert an HF checkpoint to Meta's native layout")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: %(default)s",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the process exit status (0 on success, 2 on a bad input, 130 on Ctrl-C)."""
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _convert(options)
    except ConversionError as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # the writer has removed its staging folder on the way up
        logger.error("interrupted: nothing was written to %s", options.output)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _convert(options: argparse.Namespace) -> None:
    """One conversion, in the direction ``options`` asks for (the heavy modules are imported here)."""
    if options.group_size is not None and not options.quantize:
        raise ConversionError("--group-size applies with --quantize only")
    if options.to_native:
        if options.quantize:
            raise ConversionError("--quantize applies to native → HF conversion, not --to-native")
        from .to_native import convert_hf_to_native

        convert_hf_to_native(options.input, options.output, dtype=options.dtype, overwrite=options.overwrite)
        return
    from .convert import convert_native_to_hf

    convert_native_to_hf(
        options.input,
        options.output,
        dtype=options.dtype or DEFAULT_DTYPE,
        instruct=options.instruct,
        max_shard_size=options.max_shard_size,
        max_position_embeddings=options.max_position_embeddings,
        overwrite=options.overwrite,
        verify=options.verify,
        quantize=options.quantize,
        group_size=options.group_size or DEFAULT_GROUP_SIZE,
    )


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C (the staging folder is removed), exiting with the conventional 128 + 15."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
