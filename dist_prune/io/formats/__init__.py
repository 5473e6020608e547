"""The export formats, one object each (io/formats/base.py says what a format declares), and the
one registry export, verification, decompression and config validation look them up in. Adding
a format: a subclass of `ExportFormat` in its own module, its line here, and its tests
(ARCHITECTURE.md)."""

from __future__ import annotations

from dist_prune.errors import UserError
from dist_prune.io.formats.base import DENSE, HF_LAYOUT, ExportFormat, Layout, stored_nonzero
from dist_prune.io.formats.bitmask import SPARSE_24_BITMASK, SPARSE_BITMASK
from dist_prune.io.shards import SPARSITY_FILE

FORMATS: dict[str, ExportFormat] = {
    "dense": DENSE,
    "sparse-bitmask": SPARSE_BITMASK,
    "sparse-24-bitmask": SPARSE_24_BITMASK,
}

# sparsity.json's "format_version": 2 since the compressed formats stopped writing config.json and
# model*.safetensors (version 1 did, and a loader could take them for a model)
FORMAT_VERSION = 2


def format_of(meta: dict) -> ExportFormat:
    """The format of an export from its sparsity.json; UserError for one this dist-prune cannot read."""
    name = meta.get("format", DENSE.name)  # exports written before the compressed formats have none
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise UserError(f"{SPARSITY_FILE} names export format {name!r}, unknown to this dist-prune "
                        f"(allowed: {', '.join(FORMATS)})")
    if not fmt.loadable and meta.get("format_version", 1) < FORMAT_VERSION:
        raise UserError(f"{SPARSITY_FILE} describes a {name} export of format_version "
                        f"{meta.get('format_version', 1)}, whose config.json and model*.safetensors a "
                        f"loader misreads; this dist-prune reads format_version {FORMAT_VERSION}: export it again")
    return fmt


def compressed_names(fmt: ExportFormat, tensors, pruned) -> list[str]:
    """The names, among `tensors` ((name, shape) pairs), that `fmt` stores compressed."""
    pruned = set(pruned)
    return [name for name, shape in tensors if fmt.compresses(name, shape, name in pruned)]


__all__ = ["DENSE", "FORMATS", "FORMAT_VERSION", "HF_LAYOUT", "ExportFormat", "Layout", "compressed_names",
           "format_of", "stored_nonzero"]
