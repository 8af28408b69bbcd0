"""``llama4-demo`` / ``python -m app``: serve the Llama 4 chat demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

__all__ = ["main", "parse_args"]

logger = logging.getLogger(__package__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The answer length the page starts with: the tiny model's 64 tokens take a few seconds on a CPU.
DEFAULT_MAX_NEW_TOKENS = 256
TINY_MAX_NEW_TOKENS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` shows them). Only the standard library is imported here, so ``--help`` and a
    mistyped flag answer at once; torch, transformers and gradio load in :func:`main`."""
    parser = argparse.ArgumentParser(
        prog="llama4-demo",
        description="Chat with a Llama 4 model (text and images) in the browser.",
        epilog="examples:\n"
        "  llama4-demo                                # the built-in tiny model on http://127.0.0.1:7860\n"
        "  llama4-demo --model path/to/converted --adapter out/adapter\n"
        "  llama4-demo --model meta-llama/Llama-4-Scout-17B-16E-Instruct --host 0.0.0.0 --port 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built-in random-weight model: random answers), a Hugging Face format folder or a Hub id "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 exposes the demo to the network (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=7860, help="default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU that has it, else float32 (default: %(default)s)",
    )
    parser.add_argument("--adapter", metavar="LORA_DIR", help="LoRA adapter (PEFT folder or Hub id)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"answer length the page starts with, adjustable there (default: {TINY_MAX_NEW_TOKENS} on the tiny "
        f"model, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--batching",
        default="continuous",
        choices=["none", "continuous"],
        help="how concurrent chats are answered: 'continuous' runs the text chats in one shared loop whose forward "
        "passes serve them all (transformers' continuous batching); chats with images, and chats whose decoding "
        "the loop does not serve (see --temperature), go through generate one at a time. 'none' answers every chat "
        "through generate, one at a time (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="the page's initial temperature; with --batching continuous also the shared loop's sampling: 0 makes "
        "it greedy (then sampled chats go through generate), above 0 it samples with each chat's own temperature and "
        "top-p (then greedy chats go through generate) (default: %(default)s)",
    )
    parser.add_argument("--top-p", type=float, default=0.9, help="the page's initial top-p (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=4, help="images per message (default: %(default)s)")
    parser.add_argument(
        "--max-image-mb", type=float, default=10.0, help="size of one uploaded image (default: %(default)s)"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: %(default)s"
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Load the model, build the page and serve it until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # Others' INFO chatter stays out: Gradio's start-up checks log each HTTP request, transformers' continuous
        # batching loop its cache sizing and thread choices.
        for chatty in ("httpx", "ContinuousBatchingLogger"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from .chat import ChatEngine, GenerationSettings, Limits
    from .loading import load
    from .ui import build_demo, launch_kwargs

    limits = Limits(
        max_images_per_message=args.max_images,
        max_images_per_chat=max(2 * args.max_images, Limits.max_images_per_chat),
        max_image_bytes=int(args.max_image_mb * 2**20),
    )
    loaded = load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
    sampling = GenerationSettings(temperature=args.temperature, top_p=args.top_p)
    engine = ChatEngine(loaded.model, loaded.processor, limits, batching=args.batching, sampling=sampling)
    # SIGTERM (a service manager, a test) ends the app as Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        max_new_tokens = args.max_new_tokens or (TINY_MAX_NEW_TOKENS if loaded.is_tiny else DEFAULT_MAX_NEW_TOKENS)
        demo = build_demo(engine, loaded.label, loaded.is_tiny, max_new_tokens=max_new_tokens)
        if args.host not in LOCAL_HOSTS:
            logger.warning("Listening on %s: anyone who can reach this machine can use the demo", args.host)
        logger.info("Serving %s at http://%s:%d (batching: %s)", loaded.label, args.host, args.port, args.batching)
        demo.launch(**launch_kwargs(args.host, args.port, limits))
    finally:
        engine.close()
    return 0
