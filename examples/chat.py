"""Chat with a Llama 4 checkpoint about an image, streaming the answer to the terminal.

    python examples/chat.py --model tiny                       # built-in tiny random model: random tokens
    python examples/chat.py --model path/to/converted --image cat.png --prompt "What is this?"
    python examples/chat.py --model tiny --adapter out/adapter  # with a LoRA adapter from finetune_lora.py

``--model`` is a folder written by ``llama4-convert`` or ``finetune_lora.py --merge`` (or any Hugging Face Llama 4
checkpoint). Multimodal checkpoints open as ``AutoModelForImageTextToText``; text-only ones (no vision config) as
``AutoModelForCausalLM``, and then the chat has no image.
"""

from __future__ import annotations

import argparse
import threading

import torch
from PIL import Image
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with the defaults, and the module docstring's examples as written."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny", help="checkpoint folder or hub id, or 'tiny'")
    parser.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    parser.add_argument("--image", help="image file; a generated gradient when omitted")
    parser.add_argument("--prompt", default="Describe this picture in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto (accelerate's device map), cpu, cuda, ...")
    args = parser.parse_args()

    path = ensure_tiny_checkpoint() if args.model == "tiny" else args.model
    multimodal = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    processor = (AutoProcessor if multimodal else AutoTokenizer).from_pretrained(path)
    model = auto_class.from_pretrained(path, dtype=args.dtype, device_map=args.device).eval()
    if args.adapter:
        model = load_adapter(model, args.adapter).eval()

    content = [{"type": "text", "text": args.prompt}]
    if multimodal:
        picture = (
            Image.open(args.image) if args.image else Image.linear_gradient("L").resize((320, 200)).convert("RGB")
        )
        content.insert(0, {"type": "image", "image": picture})
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
    with torch.inference_mode():
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        for piece in streamer:
            print(piece, end="", flush=True)
        thread.join()
    print()


if __name__ == "__main__":
    main()
