"""The model-parallel shards of a native checkpoint: found, checked against params.json, and read lazily.

Shards are memory-mapped (``torch.load(..., weights_only=True, mmap=True)``), so opening one reads only its
pickled index. Pages a reader touches stay resident until the mapping goes, so the converter opens the shards
once per read group (a layer) and lets them go after it: resident memory follows one layer, not the model.

A memory-mapped load skips the zip CRC checks of ``torch.load``, so the bytes of each read group are checked
against their zip CRC-32 when the group is opened, just before the converter reads them (from the page cache).
"""

from __future__ import annotations

import collections
import io
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConversionError
from .layout import TensorSpec, native_schema, read_group, unfuse
from .params import NativeArgs

logger = logging.getLogger(__name__)

SINGLE_SHARD = "consolidated.pth"
_NUMBERED_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

Shard = dict[str, torch.Tensor]  # one rank's tensors under module names (memory-mapped views)
CRC_CHUNK_BYTES = 64 * 2**20


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
        """All shards, memory-mapped and under module names, for reading ``read_groups`` (``layout.read_group``;
        default: all), whose bytes are first checked against their CRCs; unmapped when the block ends.

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
