"""Continuous batching on CPU: 16 concurrent prompts through ``generate_batch`` vs the same prompts one ``generate`` at
a time, on the same model, timed in one run, alternating; the tokens must be equal.

Model: the scaled Scout of ``tiny.SCALED_SCOUT`` (hidden 512, 16 experts top-1, every layer MoE, 4 layers, chunk
256). Prompts: ``--prompts`` random prompts of 16 to 128 tokens, each generating ``--new-tokens`` greedy tokens (no
stop token). The paged cache is sized for the work (``--page-size``, ``--max-batch-tokens``; transformers' default
sizes it from free memory, which on a CPU means tens of thousands of pages).

transformers' built-in Llama 4 is tried on the same prompts and its error is printed: it has no continuous batching
(its chunked-attention layers are a layer type the paged cache refuses).

Wall time, torch's default threads. Headline: total tokens/s of ``generate_batch`` ÷ one-at-a-time ``generate``.

    python benchmarks/bench_continuous_batching.py [--prompts 16] [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import transformers
from bench_text import build_pair
from timing import best_times, timed
from transformers import ContinuousBatchingConfig, GenerationConfig

PROMPT_LENGTHS = (16, 128)


def random_prompts(count: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(*PROMPT_LENGTHS, (count,), generator=generator)
    return [torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in lengths]


class Workload:
    """The prompts, run one ``generate`` at a time or through ``generate_batch``; each run keeps its tokens."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, paged: dict):
        self.model, self.prompts, self.paged = model, prompts, paged
        self.generation_config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        self.tokens: dict[str, list[list[int]]] = {}

    def one_at_a_time(self) -> list[list[int]]:
        config = self.generation_config
        return [
            self.model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
            for p in self.prompts
        ]

    def batched(self) -> list[list[int]]:
        outputs = self.model.generate_batch(
            self.prompts,
            generation_config=copy.deepcopy(self.generation_config),  # the manager sets eos_token_id on it
            continuous_batching_config=ContinuousBatchingConfig(**self.paged),
            progress_bar=False,
        )
        by_prompt = {tuple(out.prompt_ids): out.generated_tokens for out in outputs.values()}
        return [by_prompt[tuple(p)] for p in self.prompts]

    def run(self, name: str) -> Callable[[], float]:
        """A timed run of ``one_at_a_time`` or ``batched`` that keeps its tokens under that name."""
        return timed(lambda: self.tokens.__setitem__(name, getattr(self, name)()))


def built_in_attempt(model: torch.nn.Module, workload: Workload) -> str:
    try:
        Workload(model, workload.prompts[:1], 2, workload.paged).batched()
    except Exception as error:  # noqa: BLE001  (what the built-in raises is the figure printed)
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return "works"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    args = parser.parse_args()

    ours, theirs = build_pair()
    prompts = random_prompts(args.prompts, ours.config.vocab_size)
    blocks = args.prompts * -(-(PROMPT_LENGTHS[1] + args.new_tokens) // args.page_size) * 2
    paged = dict(page_size=args.page_size, max_batch_tokens=args.max_batch_tokens, num_blocks=blocks)
    workload = Workload(ours, prompts, args.new_tokens, paged)
    serial, batched = best_times([workload.run("one_at_a_time"), workload.run("batched")], args.repeats)
    total = args.prompts * args.new_tokens
    equal = workload.tokens["one_at_a_time"] == workload.tokens["batched"]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{args.prompts} prompts of {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, {args.new_tokens} new tokens each"
    )
    print("| | seconds | tokens/s |\n| --- | --- | --- |")
    print(f"| one generate at a time | {serial:.2f} | {total / serial:.1f} |")
    print(f"| generate_batch | {batched:.2f} | {total / batched:.1f} |")
    print(f"generate_batch / one at a time: {serial / batched:.2f}x tokens/s; tokens equal: {equal}")
    print(f"built-in Llama 4 generate_batch: {built_in_attempt(theirs, workload)}")


if __name__ == "__main__":
    main()
