"""``llama4-demo`` / ``python -m app``: serve the Llama 4 chat demo."""

from __future__ import annotations

import argparse
import logging
import os

__all__ = ["main", "parse_args"]

logger = logging.getLogger(__package__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` shows them)."""
    parser = argparse.ArgumentParser(
        prog="llama4-demo",
        description="Chat with a Llama 4 model (text and images) in the browser.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built-in random-weight model: random answers), a Hugging Face format folder or a Hub id",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 exposes the demo")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--adapter", default=None, metavar="LORA_DIR", help="LoRA adapter (PEFT folder or Hub id)")
    parser.add_argument("--max-images", type=int, default=4, help="images per message")
    parser.add_argument("--max-image-mb", type=float, default=10.0, help="size of one uploaded image")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the model, build the page and serve it until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from .chat import ChatEngine, Limits
    from .loading import load
    from .ui import build_demo, launch_kwargs

    limits = Limits(
        max_images_per_message=args.max_images,
        max_images_per_chat=max(2 * args.max_images, Limits.max_images_per_chat),
        max_image_bytes=int(args.max_image_mb * 2**20),
    )
    loaded = load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
    engine = ChatEngine(loaded.model, loaded.processor, limits)
    demo = build_demo(engine, loaded.label, loaded.is_tiny)
    if args.host not in LOCAL_HOSTS:
        logger.warning("Listening on %s: anyone who can reach this machine can use the demo", args.host)
    logger.info("Serving %s at http://%s:%d", loaded.label, args.host, args.port)
    demo.launch(**launch_kwargs(args.host, args.port, limits))
    return 0
