"""Quantized experts vs bf16 on a memory-bound MoE config: decode speed and footprint of int4, int4 + shared expert
(Meta's ``int4_mixed``) and FP8 (Meta's official layout), all measured in the same run, CPU.

Config: hidden 2048, 16 experts (top-1) of width 2048, 2 MoE layers, small vocabulary, so that decode time is the
expert and attention matmuls (per token: attention 27%, shared expert 36%, routed expert 36% of the weights read,
close to Scout's 20/40/40). Every model comes from ``from_pretrained`` on the same saved bf16 checkpoint; their
decode runs are interleaved:

- ``bf16``: as saved;
- ``int4``: ``quantization_config=Llama4Int4Config(group_size=128)`` (routed experts on torch's packed int4 kernel);
- ``int4+shared``: ``Llama4Int4Config(group_size=128, quantize_shared_expert=True)``;
- ``fp8``: ``FbgemmFp8Config`` with everything but the routed experts in ``modules_to_not_convert`` (the layout of
  Meta's FP8 checkpoints; routed experts dequantized one at a time).

Prints, for each, greedy decode tokens/s and its ratio to bf16 (the **headline** is int4's), the footprint ratio to
bf16 (``get_memory_footprint``; on paper for Scout's text model too), and top-1 agreement / max |Δlogit| with bf16
over a 32-token prompt (random weights: near-tied logits). Then the **ceiling** of quantizing the routed experts
alone: the bf16 model with its routed experts replaced by ones that cost nothing (they output zeros; router,
dispatch and combine still run), timed in the same interleaved loop. ``bf16 / ceiling`` time is the most any
routed-expert quantization can speed this config up; int4's share of it is ``(bf16 - int4) / (bf16 - ceiling)``, the
part of the routed experts' decode time that int4 removes.

First, the GEMV micro-benchmarks behind the ``int4`` and ``fp8`` rows. int4: one expert's ``gate_up_proj`` (``x [n,
2048] @ ŵ [2048, 4096]``, group size 128), 16 experts in turn, time / bf16 GEMV of the same weight, next to the bytes
ratio (packed weights + scales over bf16 weights: the time ratio of two memory-bound GEMVs):

- ``torch int4 kernel``: ``int4_matmul``, torch's ``_weight_int4pack_mm_for_cpu`` (what int4 experts run on CPU);
- ``(scale pairs by torch.stack)``: the same with the kernel's ``(scale, zero)`` pairs interleaved by
  ``torch.stack`` on every call (how ``int4_matmul`` built them before ``kernel_scale_and_zero``).

FP8: one expert's ``gate_up_proj`` (``x [n, 2048] @ ŵ
[2048, 4096]``, e4m3 with per-output-channel float32 scales), 16 experts in turn so that weights come from memory as
in decode, each way of computing it timed against the bf16 matmul of the same weight (``fp8 GEMV / bf16 GEMV``, lower
is faster) with its max error relative to the fp32 result of the dequantized weight:

- ``kernel``: ``modeling_llama4.fp8_cpu`` (what ``fp8_matmul`` runs for up to ``MAX_ROWS`` = 16 rows on CPU);
- ``dequantize``: ``x @ q.to(bf16)``, scaled (torch's e4m3 conversion: what it ran before);
- ``dequantize (integer ops)``: the kernel's exact conversion (float16 bits) as eager integer ops, then the matmul;
- ``dequantize (blocks)``: dequantize 256 rows at a time (L2-sized), multiply, accumulate;
- ``dequantize (kernel's conversion)``: ``fp8_cpu``'s exact conversion, then the matmul (what ``fp8_matmul`` runs
  for more rows on CPU);
- ``torch.compile``: the conversion fused into a reduction by inductor (dynamic rows; compile time printed);
- ``torch._scaled_mm``: torch's FP8 matmul on CPU, ``x`` quantized to e4m3 per row (so not exact).

    python benchmarks/bench_int4.py [--threads 1] [--repeats 3] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from memory_table import footprint_bytes, official_configs
from timing import best_time, best_times, timed
from transformers import FbgemmFp8Config

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8
from modeling_llama4.fp8_cpu import MAX_ROWS, fp8_gemv
from modeling_llama4.int4 import dequantize_int4, int4_matmul, quantize_int4, to_kernel_layout
from modeling_llama4.moe import Llama4TextMoe
from modeling_llama4.quantization_int4 import Llama4Int4Config

GROUP_SIZE = 128
MEMORY_BOUND = dict(
    vocab_size=2048,
    hidden_size=2048,
    intermediate_size=2048,
    intermediate_size_mlp=2048,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=256,
    max_position_embeddings=4096,
)
NOT_EXPERTS = ["model.layers.*.self_attn", "model.layers.*.feed_forward.shared_expert", "lm_head"]
SCHEMES = {
    "bf16": None,
    "int4": Llama4Int4Config(group_size=GROUP_SIZE),
    "int4+shared": Llama4Int4Config(group_size=GROUP_SIZE, quantize_shared_expert=True),
    "fp8": FbgemmFp8Config(modules_to_not_convert=NOT_EXPERTS),
}


GEMV_EXPERTS, GEMV_SHAPE, GEMV_BLOCK = 16, (2048, 4096), 256
GemvMethod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, q, scale) -> x @ ŵ


def int4_stacked_pairs(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    scale_and_zero = torch.stack((scales.to(x.dtype), torch.zeros_like(scales, dtype=x.dtype)), dim=-1)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, GROUP_SIZE, scale_and_zero)


INT4_GEMV_METHODS: dict[str, GemvMethod] = {  # (x, packed, scales) -> x @ ŵ
    "torch int4 kernel": lambda x, packed, scales: int4_matmul(x, packed, scales, GROUP_SIZE),
    "(scale pairs by torch.stack)": int4_stacked_pairs,
}


def dequantize_with_integer_ops(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q · 2⁻⁸`` in ``dtype``: e4m3 bits → float16 bits (magnitude << 7 | sign << 8), exact, in eager ops."""
    bits = q.view(torch.uint8).to(torch.int16)
    return (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).view(torch.float16).to(dtype)


def blocked_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = sum(x[:, k : k + GEMV_BLOCK] @ q[k : k + GEMV_BLOCK].to(x.dtype) for k in range(0, q.shape[0], GEMV_BLOCK))
    return (out * scale).to(x.dtype)


def fused_reduction(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x.float()[:, :, None] * q.float()).sum(dim=1) * scale).to(x.dtype)  # [n, K, 1] * [K, N] -> [n, N]


def scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x_scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [n, 1]
    x_q = (x.float() / x_scale).to(FP8_DTYPE)
    return torch._scaled_mm(x_q, q, scale_a=x_scale, scale_b=scale, out_dtype=x.dtype)


def gemv_methods() -> dict[str, GemvMethod]:
    return {
        "kernel": fp8_gemv,
        "dequantize": lambda x, q, scale: ((x @ q.to(x.dtype)) * scale).to(x.dtype),
        "dequantize (integer ops)": lambda x, q, scale: (
            (x @ dequantize_with_integer_ops(q, x.dtype)) * (scale * 256.0)
        ).to(x.dtype),
        "dequantize (blocks)": blocked_matmul,
        "dequantize (kernel's conversion)": lambda x, q, scale: (
            (x @ dequantize_fp8(q, torch.ones_like(scale), x.dtype)) * scale
        ).to(x.dtype),
        "torch.compile": torch.compile(fused_reduction, dynamic=True),
        "torch._scaled_mm": scaled_mm,
    }


def over_experts(method: GemvMethod, x: torch.Tensor, operands: list[tuple]) -> Callable[[], None]:
    return lambda: [method(x, *weight) for weight in operands]


def int4_gemv_ratios(rows: tuple[int, ...], repeats: int) -> None:
    """Print each int4 method's ``int4 GEMV / bf16 GEMV`` time per row count, and the bytes ratio."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*GEMV_SHAPE, generator=generator).to(torch.bfloat16) for _ in range(GEMV_EXPERTS)]
    quantized = [quantize_int4(weight, GROUP_SIZE) for weight in weights]
    dense = [dequantize_int4(qweight, scales, torch.bfloat16) for qweight, scales in quantized]
    packed = [(to_kernel_layout(qweight), scales) for qweight, scales in quantized]
    bytes_ratio = sum(t.nbytes for t in packed[0]) / dense[0].nbytes

    print(
        f"int4 GEMV x [n, {GEMV_SHAPE[0]}] @ int4 {list(GEMV_SHAPE)} (g={GROUP_SIZE}), bf16 x, {GEMV_EXPERTS} experts:"
    )
    for name, method in INT4_GEMV_METHODS.items():
        cells = []
        for n in rows:
            x = torch.randn(n, GEMV_SHAPE[0], generator=generator).to(torch.bfloat16)
            bf16_time, int4_time = best_times(
                [
                    timed(over_experts(lambda x, w: x @ w, x, [(w,) for w in dense])),
                    timed(over_experts(method, x, packed)),
                ],
                repeats,
            )
            cells.append(f"n={n}: {int4_time / bf16_time:5.2f}x")
        print(f"{name:>32}: " + " | ".join(cells) + f" | bytes {bytes_ratio:.3f}x")


def gemv_ratios(rows: tuple[int, ...], repeats: int) -> None:
    """Print each method's ``fp8 GEMV / bf16 GEMV`` time per row count, interleaved with the bf16 matmul."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*GEMV_SHAPE, generator=generator).to(torch.bfloat16) for _ in range(GEMV_EXPERTS)]
    quantized = [quantize_fp8(weight) for weight in weights]
    dense = [dequantize_fp8(q, scale, torch.bfloat16) for q, scale in quantized]

    print(f"FP8 GEMV x [n, {GEMV_SHAPE[0]}] @ fp8 {list(GEMV_SHAPE)}, bf16 x, {GEMV_EXPERTS} experts in turn:")
    for name, method in gemv_methods().items():
        start = time.perf_counter()
        method(torch.randn(1, GEMV_SHAPE[0]).bfloat16(), *quantized[0])  # builds (kernel, torch.compile) once
        built = time.perf_counter() - start
        cells = []
        for n in rows:
            x = torch.randn(n, GEMV_SHAPE[0], generator=generator).to(torch.bfloat16)
            expected = x.float() @ dequantize_fp8(*quantized[0], torch.float32)
            error = (method(x, *quantized[0]).float() - expected).abs().max() / expected.abs().max()
            bf16_time, fp8_time = best_times(
                [
                    timed(over_experts(lambda x, w: x @ w, x, [(w,) for w in dense])),
                    timed(over_experts(method, x, quantized)),
                ],
                repeats,
            )
            cells.append(f"n={n}: {fp8_time / bf16_time:5.2f}x (error {error:.0e})")
        print(f"{name:>32}: " + " | ".join(cells) + (f" | first call {built:.1f} s" if built > 1 else ""))


class NoRoutedExperts(torch.nn.Module):
    """Routed experts that cost nothing: every routed row's output is zero (the ceiling row; not a model)."""

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def without_routed_experts(model: Llama4ForCausalLM) -> Llama4ForCausalLM:
    """``model`` with each MoE layer's routed experts swapped for :class:`NoRoutedExperts`."""
    for layer in model.model.layers:
        if isinstance(layer.feed_forward, Llama4TextMoe):
            layer.feed_forward.experts = NoRoutedExperts()
    return model


def save_bf16_checkpoint(config: Llama4TextConfig, path: str) -> None:
    """Seed-0 weights, built directly in bf16 (no float32 copy), saved to ``path``."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        Llama4ForCausalLM(config).save_pretrained(path)
    finally:
        torch.set_default_dtype(torch.float32)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a loaded machine)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per model (best kept)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per generate call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    int4_gemv_ratios((1, 8, MAX_ROWS), args.repeats)
    gemv_ratios((1, 8, MAX_ROWS), args.repeats)
    config = Llama4TextConfig(**MEMORY_BOUND)
    prompt = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def decode(model: torch.nn.Module) -> Callable[[], object]:
        return lambda: model.generate(
            prompt[:, :4], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )

    with tempfile.TemporaryDirectory() as path:
        save_bf16_checkpoint(config, path)
        models = {
            name: Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization)
            for name, quantization in SCHEMES.items()
        }
        models["ceiling"] = without_routed_experts(Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    logits = {name: models[name].eval()(prompt).logits.float() for name in SCHEMES}
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit every model alike
        for name, model in models.items():
            times[name].append(best_time(decode(model), 1))
    rates = {name: args.new_tokens / min(seconds) for name, seconds in times.items()}
    footprints = {name: models[name].get_memory_footprint() for name in SCHEMES}

    print(
        f"config: hidden 2048, 16 experts top-1 of width 2048, 2 MoE layers; bf16 activations, {args.threads} threads,"
        f" CPU; decode {args.new_tokens} greedy tokens after a 4-token prompt"
    )
    scout = official_configs()["Scout"]
    scout_bf16 = footprint_bytes(scout, vision=False)
    for name in SCHEMES:
        agreement = (logits[name].argmax(-1) == logits["bf16"].argmax(-1)).float().mean().item()
        delta = (logits[name] - logits["bf16"]).abs().max().item()
        scout_ratio = footprint_bytes(scout, name, group_size=GROUP_SIZE, vision=False) / scout_bf16
        print(
            f"{name:>12}: decode {rates[name]:6.2f} tok/s = {rates[name] / rates['bf16']:.2f}x bf16 | footprint "
            f"{footprints[name] / footprints['bf16']:.3f}x bf16 (Scout text on paper {scout_ratio:.3f}x) | "
            f"vs bf16: top-1 {agreement:.1%}, max |dlogit| {delta:.3f}"
        )
    seconds = {name: 1 / rate for name, rate in rates.items()}  # per token
    share = (seconds["bf16"] - seconds["int4"]) / (seconds["bf16"] - seconds["ceiling"])
    print(
        f"{'ceiling':>12}: decode {rates['ceiling']:6.2f} tok/s = {rates['ceiling'] / rates['bf16']:.2f}x bf16 with the"
        f" routed experts costing nothing: the most a routed-expert quantization can give here; int4 removes"
        f" {share:.0%} of the routed experts' decode time"
    )


if __name__ == "__main__":
    main()
