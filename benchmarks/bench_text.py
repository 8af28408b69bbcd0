"""Text backbone speed: this package vs transformers' built-in Llama 4 on the same weights, same run, CPU.

A scaled Scout-like config (16 experts, top-1, every layer MoE, hidden 512, 4 layers). Prints, as ratios
ours/theirs (> 1 means we are faster): the MoE block alone, prefill tokens/s (1 × 512 tokens) and greedy decode
tokens/s (32 new tokens), with the max |Δlogit| between the two models.

    python benchmarks/bench_text.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import transformers
from timing import best_time

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.tiny import SCALED_SCOUT


def build_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    config = Llama4TextConfig(**SCALED_SCOUT)
    torch.manual_seed(0)
    ours = Llama4ForCausalLM(config).eval()
    theirs = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_dict())).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, theirs = build_pair()
    prompt = torch.randint(0, SCALED_SCOUT["vocab_size"], (1, args.prefill_tokens))
    delta = (ours(prompt).logits - theirs(prompt).logits).abs().max().item()

    x = torch.randn(1, args.prefill_tokens, SCALED_SCOUT["hidden_size"])
    moe_ours, moe_theirs = ours.model.layers[0].feed_forward, theirs.model.layers[0].feed_forward
    moe = [best_time(lambda m=m: m(x), args.repeats) for m in (moe_ours, moe_theirs)]
    # prefill as generate runs it: fill the cache, logits for the last position only
    prefill = [
        best_time(lambda m=m: m(prompt, use_cache=True, logits_to_keep=1), args.repeats) for m in (ours, theirs)
    ]

    def decode(model: torch.nn.Module) -> Callable[[], object]:
        short_prompt = prompt[:, :64]
        return lambda: model.generate(
            short_prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )

    decode_times = [best_time(decode(m), args.repeats) for m in (ours, theirs)]

    print(f"config: scaled Scout (hidden 512, 16 experts top-1, 4 layers), {args.threads} threads, CPU")
    print(f"max |logit ours - transformers| = {delta:.2e}")
    print(f"MoE block  ({args.prefill_tokens} tokens): ours/theirs speed = {moe[1] / moe[0]:.2f}x")
    tokens_per_s = [args.prefill_tokens / t for t in prefill]
    print(
        f"prefill    (1 x {args.prefill_tokens}): ours {tokens_per_s[0]:.0f} tok/s, theirs {tokens_per_s[1]:.0f} tok/s"
        f" -> {prefill[1] / prefill[0]:.2f}x"
    )
    decode_rate = [args.new_tokens / t for t in decode_times]
    print(
        f"decode     ({args.new_tokens} new tokens): ours {decode_rate[0]:.1f} tok/s, theirs {decode_rate[1]:.1f} tok/s"
        f" -> {decode_times[1] / decode_times[0]:.2f}x"
    )


if __name__ == "__main__":
    main()
