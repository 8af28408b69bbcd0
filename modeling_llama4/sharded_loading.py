"""Loading under a device mesh (``tp_plan`` / ``distributed_config``): each rank reads only its slices of the
safetensors files, with file reads.

transformers 5.24 indexes each checkpoint tensor's memory-mapped slice (``safe_open(...).get_slice``) with the
rank's slice. A slice along an inner dim, like tensor parallel's of ``gate_up_proj [E, D, 2I]`` along 2I, takes a
short run out of every row, so copying it faults in every page of the tensor: each rank ends up with all of it
mapped (file-backed, in its RSS for as long as the checkpoint stays mapped, i.e. as long as any lazily mapped
weight lives). :class:`RankSlice` reads such a slice's contiguous runs with ``os.preadv`` at their offsets in the
file instead: only the rank's bytes land in its memory, and the page cache they pass through is not mapped into the
process (shared by the ranks of a node, not in their RSS). Whole tensors (replicated weights) keep the zero-copy
memory map. transformers reads a packed tensor's strided shard (the rank's gate and up slices of ``gate_up_proj``)
piece by piece and concatenates the pieces; each piece is read into a memory mapping of its own
(:func:`anonymous_tensor`), given back to the system once concatenated, so the transient pieces do not stay in the
rank's heap (measured with ``benchmarks/bench_parallel.py``: the same peak as reading the shard in one piece).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors import safe_open

# The safetensors dtypes read with file reads; a tensor of any other is sliced through the memory map.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class RankSlice:
    """One tensor of a safetensors file, sliced as transformers' loader slices ``safe_open(...).get_slice(name)``:
    ``rank_slice[index]`` with ``index`` step-1 slices (one per leading dim) reads only those elements."""

    def __init__(self, mapped: Any, fd: int, offset: int, dtype: torch.dtype | None, shape: list[int]):
        self.mapped = mapped  # the memory-mapped slice: whole reads, metadata and any other index
        self.fd = fd
        self.offset = offset  # byte offset of the tensor's data in the file
        self.dtype = dtype
        self.shape = shape

    def get_shape(self) -> list[int]:
        return self.mapped.get_shape()

    def get_dtype(self) -> str:
        return self.mapped.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        bounds = self._bounds(index)
        if bounds is None:  # the whole tensor, or an index other than step-1 slices
            return self.mapped[index]
        return self._read(bounds)

    def _bounds(self, index: Any) -> list[range] | None:
        """``index`` as one range per dim; None for the whole tensor or an index other than step-1 slices."""
        index = index if isinstance(index, tuple) else (index,)
        steps_of_one = all(isinstance(part, slice) and part.step in (None, 1) for part in index)
        if self.dtype is None or len(index) > len(self.shape) or not steps_of_one:
            return None
        index += (slice(None),) * (len(self.shape) - len(index))
        bounds = [range(*part.indices(size)) for part, size in zip(index, self.shape)]
        return None if [len(dim) for dim in bounds] == self.shape else bounds

    def _read(self, bounds: list[range]) -> torch.Tensor:
        """The elements in ``bounds``, read run by run into a tensor of their own (:func:`anonymous_tensor`)."""
        out = anonymous_tensor([len(part) for part in bounds], self.dtype)
        if out.numel():
            destination = memoryview(out.view(-1).view(torch.uint8).numpy())
            self._read_into(destination, out.stride(), [range(len(part)) for part in bounds], bounds)
        return out

    def _read_into(self, destination: memoryview, stride: tuple[int, ...], target: list[range], bounds: list[range]):
        """Read the elements in ``bounds`` to the ``target`` ranges of a tensor with ``stride`` (``destination``: its
        bytes), run by run: a run spans the last partial dim of ``bounds`` and the whole dims after it."""
        partial = max((d for d, part in enumerate(bounds) if len(part) < self.shape[d]), default=0)
        element_size = self.dtype.itemsize
        run_bytes = math.prod(len(part) for part in bounds[partial:]) * element_size
        sources = run_offsets(bounds, contiguous_strides(self.shape), partial)
        for source, start in zip(sources, run_offsets(target, stride, partial)):
            run = destination[start * element_size : start * element_size + run_bytes]
            if os.preadv(self.fd, [run], self.offset + source * element_size) != run_bytes:
                raise OSError(f"The safetensors file (descriptor {self.fd}) ends inside a tensor: is it truncated?")


def anonymous_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in a memory mapping of its own, unmapped when the tensor is freed. transformers reads a
    packed tensor's strided shard (the rank's gate and up slices of ``gate_up_proj``) piece by piece and concatenates
    the pieces: from the allocator's heap, such transient pieces would stay in the rank's memory after the load."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


def run_offsets(bounds: list[range], stride: Sequence[int], partial: int) -> list[int]:
    """Element offsets, in C order, of the runs that start the ranges of ``bounds`` in a tensor with ``stride``:
    one run per index of the dims before ``partial``."""
    starts = [bounds[partial].start * stride[partial]]
    for part, step in zip(reversed(bounds[:partial]), reversed(stride[:partial])):
        starts = [index * step + start for index in part for start in starts]
    return starts


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    """The strides, in elements, of a C-contiguous tensor of ``shape``."""
    strides = [1] * len(shape)
    for dim in reversed(range(len(shape) - 1)):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    return strides


@contextlib.contextmanager
def rank_state_dict(
    state_dict: dict | None, checkpoint_files: Sequence[str] | None, load_config: Any
) -> Iterator[dict | None]:
    """The state dict for transformers' ``_load_pretrained_model``: under a device mesh, every tensor of the
    safetensors ``checkpoint_files`` as a :class:`RankSlice` (the files open for the block); otherwise ``state_dict``
    unchanged (transformers reads the files itself: one process, a given state dict, ``.bin`` or ``disable_mmap``).
    """
    files = list(checkpoint_files or ())
    safetensors = files and all(str(file).endswith(".safetensors") for file in files)
    if state_dict is not None or load_config.device_mesh is None or load_config.disable_mmap or not safetensors:
        yield state_dict
        return
    with contextlib.ExitStack() as stack:
        slices = {}
        for file in files:
            mapped = stack.enter_context(safe_open(file, framework="pt"))
            fd = os.open(file, os.O_RDONLY)
            stack.callback(os.close, fd)
            data_start, header = read_header(fd)
            for name in mapped.keys():
                entry = header[name]
                offset = data_start + entry["data_offsets"][0]
                dtype = DTYPES.get(entry["dtype"])
                slices[name] = RankSlice(mapped.get_slice(name), fd, offset, dtype, entry["shape"])
        yield slices


def read_header(fd: int) -> tuple[int, dict[str, Any]]:
    """``(byte offset of the data, header)`` of a safetensors file: 8 bytes of header size, then the JSON header."""
    size = int.from_bytes(os.pread(fd, 8, 0), "little")
    return 8 + size, json.loads(os.pread(fd, size, 8))
