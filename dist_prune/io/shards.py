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
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64",
}  # every dtype safetensors' torch API reads (safetensors.torch._TYPES)
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


def shard_names(n: int, stem: str = "model") -> list[str]:
    """The files of n shards as save_pretrained names them: model.safetensors, or
    model-00001-of-0000n.safetensors ...; another `stem` for files no loader should pick up."""
    return [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


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


# safetensors' own limit on the JSON header (MAX_HEADER_SIZE in its Rust source): a larger length
# read from the first 8 bytes means the file is not safetensors at all
MAX_HEADER = 100_000_000
MAX_COUNT = 2**63  # safetensors stores shapes and offsets as 64-bit integers, torch sizes as signed ones


@dataclass(frozen=True)
class ShardHeader:
    """A safetensors file's header, checked against the file: `tensors` in the order of their data."""

    path: Path
    data_start: int  # 8 + the header's length: where the first tensor's bytes begin
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict

    def spec(self, name: str) -> TensorSpec:
        entry = self.tensors[name]
        return TensorSpec(name, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name`, in its shape."""
        return self.read(name).view(self.spec(name).shape)

    def read(self, name: str, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Rows [first, last) of tensor `name`, flat (the rows of a 0-D or 1-D tensor are its
        elements), with positioned reads: only these bytes enter the process."""
        spec = self.spec(name)
        row = math.prod(spec.shape[1:]) * spec.dtype.itemsize
        last = (spec.shape[0] if spec.shape else 1) if last is None else last
        start = self.data_start + self.tensors[name]["data_offsets"][0] + first * row
        return read_bytes(self.path, start, max(last - first, 0) * row, spec.dtype)


def read_bytes(path: Path, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """`nbytes` of `path` from `offset`, as a flat tensor of `dtype`."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    with open(path, "rb") as fh:
        while view:  # one read returns at most about 2 GiB
            got = os.preadv(fh.fileno(), [view], offset)
            if got <= 0:
                raise UserError(f"{path} is truncated: it ends at byte {offset}")
            view, offset = view[got:], offset + got
    return torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)


def _count(value) -> bool:
    """A JSON number that can count elements or bytes: an int (not a bool) in [0, 2**63)."""
    return type(value) is int and 0 <= value < MAX_COUNT


def read_header(path: Path) -> ShardHeader:
    """The header of the safetensors file `path`, checked as safetensors itself checks it: a known
    dtype, shape x itemsize = the byte length, offsets that tile the data area from 0 without gap
    or overlap, and a data area that ends where the file ends. UserError naming the file."""
    path = Path(path)

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a readable safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is truncated: {size} bytes, no safetensors header")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER:
            raise bad(f"a header of {n} bytes")
        if 8 + n > size:
            raise UserError(f"{path} is truncated: {size} bytes, its header alone needs {8 + n}")
        header = _json_of(f.read(n), bad, "header")
    if not isinstance(header, dict):
        raise bad("bad header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("bad header: __metadata__ is not an object of strings")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) \
                or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
            raise bad(f"bad header entry for {name}")
        dtype, shape, (begin, end) = entry.get("dtype"), entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name} has dtype {dtype!r}, unknown to safetensors' torch API")
        # a zero dimension makes any other dimension hold no bytes: bound them all the same
        if not all(map(_count, (*shape, begin, end))) or math.prod(max(d, 1) for d in shape) >= MAX_COUNT \
                or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise bad(f"tensor {name}: offsets {[begin, end]} do not hold a {dtype} {shape}")
        spans.append((begin, end, name))
    spans.sort()
    stop = 0
    for begin, end, name in spans:
        if begin != stop:
            raise bad(f"tensor {name} starts at {begin}, where {stop} was expected")
        stop = end
    if 8 + n + stop > size:
        raise UserError(f"{path} is truncated: {size} bytes, its header promises {8 + n + stop}")
    if 8 + n + stop < size:
        raise UserError(f"{path} is padded: {size} bytes, its header describes {8 + n + stop}")
    return ShardHeader(path, 8 + n, {name: header[name] for _, _, name in spans}, metadata)


def _json_of(raw: bytes, bad, what: str):
    """`raw` parsed as JSON, or `bad(...)`: RecursionError is how json answers a few thousand
    nested brackets."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise bad(f"bad {what}: not JSON") from None


def read_index(path: Path) -> dict[str, str]:
    """The weight_map of the safetensors index `path`: tensor name -> shard file name, every
    shard a plain *.safetensors name in the index's own directory (no path, no `..`).
    UserError naming the file."""
    path = Path(path)

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid safetensors index ({why})")

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    index = _json_of(raw, bad, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("no weight_map object naming the tensors' shards")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_shard_name(shard):
            raise bad(f"tensor {name} is placed in {shard!r}; a shard must be a *.safetensors file "
                      "name in the same directory")
    return weight_map


def _plain_shard_name(name: str) -> bool:
    """No separator, so no `..` component and no absolute path: the name stays in its directory."""
    return name.endswith(".safetensors") and not any(c in name for c in "/\\\0")


class ShardWriter:
    """One safetensors file written once, tensor by tensor after its header (computed from the
    specs up front), fsynced, its sha256 taken on the way. `path` None: only the sha256 of the
    file these tensors would make (the dense shards a compressed export stands for)."""

    def __init__(self, path: Path | None, specs: Sequence[TensorSpec]):
        self.specs, self._next = list(specs), 0
        self._hash = hashlib.sha256()
        self._fh = None if path is None else open(path, "wb")
        self._put(safetensors_header(self.specs))

    def _put(self, buf) -> None:
        if self._fh is not None:
            self._fh.write(buf)
        self._hash.update(buf)

    def append(self, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise RuntimeError(f"{tensor.shape} {tensor.dtype}: the shard's header holds no more tensors")
        spec = self.specs[self._next]
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{spec.name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                               f"the shard's header says {tuple(spec.shape)} {spec.dtype}")
        if spec.numel:
            self._put(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.specs)

    def close(self) -> str:
        """Flush and fsync the file; its sha256."""
        if not self.complete:
            raise RuntimeError(f"shard closed after {self._next} of its {len(self.specs)} tensors")
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        return self._hash.hexdigest()

    def abort(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # flushing its buffer onto a full disk: the file goes anyway
                pass
            self._fh = None


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


def count_non_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> int:
    """NaN and Inf values in a floating tensor (0 for integers). In runs of `chunk` elements, so
    the check adds at most 4 MB of flags to the tensor in memory (and a 16 MB float32 copy of the
    run for 1-byte floats, which torch cannot test directly)."""
    if not tensor.is_floating_point():
        return 0
    return sum(part.numel() - int(torch.isfinite(part if part.element_size() > 1 else part.float()).sum())
               for part in tensor.reshape(-1).split(chunk))
