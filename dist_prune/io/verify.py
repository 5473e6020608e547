"""Stage 7a, verify: an export is checked whole before it is registered, pulled or decompressed.

sparsity.json (written by dist_prune/io/export.py) names every shard with its sha256; a directory is
a verified export when every file in it is a plain file of its own (no link, nothing named out of
it), every shard is there, complete (its safetensors header accounts for every byte), unchanged,
and agrees with the index, with the tensors sparsity.json lists (stored as its export format says,
io/formats/) and with the file names of that format's layout.

The registry also recounts what sparsity.json claims (dist_prune/registry/recount.py): given
`inspect`, the pass that hashes a shard hands every dense tensor to `inspect(manifest)` as it is
read, so the shards are read once, one tensor in memory at a time, as the export wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from dist_prune.errors import UserError
from dist_prune.io.model_files import check_contained
from dist_prune.io.formats import HF_LAYOUT, ExportFormat, compressed_names, format_of
from dist_prune.io.shards import SPARSITY_FILE, SAFETENSORS_DTYPES, ShardHeader, read_header, read_index, sha256_file

Inspect = Callable[[str, torch.Tensor], None]  # (dense tensor name, the whole tensor)


def verify_export(directory: Path, inspect: Callable[[dict], Inspect] | None = None) -> dict:
    """Check sparsity.json, every listed shard (exists, complete, sha256), the index and the
    config; return the parsed sparsity.json. UserError naming the file on any mismatch.
    `inspect(manifest)`: a callback given every dense tensor, in the pass that hashes its shard."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        raise UserError(f"{directory} is not a directory (a dist-prune export is one)")
    check_contained(directory, "export")  # its files are registered, uploaded, pulled: none from elsewhere
    meta_path = directory / SPARSITY_FILE
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: {directory} is not a dist-prune export")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not str(meta.get("producer", "")).startswith("dist-prune"):
        raise UserError(f"{meta_path} was not written by dist-prune")
    fmt = format_of(meta)
    layout = fmt.layout
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise UserError(f"{meta_path} lists no shards")
    if not fmt.loadable:  # shard i decompresses to dense shard i, checked against this sha256
        dense = meta.get("dense_shards")
        if (list(shards) != layout.shard_names(len(shards)) or not isinstance(dense, dict)
                or list(dense) != HF_LAYOUT.shard_names(len(shards))):
            raise UserError(f"{meta_path} of a {fmt.name} export must list shards "
                            f"{layout.shard_names(len(shards))[0]}, ... with the dense sha256 of each")
    owner, visit = None, None  # stored tensor -> the dense tensor it is part of; the callback
    if inspect is not None:
        if not isinstance(meta.get("tensors"), dict):
            raise UserError(f"{meta_path} lists no tensors: nothing it claims can be checked")
        owner = {part: name for name in compressed_tensors(fmt, meta["tensors"]) for part in fmt.stored_names(name)}
        visit = inspect(meta)
    stored: set[str] = set()
    for name, digest in shards.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UserError(f"{meta_path} lists shard {name!r}: shard names are file names in {directory}")
        path = directory / name
        if not path.is_file():
            raise UserError(f"shard {path} listed in {SPARSITY_FILE} is missing")
        header = read_header(path)
        stored |= set(header.tensors)
        actual = sha256_file(path) if visit is None else _hash_and_inspect(header, fmt, owner, visit)
        if actual != digest:
            raise UserError(f"shard {path} is corrupt: sha256 does not match {SPARSITY_FILE}")
    index_path = directory / layout.index
    if index_path.exists():
        weight_map = read_index(index_path)
        files = set(weight_map.values())
        if files != set(shards):
            raise UserError(f"{index_path} names shards {sorted(files ^ set(shards))} "
                            f"that disagree with {SPARSITY_FILE}")
        if set(weight_map) != stored:
            raise UserError(f"{index_path} weight_map disagrees with the shards' tensors")
    elif set(shards) != set(layout.shard_names(1)):
        raise UserError(f"{index_path} is missing but {SPARSITY_FILE} lists {len(shards)} shards")
    if not (directory / layout.config).is_file():
        raise UserError(f"{directory / layout.config} of the {fmt.name} export {directory} is missing")

    if isinstance(meta.get("tensors"), dict) and stored_tensors(fmt, meta["tensors"]) != stored:
        raise UserError(f"{meta_path} lists tensors that disagree with the shards' contents")
    return meta


def compressed_tensors(fmt: ExportFormat, tensors: dict) -> set[str]:
    """The tensors of sparsity.json's "tensors" that `fmt` stores compressed."""
    try:
        return set(compressed_names(fmt, [(n, e["shape"]) for n, e in tensors.items()],
                                    [n for n, e in tensors.items() if e.get("pruned")]))
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{SPARSITY_FILE}: a tensor entry lacks its shape") from None


def stored_tensors(fmt: ExportFormat, tensors: dict) -> set[str]:
    """The names the shards of an export in `fmt` hold, from sparsity.json's "tensors"."""
    compressed = compressed_tensors(fmt, tensors)
    return {part for name in tensors for part in (fmt.stored_names(name) if name in compressed else [name])}


def _hash_and_inspect(header: ShardHeader, fmt: ExportFormat, owner: dict[str, str], inspect: Inspect) -> str:
    """The shard's sha256, read once in the order of its data; `inspect` gets each dense tensor
    (a compressed one decoded from its parts, which the export writes one after the other)."""
    digest = hashlib.sha256()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with open(header.path, "rb") as f:
        digest.update(_read(f, header.data_start))
        for name, entry in header.tensors.items():
            begin, end = entry["data_offsets"]
            data = _read(f, end - begin)
            digest.update(data)
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            tensor = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).view(entry["shape"])
            dense = owner.get(name)
            if dense is None:
                inspect(name, tensor)
                continue
            parts.setdefault(dense, {})[name] = tensor
            if len(parts[dense]) == len(fmt.stored_names(dense)):
                inspect(dense, fmt.decode(dense, parts.pop(dense)))
    return digest.hexdigest()


def _read(f, nbytes: int) -> bytearray:
    """Exactly `nbytes` of `f` (read_header has checked the file holds them)."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    while view:  # one read returns at most about 2 GiB
        got = f.readinto(view)
        if not got:
            raise UserError(f"{f.name} is truncated")
        view = view[got:]
    return buffer
