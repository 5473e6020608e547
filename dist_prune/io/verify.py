"""Stage 7a, verify: an export is checked whole before it is registered, pulled or decompressed.

sparsity.json (written by dist_prune/io/export.py) names every shard with its sha256; a directory is
a verified export when every shard is there, complete (its safetensors header accounts for every
byte), unchanged, and agrees with the index and with the tensors sparsity.json lists.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_prune.errors import UserError
from dist_prune.io.compressed import expected_tensors
from dist_prune.io.shards import INDEX_FILE, SINGLE_FILE, SPARSITY_FILE, read_header, sha256_file


def verify_export(directory: Path) -> dict:
    """Check sparsity.json, every listed shard (exists, complete, sha256) and the index; return
    the parsed sparsity.json. UserError naming the file on any mismatch."""
    directory = Path(directory)
    meta_path = directory / SPARSITY_FILE
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: {directory} is not a dist-prune export")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not str(meta.get("producer", "")).startswith("dist-prune"):
        raise UserError(f"{meta_path} was not written by dist-prune")
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise UserError(f"{meta_path} lists no shards")
    stored: set[str] = set()
    for name, digest in shards.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"shard {path} listed in {SPARSITY_FILE} is missing")
        stored |= set(read_header(path).tensors)
        if sha256_file(path) != digest:
            raise UserError(f"shard {path} is corrupt: sha256 does not match {SPARSITY_FILE}")
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index_path} is unreadable: {e}") from None
        files = set(weight_map.values())
        if files != set(shards):
            raise UserError(f"{index_path} names shards {sorted(files ^ set(shards))} "
                            f"that disagree with {SPARSITY_FILE}")
        if set(weight_map) != stored:
            raise UserError(f"{index_path} weight_map disagrees with the shards' tensors")
    elif set(shards) != {SINGLE_FILE}:
        raise UserError(f"{index_path} is missing but {SPARSITY_FILE} lists {len(shards)} shards")

    if isinstance(meta.get("tensors"), dict) and expected_tensors(meta) != stored:
        raise UserError(f"{meta_path} lists tensors that disagree with the shards' contents")
    return meta
