"""A compressed export back to the dense HF layout (`dist-prune pull` and `--decompress`):
verified first, each dense shard checked against the sha256 recorded when it was exported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dist_prune.errors import UserError
from dist_prune.io.compressed import _dense_name, _dense_tensors, _part, _tensor_order, _write_shard
from dist_prune.io.shards import INDEX_FILE, SAFETENSORS_DTYPES, SPARSITY_FILE, TensorSpec, fsync_dir, write_json
from dist_prune.io.verify import verify_export


def decompress_export(src: Path, dst: Path, meta: dict | None = None) -> Path:
    """Write the dense HF layout of the compressed export `src` into the new directory `dst`:
    the very files a dense export of the same model has (shards, index, config.json,
    sparsity.json), each shard checked against the dense sha256 recorded at export time.
    `meta`: `verify_export(src)`, if the caller has it."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    meta = verify_export(src) if meta is None else meta
    fmt = meta.get("format", "dense")
    if fmt == "dense":
        raise UserError(f"{src} is a dense export: there is nothing to decompress")
    tensors = meta["tensors"]
    dst.mkdir()
    try:
        weight_map = {}
        for file, dense_sha in meta["dense_shards"].items():
            order = _tensor_order(src / file)
            dtypes = {name: SAFETENSORS_DTYPES[entry["dtype"]] for name, entry in order}
            names = list(dict.fromkeys(_dense_name(name, tensors, fmt) for name, _ in order))
            specs = [TensorSpec(n, tuple(tensors[n]["shape"]), dtypes[n if n in dtypes else _part(n, "compressed")])
                     for n in names]
            with safe_open(src / file, framework="pt") as f:
                if _write_shard(dst / file, specs, _dense_tensors(f, names, set(dtypes), fmt)) != dense_sha:
                    raise UserError(f"decompressed shard {file} of {src} does not match the dense "
                                    f"sha256 recorded in {SPARSITY_FILE}")
            weight_map.update({n: file for n in names})

        if len(meta["dense_shards"]) > 1:
            index = {"metadata": {"total_parameters": sum(t["numel"] for t in tensors.values()),
                                  "total_size": meta["total_size"]}, "weight_map": weight_map}
            write_json(dst / INDEX_FILE, index, indent=2, sort_keys=True)
        config = json.loads((src / "config.json").read_text())
        config.pop("quantization_config", None)
        config["sparsity_config"]["format"] = "dense"
        write_json(dst / "config.json", config, indent=2, sort_keys=True)
        # the record a dense export writes: same keys in the same order, dense shards
        record = {**meta, "format": "dense", "shards": meta["dense_shards"]}
        del record["dense_shards"]
        write_json(dst / SPARSITY_FILE, record, indent=2, default=str)
        skip = set(meta["shards"]) | {INDEX_FILE, "config.json", SPARSITY_FILE}
        for extra in sorted(p for p in src.iterdir() if p.is_file() and p.name not in skip):
            shutil.copyfile(extra, dst / extra.name)  # tokenizer files etc., unchanged
            with open(dst / extra.name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return dst
