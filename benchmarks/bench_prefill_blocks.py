"""Blocked prefill and the experts' batches: MoE / dense prefill time at each prefill block size, in one run.

A prompt longer than ``prefill_block_size`` is prefilled block by block (memory bounded by the block), which splits
each expert's batch of rows with it. The old default block was ``attention_chunk_size`` (256 on this config); the
default now is at least ``MIN_PREFILL_BLOCK`` (2048). This script prefills one prompt (``--tokens``, cache filled,
last logits, as ``generate`` does) with the MoE model of ``bench_text.build_limit_pair(16)`` (2 layers, 16 experts
top-1) and with its dense twin at equal active width, and prints MoE/dense time for: the old default block, the new
default, and one block for the whole prompt (as before blocked prefill existed). The dense twin's time barely depends
on the block: the ratio shows what blocking costs the experts.

One thread, process CPU time (see bench_text.py); the two models alternate, fastest of ``--repeats`` kept.

    python benchmarks/bench_prefill_blocks.py [--tokens 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from bench_text import build_limit_pair
from timing import best_times, timed

from modeling_llama4.modeling_llama4 import MIN_PREFILL_BLOCK


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # the scaled RoPE settings trip config warnings
    moe, dense = build_limit_pair(16)
    chunk = moe.config.attention_chunk_size
    prompt = torch.randint(0, moe.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    blocks = {
        f"old default: attention_chunk_size ({chunk})": chunk,
        f"default: max(chunk, MIN_PREFILL_BLOCK) ({max(chunk, MIN_PREFILL_BLOCK)})": None,
        f"one block ({args.tokens})": args.tokens,
    }
    print(f"CPU, 1 thread (process CPU time), torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prefill 1 x {args.tokens}, 2 layers, 16 experts top-1 vs dense twin at equal active width\n")
    print("| prefill block | MoE/dense time |\n| --- | --- |")
    for name, block in blocks.items():
        runs = [
            timed(
                lambda m=model, b=block: m(prompt, use_cache=True, logits_to_keep=1, prefill_block_size=b),
                time.process_time,
            )
            for model in (moe, dense)
        ]
        moe_time, dense_time = best_times(runs, args.repeats)
        print(f"| {name} | {moe_time / dense_time:.2f}x |")


if __name__ == "__main__":
    main()
