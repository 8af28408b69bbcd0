"""What a native Llama 4 checkpoint holds, per tensor, in Meta's module naming.

- ``native_schema``: every tensor's full shape and the dimension fairscale splits it on across model-parallel
  ranks (column-parallel layers and the vocab-parallel embedding on dim 0, row-parallel layers on dim 1, experts
  on their hidden dim), from params.json alone.
- ``unfuse``: one shard of a released checkpoint (fused names: ``wqkv``, ``fc1_weight``, 2D expert layouts, ...)
  as module-named views of the same storage, as Meta's load hooks do per rank. No data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import ConversionError
from .params import IMAGE_CHANNELS, NativeArgs

COLUMN = 0  # ColumnParallelLinear / VocabParallelEmbedding weight [out, in]: each rank holds a block of rows
ROW = 1  # RowParallelLinear weight [out, in]: each rank holds a block of columns
VISION = "vision_embeddings.vision_encoder."
ADAPTER = "vision_embeddings.vision_adapter."


@dataclass(frozen=True)
class TensorSpec:
    """A native tensor's full shape, and the dim its model-parallel shards split (None: replicated)."""

    shape: tuple[int, ...]
    split_dim: int | None

    def shard_shape(self, world_size: int) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split_dim] //= world_size
        return tuple(shape)


def native_schema(args: NativeArgs, vocab_size: int) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint, in model order: text embeddings and head, text layers, vision."""
    D = args.dim
    schema = {
        "tok_embeddings.weight": TensorSpec((vocab_size, D), COLUMN),
        "norm.weight": TensorSpec((D,), None),
        "output.weight": TensorSpec((vocab_size, D), COLUMN),
    }
    for layer in range(args.n_layers):
        schema.update(_text_layer(args, layer))
    if args.vision_args is not None:
        schema.update(_vision(args))
    return schema


def _text_layer(args: NativeArgs, layer: int) -> dict[str, TensorSpec]:
    D, q, kv = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    p = f"layers.{layer}."
    specs = {
        p + "attention_norm.weight": TensorSpec((D,), None),
        p + "attention.wq.weight": TensorSpec((q, D), COLUMN),
        p + "attention.wk.weight": TensorSpec((kv, D), COLUMN),
        p + "attention.wv.weight": TensorSpec((kv, D), COLUMN),
        p + "attention.wo.weight": TensorSpec((D, q), ROW),
        p + "ffn_norm.weight": TensorSpec((D,), None),
    }
    if args.is_moe_layer(layer):
        E, F = args.moe_args.num_experts, args.moe_hidden_dim
        specs.update(
            {
                p + "feed_forward.router_DE": TensorSpec((D, E), None),
                p + "feed_forward.experts.w1": TensorSpec((E, D, F), 2),
                p + "feed_forward.experts.w2": TensorSpec((E, F, D), 1),
                p + "feed_forward.experts.w3": TensorSpec((E, D, F), 2),
                p + "feed_forward.shared_expert.w1.weight": TensorSpec((F, D), COLUMN),
                p + "feed_forward.shared_expert.w2.weight": TensorSpec((D, F), ROW),
                p + "feed_forward.shared_expert.w3.weight": TensorSpec((F, D), COLUMN),
            }
        )
    else:
        F = args.dense_hidden_dim
        specs.update(
            {
                p + "feed_forward.w1.weight": TensorSpec((F, D), COLUMN),
                p + "feed_forward.w2.weight": TensorSpec((D, F), ROW),
                p + "feed_forward.w3.weight": TensorSpec((F, D), COLUMN),
            }
        )
    return specs


def _vision(args: NativeArgs) -> dict[str, TensorSpec]:
    v = args.vision_args
    d, hidden, out = v.dim, v.hidden_dim, v.output_dim
    vector, replicated_vector = TensorSpec((d,), COLUMN), TensorSpec((d,), None)
    specs = {
        VISION + "conv1._linear.weight": TensorSpec((d, IMAGE_CHANNELS * v.patch_size**2), COLUMN),
        VISION + "class_embedding": replicated_vector,
        VISION + "positional_embedding_vlm": TensorSpec((v.num_positions, d), None),
        **{VISION + f"{norm}.{p}": replicated_vector for norm in ("ln_pre", "ln_post") for p in ("weight", "bias")},
        ADAPTER + "mlp.c_fc.weight": TensorSpec((out, v.adapter_input_dim), COLUMN),
        ADAPTER + "mlp.c_proj.weight": TensorSpec((out, out), ROW),
        "vision_projection.weight": TensorSpec((args.dim, out), COLUMN),
    }
    for block in range(v.n_layers):
        p = f"{VISION}transformer.resblocks.{block}."
        for name in ("wq", "wk", "wv"):
            specs[p + f"attn.{name}.weight"] = TensorSpec((d, d), COLUMN)
            specs[p + f"attn.{name}.bias"] = vector
        specs[p + "attn.wo.weight"] = TensorSpec((d, d), ROW)
        specs[p + "attn.wo.bias"] = replicated_vector  # a row-parallel bias is added after the all-reduce
        specs[p + "mlp.c_fc.weight"] = TensorSpec((hidden, d), COLUMN)
        specs[p + "mlp.c_fc.bias"] = TensorSpec((hidden,), COLUMN)
        specs[p + "mlp.c_proj.weight"] = TensorSpec((d, hidden), ROW)
        specs[p + "mlp.c_proj.bias"] = replicated_vector
        for norm in ("ln_1", "ln_2"):
            specs[p + f"{norm}.weight"] = replicated_vector
            specs[p + f"{norm}.bias"] = replicated_vector
    return specs


_LAYER = re.compile(r"layers\.(\d+)\.")
_BLOCK = re.compile(re.escape(VISION) + r"transformer\.resblocks\.(\d+)\.")


def read_group(native_key: str) -> str:
    """The unit the converter reads at once: one text layer, one vision block, or one tensor outside them (the
    embedding and the output head are each as big as a few layers)."""
    for pattern, name in ((_LAYER, "text layer"), (_BLOCK, "vision block")):
        match = pattern.match(native_key)
        if match:
            return f"{name} {match.group(1)}"
    return native_key


# ----------------------------------------------------------------------------------------------------------------
# Released (fused) naming -> module naming, per shard, as Meta's load hooks do


_DROPPED = re.compile(
    r".*\._extra_state|rope\.freqs|.*feed_forward\.(global_gate_stats_3E|expert_activation_DE)|.*running_gate_stats.*"
)
_RENAMES = [
    (re.compile(r"(layers\.\d+\.)attention\.wqkv\.layer_norm_weight"), r"\1attention_norm.weight"),
    (re.compile(r"(layers\.\d+\.)feed_forward\.(?:norm\.weight|mlp\.layer_norm_weight)"), r"\1ffn_norm.weight"),
    (re.compile(r"(layers\.\d+\.feed_forward\.)mlp\.fc2_weight"), r"\1w2.weight"),
    (re.compile(r"(layers\.\d+\.feed_forward\.)w_in_shared_FD\.weight"), r"\1shared_expert.w1.weight"),
    (re.compile(r"(layers\.\d+\.feed_forward\.)w_swiglu_FD\.weight"), r"\1shared_expert.w3.weight"),
    (re.compile(r"(layers\.\d+\.feed_forward\.)w_out_shared_DF\.weight"), r"\1shared_expert.w2.weight"),
]
_WQKV = re.compile(r"(.*\.(?:attention|attn)\.)wqkv\.weight")
_FC1 = re.compile(r"(layers\.\d+\.feed_forward\.)mlp\.fc1_weight")
_EXPERTS = re.compile(r"(layers\.\d+\.feed_forward\.experts\.)moe_w_(in_eD_F|swiglu_eD_F|out_eF_D)")


def is_dropped(key: str) -> bool:
    """Entries with no weights: extra states, precomputed RoPE tables, routing statistics."""
    return _DROPPED.fullmatch(key) is not None


def unfuse(state: Mapping[str, object], args: NativeArgs, source: str) -> dict[str, torch.Tensor]:
    """One shard's tensors under Meta's module names, as views (no copies, nothing read); dropped entries removed.

    Fused tensors are split with this shard's sizes: ``wqkv`` holds this rank's q heads, then its k and v heads;
    ``fc1_weight`` its w1 rows, then its w3 rows; 2D expert layouts are viewed ``[E, D, F_local]`` /
    ``[E, F_local, D]``.
    """
    unfused: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor, origin: str) -> None:
        if key in unfused:
            raise ConversionError(f"{source}: {origin!r} and another entry both give {key!r}")
        unfused[key] = tensor

    for key, value in state.items():
        if is_dropped(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for name, tensor in _unfuse_one(key, value, args, source):
            put(name, tensor, key)
    return unfused


def _unfuse_one(key: str, tensor: torch.Tensor, args: NativeArgs, source: str) -> list[tuple[str, torch.Tensor]]:
    for pattern, handler in _SPLITTERS:
        match = pattern.fullmatch(key)
        if match:
            return handler(match.group(1), match, tensor, args, f"{source}: {key!r} {tuple(tensor.shape)}")
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(replacement, key), tensor)]
    return [(key, tensor)]


def _split_wqkv(prefix: str, match, wqkv: torch.Tensor, args: NativeArgs, where: str):
    """``Attention.load_hook``: rows = d * (n_heads + 2 n_kv_heads), d = head_dim / world size."""
    heads, kv_heads = (
        (args.n_heads, args.kv_heads) if prefix.startswith("layers.") else (args.vision_args.n_heads,) * 2
    )
    d, remainder = divmod(wqkv.shape[0], heads + 2 * kv_heads)
    if remainder or wqkv.ndim != 2:
        raise ConversionError(
            f"{where}: rows are not a multiple of n_heads + 2 * n_kv_heads ({heads} + 2 * {kv_heads})"
        )
    q, k, v = wqkv.split([d * heads, d * kv_heads, d * kv_heads], dim=0)
    return [(prefix + "wq.weight", q), (prefix + "wk.weight", k), (prefix + "wv.weight", v)]


def _split_fc1(prefix: str, match, fc1: torch.Tensor, args: NativeArgs, where: str):
    """``FeedForward.load_hook``: this shard's w1 rows, then its w3 rows."""
    if fc1.shape[0] % 2:
        raise ConversionError(f"{where}: an odd number of rows cannot hold w1 and w3")
    w1, w3 = fc1.chunk(2, dim=0)
    return [(prefix + "w1.weight", w1), (prefix + "w3.weight", w3)]


def _view_experts(prefix: str, match, flat: torch.Tensor, args: NativeArgs, where: str):
    """``Experts.load_hook``: ``[E·D, F_local]`` → ``[E, D, F_local]``, ``[E·F_local, D]`` → ``[E, F_local, D]``."""
    if args.moe_args is None:
        raise ConversionError(f"{where}: expert weights in a checkpoint whose params.json has no moe_args")
    E, D = args.moe_args.num_experts, args.dim
    if flat.numel() % (E * D):
        raise ConversionError(f"{where}: not divisible into {E} experts of dim {D}")
    kind = match.group(2)
    shape = (E, -1, D) if kind == "out_eF_D" else (E, D, -1)
    name = {"in_eD_F": "w1", "swiglu_eD_F": "w3", "out_eF_D": "w2"}[kind]
    return [(prefix + name, flat.view(shape))]


_Splitter = Callable[[str, re.Match, torch.Tensor, NativeArgs, str], list[tuple[str, torch.Tensor]]]
_SPLITTERS: list[tuple[re.Pattern, _Splitter]] = [(_WQKV, _split_wqkv), (_FC1, _split_fc1), (_EXPERTS, _view_experts)]
