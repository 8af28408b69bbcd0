"""Chat with a Llama 4 checkpoint about an image, streaming the answer to the terminal.

    python examples/chat.py --model tiny                       # built-in tiny random model: random tokens
    python examples/chat.py --model path/to/converted --image cat.png --prompt "What is this?"

``--model`` is a folder written by ``llama4-convert`` (or any Hugging Face Llama 4 checkpoint).
"""

from __future__ import annotations

import argparse
import threading

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

import modeling_llama4  # noqa: F401  (registers Llama 4 with the Auto classes)
from modeling_llama4.tiny import ensure_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="checkpoint folder or hub id, or 'tiny'")
    parser.add_argument("--image", help="image file; a generated gradient when omitted")
    parser.add_argument("--prompt", default="Describe this picture in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    path = ensure_tiny_checkpoint() if args.model == "tiny" else args.model
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto", device_map="auto").eval()

    picture = Image.open(args.image) if args.image else Image.linear_gradient("L").resize((320, 200)).convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": args.prompt}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
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
