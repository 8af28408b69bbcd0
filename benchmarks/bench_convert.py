"""Conversion speed and memory on a synthetic native checkpoint: several model-parallel shards, released (fused)
naming, bfloat16, random weights.

The checkpoint (about 5 GB by default) is written to a temporary folder, converted by ``llama4-convert`` in a
child process, and deleted. Reported: wall time, throughput, and the child's peak resident memory (its high-water
mark, measured by ``/usr/bin/time``) as a ratio of the largest input shard and of the whole checkpoint. A second child that only imports the converter and builds the tokenizer gives the fixed part of that
peak, which does not grow with the model. The input was just written, so it is read from the page cache. Last, the
integrity check the converter runs on every byte it reads (zip CRC-32 of each shard member), timed alone here, as a
share of the conversion's wall time.

    python benchmarks/bench_convert.py [--layers 24] [--shards 4] [--dim 1024] [--experts 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conversion.native import verify_members  # noqa: E402
from conversion.params import NativeArgs  # noqa: E402
from modeling_llama4.tokenization_llama4 import default_tokenizer_model_path  # noqa: E402


def synthetic_params(dim: int, layers: int, experts: int, vocab: int) -> dict:
    """A Scout-shaped params.json (MoE in every layer, 8 query heads per 4 kv heads) at a smaller width."""
    return dict(
        dim=dim,
        n_layers=layers,
        n_heads=dim // 128,
        n_kv_heads=dim // 256,
        vocab_size=vocab,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        ffn_exp=4.0,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
        nope_layer_interval=4,
        use_qk_norm=True,
        attention_chunk_size=8192,
        attn_temperature_tuning=True,
        moe_args=dict(num_experts=experts, top_k=1, interleave_moe_layer_step=1),
    )


def fused_shard_shapes(args: NativeArgs, world_size: int) -> dict[str, tuple[int, ...]]:
    """One rank's tensors under the released names, with this rank's sizes."""
    D, E, F, hd = args.dim, args.moe_args.num_experts, args.moe_hidden_dim // world_size, args.head_dim
    q, kv = args.n_heads // world_size * hd, args.kv_heads // world_size * hd
    shapes = {
        "tok_embeddings.weight": (args.vocab_size // world_size, D),
        "norm.weight": (D,),
        "rope.freqs": (hd // 2,),
    }
    for layer in range(args.n_layers):
        p, ffn = f"layers.{layer}.", f"layers.{layer}.feed_forward."
        shapes |= {
            p + "attention.wqkv.weight": (q + 2 * kv, D),
            p + "attention.wo.weight": (D, q),
            p + "attention.wqkv.layer_norm_weight": (D,),
            ffn + "norm.weight": (D,),
            ffn + "router_DE": (D, E),
            ffn + "experts.moe_w_in_eD_F": (E * D, F),
            ffn + "experts.moe_w_swiglu_eD_F": (E * D, F),
            ffn + "experts.moe_w_out_eF_D": (E * F, D),
            ffn + "w_in_shared_FD.weight": (F, D),
            ffn + "w_swiglu_FD.weight": (F, D),
            ffn + "w_out_shared_DF.weight": (D, F),
        }
    shapes["output.weight"] = (args.vocab_size // world_size, D)
    return shapes


def random_tensor(shape: tuple[int, ...], pool: torch.Tensor) -> torch.Tensor:
    """A bfloat16 tensor filled from a pool of random values (quick: memory copies, not random draws)."""
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), pool.numel()):
        length = min(pool.numel(), flat.numel() - start)
        flat[start : start + length].copy_(pool[:length])
    return tensor


def write_checkpoint(directory: Path, params: dict, world_size: int) -> list[Path]:
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(default_tokenizer_model_path(), directory / "tokenizer.model")
    args = NativeArgs.from_dict(params)
    pool = (0.02 * torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    paths = []
    for rank in range(world_size):
        shard = {key: random_tensor(shape, pool) for key, shape in fused_shard_shapes(args, world_size).items()}
        paths.append(directory / f"consolidated.{rank:02d}.pth")
        torch.save(shard, paths[-1])
        del shard
    return paths


def run_child(command: list[str], scratch: Path) -> tuple[float, int]:
    """Run ``command`` under ``/usr/bin/time``; return its wall time in seconds and its peak RSS in bytes.

    (A child's own high-water mark would include this process's memory, shared until ``exec``; ``time`` forks
    the command from a small process.)
    """
    report = scratch / "time.txt"
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(report), *command], cwd=REPO, check=True)
    seconds, kilobytes = report.read_text().split()[-2:]
    return float(seconds), int(kilobytes) * 1024


FIXED_COST = """
import tempfile
from conversion.convert import convert_native_to_hf
from modeling_llama4.tokenization_llama4 import build_tokenizer, default_tokenizer_model_path
build_tokenizer(default_tokenizer_model_path(), instruct=False).save_pretrained(tempfile.mkdtemp())
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=202048)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--tmp-dir", default=None, help="where to write the temporary checkpoints")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=options.tmp_dir, prefix="bench_convert-") as tmp:
        native, hf = Path(tmp) / "native", Path(tmp) / "hf"
        params = synthetic_params(options.dim, options.layers, options.experts, options.vocab)
        start = time.perf_counter()
        shards = write_checkpoint(native, params, options.shards)
        sizes = [path.stat().st_size for path in shards]
        total, largest = sum(sizes), max(sizes)
        print(
            f"synthetic checkpoint: {len(shards)} shards, {total / 1e9:.2f} GB (largest shard {largest / 1e9:.2f} GB)"
        )
        print(f"  written in {time.perf_counter() - start:.1f} s")

        command = [sys.executable, "-m", "conversion.cli", "--input", str(native), "--output", str(hf)]
        wall, peak = run_child([*command, "--log-level", "WARNING"], Path(tmp))
        written = sum(path.stat().st_size for path in hf.glob("*.safetensors"))
        fixed_wall, fixed_peak = run_child([sys.executable, "-c", FIXED_COST], Path(tmp))

        print(f"conversion: {wall:.1f} s wall, {total / 1e6 / wall:.0f} MB/s ({written / 1e9:.2f} GB of safetensors)")
        print(
            f"  of which imports + tokenizer: {fixed_wall:.1f} s; weights alone: {total / 1e6 / (wall - fixed_wall):.0f} MB/s"
        )
        print(
            f"peak RSS: {peak / 1e9:.2f} GB = {peak / largest:.2f} x largest shard = {peak / total:.2f} x checkpoint"
        )
        print(
            f"  imports + tokenizer alone: {fixed_peak / 1e9:.2f} GB; the weights add {(peak - fixed_peak) / 1e9:.2f} GB"
            f" = {(peak - fixed_peak) / largest:.2f} x largest shard"
        )
        start = time.perf_counter()
        for path in shards:
            with zipfile.ZipFile(path) as archive:
                verify_members(path, archive.namelist())
        crc = time.perf_counter() - start
        print(
            f"integrity (CRC-32 of every shard byte, page cache): {crc:.1f} s = {crc / wall:.2f} x the conversion wall"
        )


if __name__ == "__main__":
    main()
