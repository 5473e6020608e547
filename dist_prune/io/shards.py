"""safetensors on disk, written and read without the safetensors package's whole-file API:
file names, dtypes, shard planning and headers, durable writes, hashes and header checks.
Everything in dist_prune.io builds on this module; it imports nothing of dist_prune but errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dist_prune.errors import UserError

SPARSITY_FILE = "sparsity.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}  # "BF16" -> torch.bfloat16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(int(d) for d in self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in order; a shard never exceeds max_shard_size bytes of tensor data unless a single
    tensor is larger (then it is alone). Shards are contiguous runs of `specs`, so writing the
    tensors in `specs` order fills one shard file after the other."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        n = spec.nbytes
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
        if size > max_shard_size:  # a single oversize tensor: alone in its shard
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def safetensors_header(shard: Sequence[TensorSpec]) -> bytes:
    """The complete safetensors prefix: 8-byte LE length + space-padded JSON header."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        meta[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                           "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, **kw) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, **kw) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_shard_header(path: Path) -> dict:
    """The JSON header of a safetensors shard whose size matches what the header describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"shard {path} is truncated (no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise UserError(f"shard {path} is truncated (header runs past end of file)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"shard {path} has a corrupt safetensors header") from None
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, AttributeError):
        raise UserError(f"shard {path} has a corrupt safetensors header") from None
    if 8 + n + end != size:
        raise UserError(f"shard {path} is truncated or padded: {size} bytes, header says {8 + n + end}")
    return header


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """"2GB", "500MB", "1.5GiB", "100 kb", 1000 -> bytes (decimal KB/MB/GB, binary KiB/MiB/GiB,
    as transformers does). UserError on anything else or a non-positive size."""
    if isinstance(text, bool):
        raise UserError(f"invalid size {text!r}: expected e.g. 2GB, 500MB, 1.5GiB or a byte count")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"invalid size {text!r}: expected e.g. 2GB, 500MB, 1.5GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"invalid size {text!r}: must be positive")
    return value
