"""What an export format is: one object that says how each exported tensor is stored, where the
directory's files go, and whether a model loader may read the directory as it is.

A format maps one dense tensor to its stored tensors and back, one tensor at a time, and declares
their specs from the dense tensor's shape, dtype and exact count of non-zero elements alone, so
that io/export.py computes every shard's header before it writes a byte. The base class is the
identity (every tensor stored as it is); a compressing format overrides the members below
`compresses` for the tensors it compresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from dist_prune.io.shards import SPARSITY_FILE, TensorSpec, shard_names

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so that -0.0 and NaN payloads compare by their bits."""
    return t.view(_BITS[t.element_size()])


def stored_nonzero(t: torch.Tensor) -> int:
    """How many elements of `t` have a non-zero bit pattern (a -0.0 counts): the values a bitmask
    format stores. Exact on any part of a tensor, so the counts of ZeRO-3 slices add up to the
    whole tensor's; count in the export dtype (a value can round to zero in it)."""
    return int(torch.count_nonzero(bits(t))) if t.numel() else 0


@dataclass(frozen=True)
class Layout:
    """The files of an export directory, besides sparsity.json and the extra (tokenizer) files."""

    stem: str            # shards: <stem>.safetensors, or <stem>-0000i-of-0000n.safetensors
    config: str          # the model's config.json, under this name
    notice: str | None   # a README for whoever opens the directory, or None

    @property
    def index(self) -> str:
        return f"{self.stem}.safetensors.index.json"

    def shard_names(self, n: int) -> list[str]:
        return shard_names(n, self.stem)

    def own_files(self) -> set[str]:
        return {self.config, self.index, SPARSITY_FILE} | ({self.notice} if self.notice else set())


HF_LAYOUT = Layout("model", "config.json", None)  # as save_pretrained writes it


class ExportFormat:
    """The identity format; subclasses override what they store differently (module docstring)."""

    name = "dense"
    # A model loader reads the directory as it is. False: nothing in it may look loadable (no
    # config.json, no model*.safetensors), and `dist-prune pull` decompresses it by default.
    loadable = True
    layout = HF_LAYOUT

    def check(self, structure) -> str | None:
        """Why this format cannot hold weights pruned with `structure` (prune.structure, parsed), or None."""
        return None

    def compresses(self, name: str, shape: Sequence[int], pruned: bool) -> bool:
        """Whether the tensor `name` is stored in this format's parts rather than as it is."""
        return False

    # -- the tensors it compresses ----------------------------------------------------------
    def stored_names(self, name: str) -> list[str]:
        return [name]

    def stored_specs(self, spec: TensorSpec, nonzero: int) -> list[TensorSpec]:
        """The stored tensors of the dense tensor `spec` with `nonzero` non-zero bit patterns."""
        return [spec]

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of `tensor`, in the order of `stored_specs`."""
        return {name: tensor}

    def dense_spec(self, name: str, shape: Sequence[int], parts: Mapping[str, TensorSpec]) -> TensorSpec:
        """The dense tensor's spec from the specs of its stored tensors and its shape."""
        return parts[name]

    def decode(self, name: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense tensor back from `encode`'s parts."""
        return parts[name]

    # -- the directory ------------------------------------------------------------------------
    def notice(self) -> str:
        """The text of `layout.notice`."""
        raise NotImplementedError


DENSE = ExportFormat()
