"""Writing a checkpoint: an output folder that appears complete or not at all, and a streaming writer of sharded
safetensors files (``model-XXXXX-of-YYYYY.safetensors`` + index).

Everything is written into a hidden staging folder beside the output and renamed into place at the end. A run that
fails or is interrupted (an error, Ctrl-C, SIGTERM through the CLI) removes its staging folder; one that is killed
leaves only a hidden ``.NAME.partial-PID@HOST-*`` folder, never a half checkpoint under the output name. The next
run for the same output removes the staging folders of dead runs of this machine and reports the others.

The safetensors format is an 8-byte little-endian header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes. Since every tensor's shape is known before any is read, the files are
planned up front and each header is written as its file opens; tensors then stream in chunk by chunk. Memory
holds one chunk, never a whole tensor or file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from . import ConversionError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# The output folder


def check_output_dir(output_dir: Path, input_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside the input, and a non-empty one unless ``overwrite``."""
    output, source = output_dir.resolve(), input_dir.resolve()
    if output == source or source in output.parents or output in source.parents:
        raise ConversionError(f"output folder {output_dir} must not be, contain or lie inside the input {input_dir}")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder")
    if _non_empty(output_dir) and not overwrite:
        raise ConversionError(f"output folder {output_dir} is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_output(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``output_dir``; on success rename it to ``output_dir``, else delete it,
    with the parent folders this call created (``--output new/a/b/out`` leaves no empty ``new/a/b`` behind).

    ``OSError``s (no space left, no permission, a file in the way) become ``ConversionError``s.
    """
    created = [folder for folder in (output_dir.parent, *output_dir.parent.parents) if not folder.exists()]
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output_dir)
        staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        _remove_empty_folders(created)
        raise ConversionError(f"cannot create the output folder {output_dir}: {error}") from error
    try:
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        if isinstance(error, OSError):
            raise ConversionError(f"writing {output_dir} failed: {error}") from error
        raise


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, those a failed run created) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never created: mkdir failed below it
        except OSError:
            return  # something was put there meanwhile: keep it and its parents


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
_STAGING = re.compile(r"\.(?P<name>.+)\.partial-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.]+)-)?[0-9a-f]{8}")


def remove_stale_staging(output_dir: Path) -> None:
    """Delete the staging folders of ``output_dir`` left by killed runs on this machine; log the others."""
    for path in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        match = _STAGING.fullmatch(path.name)
        if match is None or match["name"] != output_dir.name:
            continue
        if match["host"] == _HOST and not _process_alive(int(match["pid"])):
            logger.info("removing %s, left by an interrupted conversion (process %s)", path, match["pid"])
            shutil.rmtree(path, ignore_errors=True)
        else:
            owner = f"process {match['pid']} on {match['host']}" if match["pid"] else "an older converter"
            logger.warning("%s belongs to %s: delete it by hand if that conversion is not running", path, owner)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    if not _non_empty(output_dir):
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    elif overwrite:
        retired = output_dir.parent / f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
        output_dir.rename(retired)
        staging.rename(output_dir)
        shutil.rmtree(retired)
    else:
        raise ConversionError(f"output folder {output_dir} was filled by someone else during the conversion")
    logger.info("wrote %s", output_dir)


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# Sharded safetensors files

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.bool: "BOOL",
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"`` (powers of ten), ``"4.5GiB"`` (powers of two) or a plain byte count."""
    if isinstance(size, int):
        return size
    match = _SIZE.fullmatch(size)
    if match is None:
        raise ValueError(f"not a size: {size!r} (expected e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_files(entries: list[TensorEntry], max_file_bytes: int) -> list[list[TensorEntry]]:
    """Greedy, in order: a file takes tensors until the next would pass ``max_file_bytes`` (a bigger tensor gets
    a file of its own), as transformers' ``save_pretrained`` shards."""
    files: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if files[-1] and size + entry.nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += entry.nbytes
    return files


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Writes planned tensors, in plan order, into numbered safetensors files and their index.

    Use as a context manager; ``write`` each tensor of ``entries`` in order. The index is written on a clean exit
    only, after every file is complete and synced.
    """

    def __init__(self, directory: Path, entries: list[TensorEntry], max_file_bytes: int):
        self.directory = directory
        self.files = plan_files(entries, max_file_bytes)
        self._pending = [(i, entry) for i, file in enumerate(self.files) for entry in file]
        self._position = 0
        self._handle: BinaryIO | None = None
        self._open_index = -1

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_file()
        if exc_type is None:
            self._finish()

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for _, entry in self._pending)

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Stream the next planned tensor as consecutive chunks of its row-major bytes (same dtype, any shapes)."""
        file_index, entry = self._pending[self._position]
        if name != entry.name:
            raise RuntimeError(f"writer expected {entry.name!r} next, got {name!r}")
        if file_index != self._open_index:
            self._open_file(file_index)
        written = 0
        for chunk in chunks:
            if chunk.dtype != entry.dtype:
                raise RuntimeError(f"{name}: chunk dtype {chunk.dtype}, planned {entry.dtype}")
            written += _write_tensor_bytes(self._handle, chunk)
        if written != entry.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {entry.nbytes}")
        self._position += 1

    def _open_file(self, index: int) -> None:
        self._close_file()
        path = self.directory / shard_name(index, len(self.files))
        self._handle = open(path, "wb")
        self._open_index = index
        self._handle.write(_header(self.files[index]))

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def _finish(self) -> None:
        if self._position != len(self._pending):
            raise RuntimeError(f"only {self._position} of {len(self._pending)} planned tensors were written")
        weight_map = {
            entry.name: shard_name(i, len(self.files)) for i, file in enumerate(self.files) for entry in file
        }
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "wrote %d tensors (%.2f GB) in %d file(s)", len(weight_map), self.total_bytes / 1e9, len(self.files)
        )


def _header(entries: list[TensorEntry]) -> bytes:
    """Length-prefixed JSON header, padded with spaces to a multiple of 8 bytes (the format's alignment)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor_bytes(handle: BinaryIO, tensor: torch.Tensor) -> int:
    """Write a tensor's row-major bytes (little-endian, as torch stores them on every supported CPU)."""
    if tensor.numel() == 0:
        return 0
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    handle.write(memoryview(data))
    return data.nbytes
