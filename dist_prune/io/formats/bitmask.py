"""The compressed formats sparse-bitmask and sparse-24-bitmask: a storage and transfer form that
no model loader reads; `dist-prune pull` (or `dist-prune decompress`) gives the dense export back.

A pruned weight `<m>.weight` of shape [rows, cols] is stored as these tensors (names, dtypes and
shapes as compressed-tensors 0.12's BitmaskCompressor / Sparse24BitMaskCompressor write them;
every other tensor stays dense):

    sparse-bitmask     <m>.shape int64 [2]   <m>.compressed [n] (the stored values, row-major)
                       <m>.bitmask uint8 [rows, ceil(cols/8)]   <m>.row_offsets int64 [rows]
    sparse-24-bitmask  <m>.shape int64 [2, 1]   <m>.compressed [rows, cols/2]
                       <m>.bitmask uint8 [rows, ceil(cols/8)]

Bit j % 8 of byte j // 8 of a bitmask row (little bit order) is set where column j is stored.
Stored means a non-zero *bit pattern*, where compressed-tensors tests `w != 0`: a -0.0 is kept,
so decompressing gives back the dense export bit for bit (its sha256 is recorded and checked).
n, the one size not fixed by the shape, is that count (base.stored_nonzero), known before export.
sparse-24-bitmask stores exactly 2 of every 4 consecutive inputs: the non-zeros, then the first
zeros of the group (compressed-tensors picks the zeros by topk, whose tie order is unspecified).

compressed-tensors 0.15.0 removed these compressors, and a transformers that finds a sparse
`quantization_config` then fills the missing weights with random values without an error. So the
directory holds nothing a loader takes for a model: no config.json (the dense one is kept as
config.compressed.json), shards named compressed*.safetensors, and a README.md that says how to
get the dense model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy
import torch

from dist_prune.errors import UserError
from dist_prune.io.formats.base import ExportFormat, Layout, bits
from dist_prune.io.shards import TensorSpec

COMPRESSED_LAYOUT = Layout("compressed", "config.compressed.json", "README.md")

NOTICE = """\
# A compressed dist-prune export: not a loadable model

This directory holds a pruned model in dist-prune's `{fmt}` export format: each pruned weight is
stored as a bitmask plus its stored values (compressed-tensors 0.12's tensor layout), every other
tensor as it is. It is a storage and transfer form. No model loader reads it, on purpose: it has
no `config.json` (the model's is kept as `config.compressed.json`) and no `model*.safetensors`,
so that transformers, vLLM and the like fail instead of loading random weights in place of the
compressed ones (compressed-tensors 0.15.0 removed the sparse compressors that read this layout).

To get the Hugging Face model, byte for byte the `dense` export of the same job (every shard is
checked against the sha256 recorded in `sparsity.json`):

    dist-prune pull models:/NAME@ALIAS DIR      # a registered version: decompressed by default
    dist-prune decompress THIS_DIRECTORY DIR    # this directory
"""


def _part(weight: str, param: str) -> str:
    """("model.layers.0.mlp.up_proj.weight", "bitmask") -> "model.layers.0.mlp.up_proj.bitmask"."""
    return f"{weight.removesuffix('.weight')}.{param}"


class SparseBitmask(ExportFormat):
    """Every non-zero bit pattern stored, with a bitmask and the offset of each row's values."""

    name = "sparse-bitmask"
    loadable = False
    layout = COMPRESSED_LAYOUT
    params: tuple[str, ...] = ("shape", "compressed", "bitmask", "row_offsets")

    def compresses(self, name: str, shape: Sequence[int], pruned: bool) -> bool:
        # the pruned 2-D weights: compressed-tensors' compressors only rebuild names ending in .weight
        return bool(pruned) and len(shape) == 2 and name.endswith(".weight")

    def stored_names(self, name: str) -> list[str]:
        return [_part(name, p) for p in self.params]

    def keep(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Bool [rows, cols]: the elements whose values are stored."""
        return bits(w) != 0

    def _shapes(self, rows: int, cols: int, nonzero: int) -> dict[str, tuple[int, ...]]:
        return {"shape": (2,), "compressed": (nonzero,), "bitmask": (rows, (cols + 7) // 8), "row_offsets": (rows,)}

    def stored_specs(self, spec: TensorSpec, nonzero: int) -> list[TensorSpec]:
        shapes = self._shapes(*spec.shape, nonzero)
        return [TensorSpec(_part(spec.name, p), shapes[p], spec.dtype if p == "compressed" else
                           torch.uint8 if p == "bitmask" else torch.int64) for p in self.params]

    def encode(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if w.dim() != 2:
            raise ValueError(f"{name}: only 2-D weights are compressed, got shape {tuple(w.shape)}")
        keep = self.keep(name, w)
        rows, cols = w.shape
        counts = keep.sum(-1)
        values = bits(w)[keep].view(w.dtype)
        parts = {"shape": torch.tensor(self._shape_part(rows, cols)),
                 "compressed": values.reshape(self._shapes(rows, cols, values.numel())["compressed"]),
                 "bitmask": torch.from_numpy(numpy.packbits(keep.numpy(), axis=-1, bitorder="little")),
                 "row_offsets": torch.cumsum(counts, 0) - counts}
        return {_part(name, p): parts[p] for p in self.params}

    def _shape_part(self, rows: int, cols: int) -> list:
        return [rows, cols]

    def dense_spec(self, name: str, shape: Sequence[int], parts: Mapping[str, TensorSpec]) -> TensorSpec:
        return TensorSpec(name, tuple(shape), parts[_part(name, "compressed")].dtype)

    def decode(self, name: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rows, cols = (int(x) for x in parts[_part(name, "shape")].flatten().tolist())
        packed = parts[_part(name, "bitmask")]
        if tuple(packed.shape) != (rows, (cols + 7) // 8):
            raise UserError(f"{name}: bitmask of shape {tuple(packed.shape)} does not fit a [{rows}, {cols}] weight")
        keep = torch.from_numpy(numpy.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
        values = parts[_part(name, "compressed")].reshape(-1)
        if values.numel() != int(keep.sum()):
            raise UserError(f"{name}: {values.numel()} stored values but the bitmask marks {int(keep.sum())}")
        dense = torch.zeros((rows, cols), dtype=values.dtype)
        bits(dense)[keep] = bits(values)
        return dense

    def notice(self) -> str:
        return NOTICE.format(fmt=self.name)


class Sparse24Bitmask(SparseBitmask):
    """Exactly 2 of every 4 consecutive inputs stored: half the values, at fixed places per group."""

    name = "sparse-24-bitmask"
    params = ("shape", "compressed", "bitmask")

    def check(self, structure) -> str | None:
        if str(structure) != "2:4":
            return f"stores 2 of every 4 weights: it needs prune.structure 2:4, not {structure}"
        return None

    def _columns(self, name: str, cols: int) -> None:
        if cols % 4:
            raise UserError(f"export.format {self.name}: {name} has {cols} input columns, not a multiple of 4")

    def _shapes(self, rows: int, cols: int, nonzero: int) -> dict[str, tuple[int, ...]]:
        return {"shape": (2, 1), "compressed": (rows, cols // 2), "bitmask": (rows, (cols + 7) // 8)}

    def _shape_part(self, rows: int, cols: int) -> list:
        return [[rows], [cols]]

    def stored_specs(self, spec: TensorSpec, nonzero: int) -> list[TensorSpec]:
        self._columns(spec.name, spec.shape[1])
        return super().stored_specs(spec, nonzero)

    def keep(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The non-zeros, then the first zeros of each group of 4, 2 in all; UserError if a group
        holds more than 2 non-zeros."""
        rows, cols = w.shape
        self._columns(name, cols)
        groups = (bits(w) != 0).view(rows, cols // 4, 4)
        count = groups.sum(-1, dtype=torch.int8)
        bad = (count > 2).nonzero()
        if len(bad):
            r, g = bad[0].tolist()
            raise UserError(f"export.format {self.name} needs 2:4 sparse weights, but {name} has "
                            f"{int(count[r, g])} non-zeros (a -0.0 counts) in row {r}, columns {4 * g}-{4 * g + 3}")
        free = ~groups
        fill = free & (free.cumsum(-1, dtype=torch.int8) <= (2 - count).unsqueeze(-1))
        return (groups | fill).view(rows, cols)


SPARSE_BITMASK = SparseBitmask()
SPARSE_24_BITMASK = Sparse24Bitmask()
