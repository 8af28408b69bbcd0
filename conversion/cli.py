"""``llama4-convert``: Meta's native Llama 4 checkpoints to Hugging Face format, and back with ``--to-native``.

llama4-convert --input NATIVE_DIR --output HF_DIR [--dtype bfloat16|float16|float32] [--instruct]
               [--max-shard-size 5GB] [--max-position-embeddings N] [--overwrite] [--verify]
               [--quantize int4|int4_mixed [--group-size 128] | --quantize fp8]
llama4-convert --to-native --input HF_DIR --output NATIVE_DIR [--dtype ...] [--overwrite]

Bad inputs end with a one-line error and exit status 2; SIGTERM, like Ctrl-C, removes the half-written output.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

from . import ConversionError
from .params import DEFAULT_MAX_POSITION_EMBEDDINGS

DEFAULT_GROUP_SIZE = 128

logger = logging.getLogger(__package__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama4-convert",
        description="Convert a native Llama 4 checkpoint (params.json, consolidated.*.pth, tokenizer.model) "
        "into a Hugging Face checkpoint, or back with --to-native.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Required (checked in main, so that the flags' former names, kept working but hidden, count too).
    parser.add_argument("--input", help="required: native checkpoint folder (HF folder with --to-native)")
    parser.add_argument("--output", help="required: folder to create; must be absent or empty")
    parser.add_argument("--input-dir", dest="input", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", dest="output", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="weight dtype of the output (None: bfloat16; with --to-native, the input's)",
    )
    parser.add_argument("--instruct", action="store_true", help="instruct model: stop on <|eot|>, <|eom|> too")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help=f"context length written to config.json (None: {DEFAULT_MAX_POSITION_EMBEDDINGS})",
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
        default=None,
        help="write the routed experts as int4 (modeling_llama4.int4; int4_mixed: the shared experts too, Meta's "
        "recipe) or in Meta's FP8 layout (modeling_llama4.fp8); the rest stays in --dtype",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help=f"with --quantize int4/int4_mixed: weights per scale along the input dim (None: {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument("--to-native", action="store_true", help="convert an HF checkpoint to Meta's native layout")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the process exit status (0 on success, 2 on a bad input)."""
    parser = build_parser()
    options = parser.parse_args(argv)
    for name in ("input", "output"):
        if options.__dict__[name] is None:
            parser.error(f"the following arguments are required: --{name}")
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if options.group_size is not None and not options.quantize:
            raise ConversionError("--group-size applies with --quantize only")
        if options.to_native:
            from .to_native import convert_hf_to_native

            if options.quantize:
                raise ConversionError("--quantize applies to native → HF conversion, not --to-native")

            convert_hf_to_native(options.input, options.output, dtype=options.dtype, overwrite=options.overwrite)
        else:
            from .convert import convert_native_to_hf

            convert_native_to_hf(
                options.input,
                options.output,
                dtype=options.dtype or "bfloat16",
                instruct=options.instruct,
                max_shard_size=options.max_shard_size,
                max_position_embeddings=options.max_position_embeddings,
                overwrite=options.overwrite,
                verify=options.verify,
                quantize=options.quantize,
                group_size=options.group_size or DEFAULT_GROUP_SIZE,
            )
    except ConversionError as error:
        logger.error("%s", error)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C (the staging folder is removed), exiting with the conventional 128 + 15."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
