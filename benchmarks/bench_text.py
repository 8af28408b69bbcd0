"""Text backbone speed on CPU: every figure a ratio of two models timed in the same run, alternating.

Three comparisons, each at fp32 and at bf16 (the dtype the checkpoints ship in):

* ours vs transformers' built-in Llama 4 on the same weights: a scaled Scout (hidden 512, 16 experts top-1,
  every layer MoE, 4 layers). Ratio theirs/ours time: > 1 means we are faster.
* the limit: our MoE model vs the same model with every layer dense at equal active width (``moe_layers=[]``,
  ``intermediate_size_mlp`` = routed + shared expert width), at 16 experts (Scout-like) and 128 experts
  (Maverick-like), 2 layers (the 128-expert model is 1.6 GB in fp32). Ratio MoE/dense time: how far the sparse
  path is from its floor (1.00 = as fast as a dense model doing the same active FLOPs). Then the same with the
  routed experts packed for oneDNN (``pack_experts``, an opt-in CPU inference layout), the dense twin unchanged.
* the bandwidth floor of a prefill, beside the limit: the MoE model with each MoE block doing only what no
  implementation can skip on this machine, the router, one read of each chosen expert's weights (a sum over them,
  at memory bandwidth) and the shared expert, without the routed FLOPs, vs the same dense twin. Above 1.00 it is the
  least MoE/dense time any implementation could reach here; below 1.00 bandwidth does not bind and the floor is
  the dense twin's compute, 1.00. Prefill phases only (a decode step reads only the chosen experts).

Phases: the MoE block alone on 512 tokens; prefill 1 x 512 as ``generate`` runs it (cache filled, logits of the
last position); prefill with logits for all 512 positions; decode steps alone (greedy one-token steps on the cache
of a 64-token prompt, the prefill untimed); ``generate`` of 32 tokens after a 64-token prompt (prefill included).

Times are the process's CPU time with one thread (the default), wall time with more: one thread on a small machine
shared with other jobs is preempted often enough that alternating wall times swing by 2x.

Headline: prefill 1 x 512 in bf16, ours vs transformers' built-in.

    python benchmarks/bench_text.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import transformers
from timing import best_times, timed

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.moe import Llama4TextMoe
from modeling_llama4.packed_experts import pack_experts, unpack_experts
from modeling_llama4.tiny import SCALED_SCOUT

Clock = Callable[[], float]


def build_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and transformers' built-in on the scaled Scout config, with the same random weights."""
    config = Llama4TextConfig(**SCALED_SCOUT)
    torch.manual_seed(0)
    ours = Llama4ForCausalLM(config).eval()
    theirs = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_dict())).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def build_limit_pair(num_experts: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our 2-layer MoE model with ``num_experts`` experts and its dense twin at equal active width."""
    moe_config = Llama4TextConfig(**dict(SCALED_SCOUT, num_hidden_layers=2, num_local_experts=num_experts))
    active_width = (moe_config.num_experts_per_tok + 1) * moe_config.intermediate_size  # routed + shared
    dense_config = Llama4TextConfig(**dict(moe_config.to_dict(), moe_layers=[], intermediate_size_mlp=active_width))
    torch.manual_seed(0)
    return Llama4ForCausalLM(moe_config).eval(), Llama4ForCausalLM(dense_config).eval()


class StreamingFloor(torch.nn.Module):
    """What a MoE block cannot skip at prefill: the router, one read of the weights of every expert that received
    rows (a sum, which runs at memory bandwidth) and the shared expert; no routed FLOPs. Its time is a lower bound."""

    def __init__(self, moe: Llama4TextMoe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.moe.hidden_size)  # [T, D]
        _, experts, _ = self.moe.router(x)  # [T, k]
        for expert in experts.unique().tolist():
            self.moe.experts.gate_up_proj[expert].sum()  # [D, 2I] read once
            self.moe.experts.down_proj[expert].sum()  # [I, D] read once
        return self.moe.shared_expert(hidden_states)


@contextmanager
def streaming_floor(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with every MoE block swapped for its :class:`StreamingFloor`, swapped back on exit."""
    moes = {name: module for name, module in model.named_modules() if isinstance(module, Llama4TextMoe)}
    for name, moe in moes.items():
        model.set_submodule(name, StreamingFloor(moe))
    try:
        yield model
    finally:
        for name, moe in moes.items():
            model.set_submodule(name, moe)


def decode_steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, clock: Clock) -> Callable[[], float]:
    """A run timing ``steps`` greedy one-token forward passes on the cache a (untimed) prefill of ``prompt`` left."""

    def run() -> float:
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits.argmax(-1)
        start = clock()
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits.argmax(-1)
        return clock() - start

    return run


def phase_runs(
    model: torch.nn.Module, prompt: torch.Tensor, hidden: torch.Tensor, new_tokens: int, clock: Clock
) -> dict[str, Callable[[], float]]:
    """The timed phases of one model, by row name; ``hidden`` feeds its first layer's feed-forward block."""
    decode_prompt = prompt[:, :64]
    return {
        f"feed-forward block ({prompt.shape[1]} tokens)": timed(
            lambda: model.model.layers[0].feed_forward(hidden), clock
        ),
        f"prefill 1 x {prompt.shape[1]}, last logits": timed(
            lambda: model(prompt, use_cache=True, logits_to_keep=1), clock
        ),
        f"prefill 1 x {prompt.shape[1]}, all logits": timed(lambda: model(prompt, use_cache=True), clock),
        f"decode {new_tokens} steps alone": decode_steps(model, decode_prompt, new_tokens, clock),
        f"generate 64 + {new_tokens} tokens": timed(
            lambda: model.generate(
                decode_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            ),
            clock,
        ),
    }


def compare(
    first: torch.nn.Module,
    second: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    clock: Clock,
    prefill_only: bool = False,
) -> dict[str, float]:
    """``time(first) / time(second)`` per phase (the first three, the prefill ones, if ``prefill_only``), the two
    models alternating."""
    hidden = torch.randn(1, prompt.shape[1], first.config.hidden_size, dtype=first.dtype)
    first_runs = phase_runs(first, prompt, hidden, new_tokens, clock)
    second_runs = phase_runs(second, prompt, hidden, new_tokens, clock)
    ratios = {}
    for phase in list(first_runs)[: 3 if prefill_only else None]:
        first_time, second_time = best_times([first_runs[phase], second_runs[phase]], repeats)
        ratios[phase] = first_time / second_time
    return ratios


def print_table(title: str, columns: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'':34}" + "".join(f"{name:>14}" for name in columns))
    for phase in next(iter(columns.values())):
        print(f"{phase:34}" + "".join(f"{ratios[phase]:>13.2f}x" for ratios in columns.values()))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: small expert matmuls stall on barriers under load)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (fastest kept)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One thread: the process's CPU time, not wall time. On a 2-core machine shared with other jobs the process is
    # preempted often enough that the wall time of alternating runs swings by 2x; CPU time counts only the cycles
    # it ran (its memory stalls included). Several threads: wall time (CPU time would sum theirs).
    clock = time.process_time if args.threads == 1 else time.perf_counter
    transformers.logging.set_verbosity_error()  # the scaled RoPE settings trip config warnings
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SCALED_SCOUT["vocab_size"], (1, args.prefill_tokens), generator=generator)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    clock_name = "process CPU time" if clock is time.process_time else "wall time"
    print(
        f"CPU, {args.threads} threads ({clock_name}), torch {torch.__version__}, transformers {transformers.__version__}"
    )

    ours, theirs = build_pair()
    fp32_logits = ours(prompt).logits
    versus_builtin = {}
    for name, dtype in dtypes.items():
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        logits = ours(prompt).logits.float()
        delta = (logits - theirs(prompt).logits.float()).abs().max().item()
        rounding = (logits - fp32_logits).abs().max().item()  # the scale of the dtype's own error
        print(
            f"max |logit ours - transformers| in {name}: {delta:.2e} (ours in {name} - ours in fp32: {rounding:.2e})"
        )
        # theirs/ours time: > 1 means ours is faster
        versus_builtin[name] = {
            phase: 1 / ratio
            for phase, ratio in compare(ours, theirs, prompt, args.new_tokens, args.repeats, clock).items()
        }
    del ours, theirs
    gc.collect()
    print_table(
        "ours vs transformers' built-in, scaled Scout (hidden 512, 16 experts top-1, 4 layers): theirs/ours time",
        versus_builtin,
    )

    limit, packed_limit, floor = {}, {}, {}
    for num_experts in (16, 128):
        moe, dense = build_limit_pair(num_experts)
        for name, dtype in dtypes.items():
            moe, dense = moe.to(dtype), dense.to(dtype)
            limit[f"{name} {num_experts} exp"] = compare(moe, dense, prompt, args.new_tokens, args.repeats, clock)
            with streaming_floor(moe) as floor_model:
                floor[f"{name} {num_experts} exp"] = compare(
                    floor_model, dense, prompt, args.new_tokens, args.repeats, clock, prefill_only=True
                )
            moe = pack_experts(moe)  # in place: the dense experts are dropped
            packed_limit[f"{name} {num_experts} exp"] = compare(
                moe, dense, prompt, args.new_tokens, args.repeats, clock
            )
            moe = unpack_experts(moe)
        del moe, dense
        gc.collect()
    print_table("limit: MoE / dense at equal active width (2 layers; 1.00 = the floor): MoE/dense time", limit)
    print_table("limit, experts packed for oneDNN (pack_experts), same dense twin: MoE/dense time", packed_limit)
    print_table(
        "floor: routed weights read once + shared expert, same dense twin (> 1.00: the least MoE/dense time here)",
        floor,
    )


if __name__ == "__main__":
    main()
