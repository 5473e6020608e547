"""Compressed exports: compressed-tensors' sparse-bitmask and sparse-24-bitmask formats.

A pruned weight `<m>.weight` of shape [rows, cols] is stored as these tensors (names, dtypes and
shapes as compressed-tensors 0.12 writes them, so its BitmaskCompressor / Sparse24BitMaskCompressor
read our files; every other tensor stays dense):

    sparse-bitmask     <m>.shape int64 [2]   <m>.compressed [n] (the stored values, row-major)
                       <m>.bitmask uint8 [rows, ceil(cols/8)]   <m>.row_offsets int64 [rows]
    sparse-24-bitmask  <m>.shape int64 [2, 1]   <m>.compressed [rows, cols/2]
                       <m>.bitmask uint8 [rows, ceil(cols/8)]

Bit j % 8 of byte j // 8 of a bitmask row (little bit order) is set where column j is stored.
Stored means a non-zero *bit pattern*, where compressed-tensors tests `w != 0`: a -0.0 is kept,
so decompressing gives back the dense export bit for bit (its sha256 is recorded and checked).
sparse-24-bitmask stores exactly 2 of every 4 consecutive inputs: the non-zeros, then the first
zeros of the group (compressed-tensors picks the zeros by topk, whose tie order is unspecified).

The conversion runs one safetensors shard and one tensor at a time, in both directions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy
import torch

from dist_prune.errors import UserError
from dist_prune.io.shards import (
    SAFETENSORS_DTYPES, SPARSITY_FILE, TensorSpec, read_header, safetensors_header,
)

PARAMS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
          "sparse-24-bitmask": ("shape", "compressed", "bitmask")}
FORMATS = ("dense", *PARAMS)
CT_VERSION = "0.12.2"  # the compressed-tensors release whose layout this module writes
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- one tensor --------------------------------------------------------------------------------

def _part(weight: str, param: str) -> str:
    """("model.layers.0.mlp.up_proj.weight", "bitmask") -> "model.layers.0.mlp.up_proj.bitmask"."""
    return f"{weight.removesuffix('.weight')}.{param}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so that -0.0 and NaN payloads compare by their bits."""
    return t.view(_BITS[t.element_size()])


def compressible(name: str, entry: dict) -> bool:
    """Whether a tensor of sparsity.json is stored compressed: the pruned 2-D weights (the
    compressors of compressed-tensors only rebuild names ending in `.weight`)."""
    return bool(entry.get("pruned")) and len(entry.get("shape", ())) == 2 and name.endswith(".weight")


def _keep_24(name: str, nonzero: torch.Tensor) -> torch.Tensor:
    """Exactly 2 of every 4 consecutive columns: the non-zeros, then the group's first zeros."""
    rows, cols = nonzero.shape
    if cols % 4:
        raise UserError(f"export.format sparse-24-bitmask: {name} has {cols} input columns, "
                        "not a multiple of 4")
    groups = nonzero.view(rows, cols // 4, 4)
    count = groups.sum(-1, dtype=torch.int8)
    bad = (count > 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise UserError(f"export.format sparse-24-bitmask needs 2:4 sparse weights, but {name} has "
                        f"{int(count[r, g])} non-zeros (a -0.0 counts) in row {r}, columns {4 * g}-{4 * g + 3}")
    free = ~groups
    fill = free & (free.cumsum(-1, dtype=torch.int8) <= (2 - count).unsqueeze(-1))
    return (groups | fill).view(rows, cols)


def stored_mask(name: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Bool [rows, cols]: the elements whose values are stored. UserError if `fmt` cannot hold `w`."""
    if w.dim() != 2:
        raise ValueError(f"{name}: only 2-D weights are compressed, got shape {tuple(w.shape)}")
    nonzero = _bits(w) != 0
    return _keep_24(name, nonzero) if fmt == "sparse-24-bitmask" else nonzero


def compress_tensor(name: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """{param: tensor} in the order of PARAMS[fmt]; `name` only labels errors."""
    keep = stored_mask(name, w, fmt)
    rows, cols = w.shape
    values = _bits(w)[keep].view(w.dtype)
    bitmask = torch.from_numpy(numpy.packbits(keep.numpy(), axis=-1, bitorder="little"))
    if fmt == "sparse-24-bitmask":
        return {"shape": torch.tensor([[rows], [cols]]), "compressed": values.reshape(rows, cols // 2),
                "bitmask": bitmask}
    counts = keep.sum(-1)
    return {"shape": torch.tensor([rows, cols]), "compressed": values, "bitmask": bitmask,
            "row_offsets": torch.cumsum(counts, 0) - counts}


def decompress_tensor(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor back from `compress_tensor`'s parts (either format)."""
    rows, cols = (int(x) for x in parts["shape"].flatten().tolist())
    packed = parts["bitmask"]
    if tuple(packed.shape) != (rows, (cols + 7) // 8):
        raise UserError(f"{name}: bitmask of shape {tuple(packed.shape)} does not fit a [{rows}, {cols}] weight")
    bits = numpy.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little")
    keep = torch.from_numpy(bits.astype(bool))
    values = parts["compressed"].reshape(-1)
    if values.numel() != int(keep.sum()):
        raise UserError(f"{name}: {values.numel()} stored values but the bitmask marks {int(keep.sum())}")
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    _bits(dense)[keep] = _bits(values)
    return dense


def _part_specs(name: str, w: torch.Tensor, fmt: str) -> list[TensorSpec]:
    """The specs of `compress_tensor(name, w, fmt)` without building it (shard headers come first)."""
    rows, cols = w.shape
    n = int(stored_mask(name, w, fmt).sum())
    values = (rows, cols // 2) if fmt == "sparse-24-bitmask" else (n,)
    shapes = {"shape": (2, 1) if fmt == "sparse-24-bitmask" else (2,), "compressed": values,
              "bitmask": (rows, (cols + 7) // 8), "row_offsets": (rows,)}
    dtypes = {"shape": torch.int64, "compressed": w.dtype, "bitmask": torch.uint8, "row_offsets": torch.int64}
    return [TensorSpec(_part(name, p), shapes[p], dtypes[p]) for p in PARAMS[fmt]]


# -- shards --------------------------------------------------------------------------------------

def _tensor_order(path: Path) -> list[tuple[str, dict]]:
    """(name, header entry) of a safetensors file, in the order of the data."""
    return list(read_header(path).tensors.items())


def _write_shard(path: Path, specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor]) -> str:
    """Write a safetensors file tensor by tensor (as StreamingExport does); return its sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in _chunks(specs, tensors):
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _chunks(specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor]) -> Iterable[memoryview | bytes]:
    yield safetensors_header(specs)
    for spec, t in zip(specs, tensors, strict=True):
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
            raise RuntimeError(f"{spec.name}: got {tuple(t.shape)} {t.dtype}, "
                               f"header says {spec.shape} {spec.dtype}")
        if t.numel():
            yield memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _stored_tensors(f, order: list[str], names: set[str], fmt: str) -> Iterable[torch.Tensor]:
    """The tensors of a compressed shard, one at a time, from the open dense shard `f`."""
    for name in order:
        t = f.get_tensor(name)
        yield from (compress_tensor(name, t, fmt).values() if name in names else (t,))


def compress_shards(directory: Path, files: Sequence[str], fmt: str,
                    names: set[str]) -> tuple[dict[str, str], dict[str, str], int]:
    """Replace each dense shard in `directory` by its compressed form: the tensors in `names`
    compressed, the others as they are, in the same order and file. Returns the new shards'
    sha256, the weight map of the stored tensor names, and their total bytes."""
    from safetensors import safe_open

    sha256, weight_map, total = {}, {}, 0
    for file in files:
        path, part = directory / file, directory / f"{file}.compressing"
        order = _tensor_order(path)
        with safe_open(path, framework="pt") as f:
            specs = []
            for name, entry in order:  # first pass: sizes (and 2:4 checks) for the header
                if name in names:
                    specs += _part_specs(name, f.get_tensor(name), fmt)
                else:
                    specs.append(TensorSpec(name, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]]))
            sha256[file] = _write_shard(part, specs, _stored_tensors(f, [n for n, _ in order], names, fmt))
        os.replace(part, path)
        weight_map.update({s.name: file for s in specs})
        total += sum(s.nbytes for s in specs)
    return sha256, weight_map, total


def compression_config(sparsity_config: dict) -> dict:
    """config.json's "quantization_config" for a compressed export, as compressed-tensors'
    ModelCompressor.update_config writes it for a sparse-only model (and reads it back)."""
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "sparsity_config": sparsity_config}


def expected_tensors(meta: dict) -> set[str]:
    """The tensor names the shards of an export hold, per its sparsity.json."""
    fmt = meta.get("format", "dense")  # exports written before compression have no "format"
    if fmt not in FORMATS:
        raise UserError(f"{SPARSITY_FILE} names export format {fmt!r}, unknown to this dist-prune "
                        f"(allowed: {', '.join(FORMATS)})")
    if fmt != "dense" and (not isinstance(meta.get("dense_shards"), dict)
                           or set(meta["dense_shards"]) != set(meta.get("shards", {}))):
        raise UserError(f"{SPARSITY_FILE} of a {fmt} export must list the dense sha256 of every shard")
    out = set()
    for name, entry in meta["tensors"].items():
        if fmt != "dense" and compressible(name, entry):
            out |= {_part(name, p) for p in PARAMS[fmt]}
        else:
            out.add(name)
    return out


# -- decompression ----------------------------------------------------------------------------------

def _dense_name(stored: str, tensors: dict, fmt: str) -> str:
    """The dense tensor a stored tensor belongs to: itself, or the weight it is a part of."""
    module, _, param = stored.rpartition(".")
    return f"{module}.weight" if stored not in tensors and param in PARAMS[fmt] else stored


def _dense_tensors(f, names: list[str], stored: set[str], fmt: str) -> Iterable[torch.Tensor]:
    """The dense tensors `names`, one at a time, from the open compressed shard `f`."""
    for n in names:
        yield f.get_tensor(n) if n in stored else decompress_tensor(n, {p: f.get_tensor(_part(n, p))
                                                                        for p in PARAMS[fmt]})
