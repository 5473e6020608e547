"""A compressed export back to the dense HF layout (`dist-prune pull`, `dist-prune decompress`):
verified first, each dense shard written once, tensor by tensor, and checked against the sha256
recorded when it was exported."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from dist_prune.errors import UserError
from dist_prune.io.formats import DENSE, HF_LAYOUT, format_of
from dist_prune.io.shards import SPARSITY_FILE, ShardWriter, fsync_dir, read_header, write_json
from dist_prune.io.verify import compressed_tensors, verify_export


def decompress_export(src: Path, dst: Path, meta: dict | None = None) -> Path:
    """Write the dense HF layout of the compressed export `src` into the new directory `dst`:
    the very files a dense export of the same model has (shards, index, config.json,
    sparsity.json), each shard checked against the dense sha256 recorded at export time.
    `meta`: `verify_export(src)`, if the caller has it."""
    src, dst = Path(src), Path(dst)
    meta = verify_export(src) if meta is None else meta
    fmt = format_of(meta)
    if fmt.loadable:
        raise UserError(f"{src} is a {fmt.name} export: there is nothing to decompress")
    tensors, layout = meta["tensors"], fmt.layout
    compressed = compressed_tensors(fmt, tensors)
    owner = {part: name for name in compressed for part in fmt.stored_names(name)}  # stored -> its dense tensor
    # written beside `dst` and renamed into place: an interrupted run leaves no half a model there
    work = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=False)
    try:
        weight_map = {}
        for file, (dense_file, dense_sha) in zip(meta["shards"], meta["dense_shards"].items()):
            header = read_header(src / file)
            groups: dict[str, list[str]] = {}
            for stored in header.tensors:  # in the order of the data: each tensor's parts together
                groups.setdefault(owner.get(stored, stored), []).append(stored)
            specs = [fmt.dense_spec(n, tensors[n]["shape"], {p: header.spec(p) for p in parts})
                     if n in compressed else header.spec(n) for n, parts in groups.items()]
            writer = ShardWriter(work / dense_file, specs)
            try:
                for n, parts in groups.items():
                    writer.append(fmt.decode(n, {p: header.tensor(p) for p in parts}) if n in compressed
                                  else header.tensor(n))
                digest = writer.close()
            finally:
                writer.abort()
            if digest != dense_sha:
                raise UserError(f"decompressed shard {dense_file} of {src} does not match the dense "
                                f"sha256 recorded in {SPARSITY_FILE}")
            weight_map.update({n: dense_file for n in groups})

        if len(meta["dense_shards"]) > 1:
            index = {"metadata": {"total_parameters": sum(t["numel"] for t in tensors.values()),
                                  "total_size": meta["total_size"]}, "weight_map": weight_map}
            write_json(work / HF_LAYOUT.index, index, indent=2, sort_keys=True)
        _copy(src / layout.config, work / HF_LAYOUT.config)  # the dense model's config.json, as exported
        # the record a dense export writes: same keys in the same order, dense shards
        record = {**meta, "format": DENSE.name, "shards": meta["dense_shards"]}
        del record["dense_shards"]
        write_json(work / SPARSITY_FILE, record, indent=2, default=str)
        skip = set(meta["shards"]) | layout.own_files()
        for extra in sorted(p for p in src.iterdir() if p.is_file() and p.name not in skip):
            _copy(extra, work / extra.name)  # tokenizer files etc., unchanged
        fsync_dir(work)
        os.rename(work, dst)  # refuses an existing non-empty dst
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
