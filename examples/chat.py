"""Chat with a Llama 4 checkpoint, about an image or text only, streaming the answer to the terminal.

    python examples/chat.py --model tiny --prompt "Hello!"      # built-in tiny random model: random tokens
    python examples/chat.py --model path/to/converted --image cat.png --prompt "What is this?"
    python examples/chat.py --model tiny --adapter OUT/adapter  # with a LoRA adapter from finetune_lora.py

``--model`` is a folder written by ``llama4-convert`` or ``finetune_lora.py --merge`` (or any Hugging Face Llama 4
checkpoint). Multimodal checkpoints open as ``AutoModelForImageTextToText``; text-only ones (no vision config) as
``AutoModelForCausalLM``. Without ``--image`` the chat is text only, whichever the checkpoint.
"""

from __future__ import annotations

import argparse
import threading

IMAGE_PROMPT = "Describe this picture in one sentence."
TEXT_PROMPT = "Hello! What can you do?"


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` answers before torch loads)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="checkpoint folder or Hub id, or 'tiny' (default: tiny)")
    parser.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    parser.add_argument("--image", help="image file to ask about (multimodal checkpoints); text only without it")
    parser.add_argument(
        "--prompt", help=f"the user's message (default: {IMAGE_PROMPT!r} with --image, else {TEXT_PROMPT!r})"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16 (default: auto)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (accelerate's device map), cpu, cuda, ... (default: auto)"
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        TextIteratorStreamer,
    )

    import modeling_llama4  # noqa: F401  (registers Llama 4 with the Auto classes, and expert LoRA with PEFT)
    from modeling_llama4.adapters import load_adapter
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint() if args.model == "tiny" else args.model
    multimodal = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    if args.image and not multimodal:
        parser.error(f"--image needs a multimodal checkpoint; {path} is text-only (no vision_config)")
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    processor = (AutoProcessor if multimodal else AutoTokenizer).from_pretrained(path)
    model = auto_class.from_pretrained(path, dtype=args.dtype, device_map=args.device).eval()
    if args.adapter:
        model = load_adapter(model, args.adapter).eval()

    content = [{"type": "text", "text": args.prompt or (IMAGE_PROMPT if args.image else TEXT_PROMPT)}]
    if args.image:
        content.insert(0, {"type": "image", "path": args.image})
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(model.device)

    tokenizer = processor.tokenizer if multimodal else processor
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)  # generate runs without gradients
    thread.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    thread.join()
    print()


if __name__ == "__main__":
    main()
