"""Write an int4-experts copy of a Llama 4 checkpoint (routed experts in group-wise int4, the rest unchanged).

    python examples/quantize_int4.py --model path/to/converted --output path/to/int4 [--group-size 128]
        [--quantize-shared-expert]
    python examples/quantize_int4.py --model tiny --output /tmp/tiny-int4

The experts are quantized tensor by tensor while loading, so the bf16 model is never held whole in memory; the
result loads with plain ``from_pretrained`` once ``modeling_llama4`` is imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` answers before torch loads)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, or 'tiny'")
    parser.add_argument("--output", required=True, type=Path, help="folder to write")
    parser.add_argument(
        "--group-size", type=int, default=128, help="int4 weights per scale along the input dim (default: 128)"
    )
    parser.add_argument(
        "--quantize-shared-expert", action="store_true", help="the shared experts in int4 too (Meta's int4_mixed)"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_llama4 import Llama4Int4Config
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    source = ensure_tiny_checkpoint() if args.model == "tiny" else Path(args.model)
    config = Llama4Int4Config(group_size=args.group_size, quantize_shared_expert=args.quantize_shared_expert)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype="bfloat16", quantization_config=config)
    model.save_pretrained(args.output)
    AutoProcessor.from_pretrained(source, trust_remote_code=True).save_pretrained(args.output)
    print(f"wrote {args.output}: {model.get_memory_footprint() / 2**20:.1f} MiB in memory")


if __name__ == "__main__":
    main()
