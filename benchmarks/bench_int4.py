"""int4 routed experts vs bf16 on a scaled Scout: footprint ratio (measured and on paper) and decode speed, CPU.

The scaled config keeps Scout's per-layer proportions (experts 16 × 3·D·1.6D, shared expert 3·D·1.6D, attention
with 5 query heads per kv head of width 128) at hidden 640, so its routed-expert share of the weights is Scout's.
Both models come from ``from_pretrained`` on the same saved bf16 checkpoint, the int4 one with
``quantization_config=Llama4Int4Config(group_size=128)``. Prints the footprint ratio int4/bf16 (measured with
``get_memory_footprint``, on paper for this config and for Scout), top-1 agreement of bf16 and int4 with the fp32
model, and greedy decode tokens/s int4 vs bf16.

    python benchmarks/bench_int4.py [--threads 2] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import torch
from timing import best_time

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.quantization_int4 import Llama4Int4Config, footprint_bytes, official_configs, parameter_counts
from modeling_llama4.tiny import SCALED_SCOUT_640

GROUP_SIZE = 128


def expert_share(counts: dict[str, int]) -> float:
    return counts["routed experts"] / sum(counts.values())


def load_models(path: str) -> tuple[Llama4ForCausalLM, Llama4ForCausalLM, Llama4ForCausalLM]:
    """The fp32 and bf16 models and the bf16 one with int4 experts, all loaded from the checkpoint at ``path``."""
    fp32, dense = (
        Llama4ForCausalLM.from_pretrained(path, dtype=dtype).eval() for dtype in (torch.float32, torch.bfloat16)
    )
    int4 = Llama4ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=Llama4Int4Config(group_size=GROUP_SIZE)
    ).eval()
    return fp32, dense, int4


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = Llama4TextConfig(**SCALED_SCOUT_640)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        Llama4ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        fp32, dense, int4 = load_models(path)

    counts = parameter_counts(config)
    scout = official_configs()["Scout"]
    scout_text = dict(parameter_counts(scout), vision=0)
    measured = int4.get_memory_footprint() / dense.get_memory_footprint()
    on_paper = footprint_bytes(counts, int4_group_size=GROUP_SIZE) / footprint_bytes(counts)
    scout_ratio = footprint_bytes(scout_text, int4_group_size=GROUP_SIZE) / footprint_bytes(scout_text)

    prompt = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    reference, *logits = (model(prompt).logits.float() for model in (fp32, dense, int4))
    agreement = [(reference.argmax(-1) == other.argmax(-1)).float().mean().item() for other in logits]
    delta = [(reference - other).abs().max().item() for other in logits]

    def decode(model: torch.nn.Module) -> Callable[[], object]:
        return lambda: model.generate(
            prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )

    times = [best_time(decode(model), args.repeats) for model in (dense, int4)]
    rates = [args.new_tokens / t for t in times]

    print(f"config: scaled Scout (hidden 640, 16 experts top-1, 4 layers), bf16, {args.threads} threads, CPU")
    print(
        f"routed-expert share of weights: scaled {expert_share(counts):.3f}, Scout text {expert_share(scout_text):.3f}"
    )
    print(
        f"footprint int4/bf16 (g={GROUP_SIZE}): measured {measured:.3f}, on paper {on_paper:.3f}, Scout text {scout_ratio:.3f}"
    )
    print(
        f"vs fp32 over a 64-token prompt (random weights: near-tied logits): top-1 agreement bf16 {agreement[0]:.1%},"
        f" int4 {agreement[1]:.1%}; max |dlogit| bf16 {delta[0]:.2f}, int4 {delta[1]:.2f}"
    )
    print(
        f"decode ({args.new_tokens} new tokens): bf16 {rates[0]:.1f} tok/s, int4 {rates[1]:.1f} tok/s"
        f" -> int4/bf16 speed {rates[1] / rates[0]:.2f}x"
    )


if __name__ == "__main__":
    main()
