"""Reading a native Llama 4 checkpoint: its model-parallel shards, found, checked against params.json, and read
lazily, one read group (a layer) at a time.

- ``native_schema``: every tensor's full shape and the dimension fairscale splits it on across model-parallel
  ranks (column-parallel layers and the vocab-parallel embedding on dim 0, row-parallel layers on dim 1, experts
  on their hidden dim), from params.json alone.
- ``unfuse``: one shard of a released checkpoint (fused names: ``wqkv``, ``fc1_weight``, 2D expert layouts, ...)
  as module-named views of the same storage, as Meta's load hooks do per rank. No data is read.
- ``NativeCheckpoint``: the shards, checked (names, shapes, count) from their pickled indexes only.

Shards are memory-mapped (``torch.load(..., weights_only=True, mmap=True)``), so opening one reads only its
pickled index. Pages a reader touches stay resident until the mapping goes, so the converter opens the shards
once per read group and lets them go after it: resident memory follows one layer, not the model. A memory-mapped
load skips the zip CRC checks of ``torch.load``, so the bytes of each read group are checked against their zip
CRC-32 when the group is opened, just before the converter reads them (then from the page cache).
"""

from __future__ import annotations

import collections
import io
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ConversionError
from .params import IMAGE_CHANNELS, NativeArgs

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# What the checkpoint holds, in Meta's module naming

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


# ----------------------------------------------------------------------------------------------------------------
# The shards

SINGLE_SHARD = "consolidated.pth"
_NUMBERED_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

Shard = dict[str, torch.Tensor]  # one rank's tensors under module names (memory-mapped views)
CRC_CHUNK_BYTES = 8 * 2**20


def find_shards(input_dir: Path) -> list[Path]:
    """``consolidated.pth``, or ``consolidated.00.pth … consolidated.NN.pth`` numbered without gaps, in rank order."""
    numbered: dict[int, Path] = {}
    for path in sorted(input_dir.glob("consolidated.*pth")):
        match = _NUMBERED_SHARD.fullmatch(path.name)
        if match is None:
            continue
        rank = int(match.group(1))
        if rank in numbered:
            raise ConversionError(f"{path} and {numbered[rank]} are both shard {rank}")
        numbered[rank] = path
    single = input_dir / SINGLE_SHARD
    if single.is_file():
        if numbered:
            raise ConversionError(f"{input_dir} holds both {SINGLE_SHARD} and numbered shards: which is the model?")
        return [single]
    if not numbered:
        raise ConversionError(f"no shard in {input_dir}: expected {SINGLE_SHARD} or consolidated.00.pth, ...")
    missing = [rank for rank in range(max(numbered) + 1) if rank not in numbered]
    if missing:
        names = ", ".join(f"consolidated.{rank:02d}.pth" for rank in missing)
        raise ConversionError(f"{input_dir} lacks shard(s) {names} of {max(numbered) + 1}")
    return [numbered[rank] for rank in sorted(numbered)]


def load_shard(path: Path) -> dict[str, object]:
    """Memory-map one shard, tensors only (``weights_only``; ``io.BytesIO`` allowed for Meta's extra states)."""
    with torch.serialization.safe_globals([io.BytesIO]):
        try:
            state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, ...)
            raise ConversionError(f"cannot read {path} as a weights-only torch checkpoint: {error}") from error
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


class _Opaque:
    """Any object of a shard's pickle other than a tensor or a dict: built from nothing, holding nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


class _StorageUnpickler(pickle.Unpickler):
    """Reads a torch zip checkpoint's ``data.pkl`` into ``{name: storage key}``; constructs nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, *args: storage
        return _Opaque

    def persistent_load(self, saved_id):
        return saved_id[2]  # ("storage", storage type, key, location, numel)


def storage_members(path: Path) -> dict[str, str]:
    """Each tensor entry of the shard at ``path`` → the zip member holding its bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            (pickled,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            keys = _StorageUnpickler(io.BytesIO(archive.read(pickled))).load()
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError, EOFError) as error:
        raise ConversionError(f"cannot read {path} as a torch zip checkpoint: {error}") from error
    prefix = pickled.removesuffix("data.pkl")
    return {name: f"{prefix}data/{key}" for name, key in keys.items() if isinstance(key, str)}


def verify_members(path: Path, members: Iterable[str]) -> None:
    """Read ``members`` of the zip file at ``path`` to their end, which checks their CRC-32 (streamed)."""
    with zipfile.ZipFile(path) as archive:
        for member in members:
            try:
                with archive.open(member) as data:
                    while data.read(CRC_CHUNK_BYTES):
                        pass
            except (zipfile.BadZipFile, KeyError, OSError) as error:
                raise ConversionError(f"{path} is damaged ({member}): {error}") from error


class NativeCheckpoint:
    """A native checkpoint's shards, checked against params.json on construction (indexes only, no weights).

    Attributes:
        args: the parsed params.json.
        paths: the shard files in rank order; their count is the model-parallel degree.
        vocab_size: rows of the (merged) token embedding.
        schema: every tensor's full shape and split, in model order.
        nbytes: every tensor's size in the checkpoint (all ranks together), in bytes.
    """

    def __init__(self, input_dir: Path, args: NativeArgs):
        self.args = args
        self.paths = find_shards(input_dir)
        self._check_world_size()
        shapes = [self._shapes(path) for path in self.paths]
        self._check_shard_count(shapes[0])
        self.vocab_size = self._vocab_size(shapes[0])
        self.schema = native_schema(args, self.vocab_size)
        for path, shard_shapes in zip(self.paths, shapes):
            self._check_shard(path, shard_shapes)
        self.nbytes = {key: math.prod(spec.shape) * shapes[0][key][1].itemsize for key, spec in self.schema.items()}
        self._unverified = [self._members_by_read_group(path) for path in self.paths]
        logger.info(
            "%s: %d shard(s), %d tensors, vocab %d", input_dir, self.world_size, len(self.schema), self.vocab_size
        )

    @property
    def world_size(self) -> int:
        return len(self.paths)

    @contextmanager
    def open(self, read_groups: Iterable[str] | None = None) -> Iterator[list[Shard]]:
        """All shards, memory-mapped and under module names, for reading ``read_groups`` (``read_group``; default:
        all), whose bytes are first checked against their CRCs; unmapped when the block ends.

        Keep no reference to their tensors past the block, or their pages stay resident.
        """
        self._verify(read_groups)
        shards = [unfuse(load_shard(path), self.args, str(path)) for path in self.paths]
        try:
            yield shards
        finally:
            shards.clear()

    def pieces(self, shards: list[Shard], key: str) -> list[torch.Tensor]:
        """Each rank's part of ``key``, in rank order; a replicated tensor once, after checking all copies agree."""
        if self.schema[key].split_dim is not None:
            return [shard[key] for shard in shards]
        first = shards[0][key]
        for path, shard in zip(self.paths[1:], shards[1:]):
            if not torch.equal(shard[key], first):
                raise ConversionError(f"{key!r} should be the same on every rank but differs in {path}")
        return [first]

    def merged(self, shards: list[Shard], key: str) -> torch.Tensor:
        """The whole tensor ``key`` (a copy when it is split over several ranks)."""
        pieces = self.pieces(shards, key)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.schema[key].split_dim)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model under module names, merged and copied into memory (for small models and checks)."""
        with self.open() as shards:
            return {key: self.merged(shards, key).clone() for key in self.schema}

    # ------------------------------------------------------------------------------------------------------------

    def _members_by_read_group(self, path: Path) -> dict[str, set[str]]:
        """The zip members of the shard's tensors, by read group (fused and module names share their group)."""
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for name, member in storage_members(path).items():
            groups[read_group(name)].add(member)
        return groups

    def _verify(self, read_groups: Iterable[str] | None) -> None:
        for path, unverified in zip(self.paths, self._unverified):
            names = list(unverified) if read_groups is None else [g for g in read_groups if g in unverified]
            verify_members(path, sorted({member for name in names for member in unverified.pop(name)}))

    def _check_shard_count(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """The first shard's share of the attention heads gives the model-parallel degree: are all shards here?"""
        key = "layers.0.attention.wq.weight"
        rows, total = shapes.get(key, ((0,), None))[0][0], self.args.n_heads * self.args.head_dim
        if not rows or total % rows or total // rows == self.world_size:
            return  # a shape mismatch, reported with the others by _check_shard
        expected = total // rows
        missing = [f"consolidated.{rank:02d}.pth" for rank in range(self.world_size, expected)]
        raise ConversionError(
            f"{self.paths[0]} holds 1/{expected} of the attention heads ({key} has {rows} of {total} rows), so the "
            f"checkpoint has {expected} shards; found {self.world_size}"
            + (f", missing {', '.join(missing)}" if missing else "")
        )

    def _check_world_size(self) -> None:
        """fairscale gives each rank whole heads: the shard count must divide every head count."""
        ws, args = self.world_size, self.args
        heads = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads}
        if args.vision_args is not None:
            heads["vision_args.n_heads"] = args.vision_args.n_heads
        bad = {name: count for name, count in heads.items() if count % ws}
        if bad:
            counts = ", ".join(f"{name} = {count}" for name, count in bad.items())
            raise ConversionError(
                f"{ws} shards ({self.paths[0].name} … {self.paths[-1].name}) cannot split {counts}: "
                "the model-parallel degree must divide the head counts"
            )

    def _shapes(self, path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        state = unfuse(load_shard(path), self.args, str(path))
        return {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in state.items()}

    def _vocab_size(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
        if "tok_embeddings.weight" not in shapes:
            raise ConversionError(f"{self.paths[0]} has no tok_embeddings.weight")
        vocab_size = shapes["tok_embeddings.weight"][0][0] * self.world_size
        declared = self.args.vocab_size
        if declared > 0 and declared != vocab_size:
            raise ConversionError(f"params.json says vocab_size {declared}, the token embedding has {vocab_size} rows")
        return vocab_size

    def _check_shard(self, path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        unknown = sorted(set(shapes) - set(self.schema))
        missing = [key for key in self.schema if key not in shapes]
        if unknown or missing:
            raise ConversionError(
                f"{path} does not match params.json: "
                + "; ".join(
                    f"{label} {len(keys)} tensor(s): {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                    for label, keys in (("unknown", unknown), ("missing", missing))
                    if keys
                )
            )
        for key, spec in self.schema.items():
            shape, dtype = shapes[key]
            if not dtype.is_floating_point:
                raise ConversionError(f"{path}: {key!r} has dtype {dtype}, expected floating-point weights")
            if shape != spec.shard_shape(self.world_size) or _indivisible(spec, self.world_size):
                raise ConversionError(
                    f"{path}: {key!r} has shape {shape}; params.json implies {_describe(spec, self.world_size)}"
                )


def _indivisible(spec: TensorSpec, world_size: int) -> bool:
    return spec.split_dim is not None and spec.shape[spec.split_dim] % world_size != 0


def _describe(spec: TensorSpec, world_size: int) -> str:
    if spec.split_dim is None or world_size == 1:
        return f"{spec.shape}"
    return f"{spec.shard_shape(world_size)} per shard ({spec.shape} split {world_size} ways on dim {spec.split_dim})"
