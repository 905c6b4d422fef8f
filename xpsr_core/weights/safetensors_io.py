"""Reading safetensors headers with clear errors, and writing files one tensor at a time.

The official UNet file is 4.4 GB; converting it must not hold a second copy in memory, so
the writer takes the header up front and then streams each tensor's bytes. The reader
checks a file's declared size against its real size first, so a truncated download is
reported as such instead of as a deserialisation error deep in a load.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> SafetensorsHeader:
    """The tensor names, shapes and metadata of a safetensors file, after checking it is complete."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file "
                                  "(truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header length field reads {n} bytes)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header declares {8 + n} bytes of header, the file has "
                                  f"{size} bytes")
        try:
            raw = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from e
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    end = 0
    for name, entry in raw.items():
        try:
            tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]))
            end = max(end, entry["data_offsets"][1])
        except (KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (malformed header entry for '{name}')") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header declares {8 + n + end} bytes, the file has {size} "
                              "bytes (incomplete download or copy?)")
    return SafetensorsHeader(tensors, metadata)


def write_streaming(path: str | Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                    fetch: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file whose tensors are fetched (and cast) one at a time; returns its size.

    ``entries`` gives each tensor's name, shape and the dtype to write; ``fetch(name)``
    returns the tensor, which must have that shape.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = fetch(name)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{name}: has shape {tuple(t.shape)} while writing; expected {tuple(shape)}")
            f.write(t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.replace(path)
    return path.stat().st_size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
