"""Decode speed on CPU: eager with the dynamic cache, eager with a static cache, and the compiled static decode step
(``torch.compile(model.forward, fullgraph=True)``), ours and transformers' built-in Llama 4 on the same weights, all
timed in one run, alternating; and the gap to the memory-bandwidth roofline.

Model: the scaled Scout of ``tiny.SCALED_SCOUT`` (hidden 512, 16 experts top-1, every layer MoE, 4 layers, chunk
256). Each run prefills a 64-token prompt (untimed) and times ``--new-tokens`` greedy one-token steps.

Roofline: a decode step must read every weight it uses once (attention, router, shared expert, the chosen experts,
the LM head, one embedding row) and the cached keys and values; at the machine's copy bandwidth (measured here, on
a buffer far larger than the caches, with the same threads) that takes ``bytes / bandwidth`` seconds. The figure
printed is tokens/s ÷ roofline tokens/s (1.00 = bandwidth-bound).

Times are the process's CPU time with one thread (the default), wall time with more (see bench_text.py).
Compiling (inductor, CPU code generation) takes minutes on a small machine; it is done once, before the timing.

    python benchmarks/bench_decode.py [--threads 1] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import transformers
from bench_text import build_pair
from timing import best_times
from transformers.cache_utils import StaticCache

from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.tiny import SCALED_SCOUT

Clock = Callable[[], float]
PROMPT_TOKENS = 64


class Decoder:
    """Greedy decode steps of one model with one cache kind (``"dynamic"`` or ``"static"``), eager or compiled."""

    def __init__(self, model: torch.nn.Module, cache_kind: str, compiled: bool, new_tokens: int):
        self.model, self.new_tokens = model, new_tokens
        self.static_cache = None
        if cache_kind == "static":  # one cache, reset per run: a compiled step keeps its static buffers
            self.static_cache = StaticCache(config=model.config, max_cache_len=PROMPT_TOKENS + new_tokens)
        self.step = torch.compile(model.forward, fullgraph=True) if compiled else model.forward

    def tokens(self, prompt: torch.Tensor, clock: Clock = time.perf_counter) -> tuple[torch.Tensor, float]:
        """The generated tokens ``[1, new_tokens]`` and the seconds the decode steps took (prefill untimed)."""
        cache = self.static_cache
        if cache is not None:
            cache.reset()
        positions = torch.arange(PROMPT_TOKENS + self.new_tokens)[None]
        out = self.model(prompt, cache=cache, use_cache=True, position_ids=positions[:, :PROMPT_TOKENS])
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        generated = [token]
        start = clock()
        for position in range(PROMPT_TOKENS, PROMPT_TOKENS + self.new_tokens - 1):
            out = self.step(
                input_ids=token, cache=cache, use_cache=True, position_ids=positions[:, position : position + 1]
            )
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
        return torch.cat(generated, dim=1), clock() - start


def copy_bandwidth(clock: Clock, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large ``copy_`` (read + write counted) on the decode steps' ``clock``, fastest of
    ``repeats``."""
    source = torch.ones(megabytes * 2**20 // 4)
    destination = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        start = clock()
        destination.copy_(source)
        best = min(best, clock() - start)
    return 2 * source.numel() * source.element_size() / best


def bytes_per_token(model: Llama4ForCausalLM, context: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table and the unchosen experts, one
    embedding row, the chosen experts, and the keys and values cached at ``context`` tokens."""
    config = model.config
    element = next(model.parameters()).element_size()
    weights = 0
    for name, parameter in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            weights += parameter.numel() * config.num_experts_per_tok // config.num_local_experts
        elif "embed_tokens" in name:
            weights += config.hidden_size
        else:
            weights += parameter.numel()
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim
    cached = sum(
        min(context, config.attention_chunk_size) if layer_type == "chunked_attention" else context
        for layer_type in config.layer_types
    )
    return (weights + kv_per_token * cached) * element


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (fastest kept)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    transformers.logging.set_verbosity_error()  # the scaled RoPE settings trip config warnings
    print(
        f"CPU, {args.threads} threads ({'process CPU time' if clock is time.process_time else 'wall time'}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    prompt = torch.randint(
        0, SCALED_SCOUT["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    ours, theirs = build_pair()
    decoders = {
        (owner, mode): Decoder(
            model, "dynamic" if mode == "eager dynamic" else "static", mode == "compiled static", args.new_tokens
        )
        for owner, model in (("ours", ours), ("built-in", theirs))
        for mode in ("eager dynamic", "eager static", "compiled static")
    }
    reference = decoders["ours", "eager dynamic"].tokens(prompt)[0]
    for key, decoder in decoders.items():  # compiles the compiled steps, checks every variant's tokens
        start = time.perf_counter()
        tokens = decoder.tokens(prompt)[0]
        print(
            f"{key[0]:>8} {key[1]:<16} first run {time.perf_counter() - start:6.1f} s wall, "
            f"tokens {'equal' if torch.equal(tokens, reference) else 'DIFFER'}"
        )

    runs = [lambda decoder=decoder: decoder.tokens(prompt, clock)[1] for decoder in decoders.values()]
    seconds = dict(zip(decoders, best_times(runs, args.repeats)))
    steps = args.new_tokens - 1
    tokens_per_second = {key: steps / value for key, value in seconds.items()}
    bandwidth = copy_bandwidth(clock)
    needed = bytes_per_token(ours, PROMPT_TOKENS + args.new_tokens // 2)
    roofline = bandwidth / needed
    print(
        f"\ncopy bandwidth {bandwidth / 1e9:.2f} GB/s; a decode step reads {needed / 2**20:.1f} MiB: roofline "
        f"{roofline:.0f} tokens/s"
    )
    baseline = tokens_per_second["ours", "eager dynamic"]
    print(f"\n{'':26}{'tokens/s':>10}{'vs ours eager dynamic':>24}{'ours / built-in':>18}{'of roofline':>13}")
    for (owner, mode), rate in tokens_per_second.items():
        versus_builtin = f"{rate / tokens_per_second['built-in', mode]:.2f}x" if owner == "ours" else ""
        print(
            f"{owner + ' ' + mode:26}{rate:>10.1f}{rate / baseline:>23.2f}x{versus_builtin:>18}"
            f"{rate / roofline:>13.2f}"
        )


if __name__ == "__main__":
    main()
