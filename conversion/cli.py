"""``llama4-convert``: Meta's native Llama 4 checkpoints to Hugging Face format, and back with ``--to-native``.

llama4-convert --input-dir NATIVE_DIR --output-dir HF_DIR [--dtype bfloat16|float16|float32] [--instruct]
               [--max-shard-size 5GB] [--max-position-embeddings N] [--overwrite] [--verify]
               [--quantize int4|int4_mixed [--group-size 128] | --quantize fp8]
llama4-convert --to-native --input-dir HF_DIR --output-dir NATIVE_DIR [--dtype ...] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from .errors import ConversionError

logger = logging.getLogger("conversion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama4-convert",
        description="Convert a native Llama 4 checkpoint (params.json, consolidated.*.pth, tokenizer.model) "
        "into a Hugging Face checkpoint, or back with --to-native.",
    )
    parser.add_argument("--input-dir", required=True, help="native checkpoint folder (HF folder with --to-native)")
    parser.add_argument("--output-dir", required=True, help="folder to create; must be absent or empty")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="weight dtype of the output (default: bfloat16; with --to-native, keep the input's)",
    )
    parser.add_argument("--instruct", action="store_true", help="instruct model: stop on <|eot|>, <|eom|> too")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="context length written to config.json (default: 262144)",
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
        default=128,
        help="with --quantize int4/int4_mixed: weights per scale along the input dim (default: 128)",
    )
    parser.add_argument("--to-native", action="store_true", help="convert an HF checkpoint to Meta's native layout")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the process exit status (0 on success, 2 on a bad input)."""
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if options.to_native:
            from .to_native import convert_hf_to_native

            if options.quantize:
                raise ConversionError("--quantize applies to native → HF conversion, not --to-native")

            convert_hf_to_native(
                options.input_dir, options.output_dir, dtype=options.dtype, overwrite=options.overwrite
            )
        else:
            from .convert import convert_native_to_hf

            convert_native_to_hf(
                options.input_dir,
                options.output_dir,
                dtype=options.dtype or "bfloat16",
                instruct=options.instruct,
                max_shard_size=options.max_shard_size,
                max_position_embeddings=options.max_position_embeddings,
                overwrite=options.overwrite,
                verify=options.verify,
                quantize=options.quantize,
                group_size=options.group_size,
            )
    except ConversionError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
