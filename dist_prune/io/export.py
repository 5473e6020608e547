"""Stream a pruned model into an HF-loadable safetensors checkpoint, one tensor at a time.

Rank 0 gathers one full tensor at a time and hands it to `StreamingExport.write`; every shard's
safetensors header is computed up front from the `TensorSpec`s, so each tensor's bytes are appended
as they arrive (hashed and zero-counted on the way) and only the current tensor is ever in memory.
Everything is written into a temporary sibling directory that is renamed into place by `finish`.

Directory layout (as `save_pretrained` writes it): config.json, model.safetensors or
model-0000i-of-0000n.safetensors + model.safetensors.index.json, extra files (tokenizer, ...), and
sparsity.json (our provenance record: per-tensor zeros, shard sha256; see `finish`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Sequence

import torch

from dist_prune import __version__
from dist_prune.errors import UserError
from dist_prune.io.shards import (
    INDEX_FILE, SPARSITY_FILE, TensorSpec, fsync_dir, plan_shards, safetensors_header, shard_names,
    write_json,
)

PRODUCER = f"dist-prune {__version__}"
_RESERVED = {"producer", "format_version", "format", "tensors", "overall_sparsity", "shards", "total_size",
             "dense_shards"}


def _is_dist_prune_export(path: Path) -> bool:
    try:
        meta = json.loads((path / SPARSITY_FILE).read_text())
        return str(meta.get("producer", "")).startswith("dist-prune")
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(final_dir: Path) -> None:
    """Refuse an existing destination that is not empty and not a dist-prune export."""
    if not final_dir.exists():
        return
    if not final_dir.is_dir():
        raise UserError(f"export target {final_dir} exists and is not a directory")
    if any(final_dir.iterdir()) and not _is_dist_prune_export(final_dir):
        raise UserError(f"export target {final_dir} exists and is not a dist-prune export; "
                        "choose another directory or remove it")


def _module_name(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def _disk_full_is_user_error(method):
    """A full disk or an exceeded quota is the user's to fix: the partial export is removed and
    the error is one line naming the export, not a traceback."""

    @functools.wraps(method)
    def wrapper(self: StreamingExport, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.abort()
            raise UserError(f"{os.strerror(e.errno).lower()} while writing the export to {self.final_dir}; "
                            "free some space or choose another export.dir") from None

    return wrapper


class StreamingExport:
    """Writes an HF-loadable checkpoint directory one tensor at a time (see module docstring).

    An existing `final_dir` is accepted if it is empty or a previous dist-prune export (it is
    replaced only at the final rename); anything else is refused with UserError.
    """

    def __init__(self, final_dir: Path, specs: Sequence[TensorSpec], max_shard_size: int):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors export needs a little-endian host")
        self.final_dir = Path(final_dir).absolute()
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("nothing to export: no tensor specs")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in specs")
        check_destination(self.final_dir)
        self.shards = plan_shards(self.specs, max_shard_size)
        self.files = shard_names(len(self.shards))
        self._order = [(fi, spec) for fi, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._fh = None
        self._hash = None
        self.sha256: dict[str, str] = {}
        self.zeros: dict[str, int] = {}
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.final_dir.parent / f".{self.final_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp_dir.mkdir()
        self._done = False

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "StreamingExport":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    # -- writing ------------------------------------------------------------------------------
    @_disk_full_is_user_error
    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._done:
            raise RuntimeError("export already finished or aborted")
        if self._next >= len(self._order):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self._order)} tensors already written")
        fi, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"tensor {name!r} arrived out of order; expected {spec.name!r}")
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"spec says {tuple(spec.shape)} {spec.dtype}")
        if self._fh is None:  # first tensor of this shard: open the file, write the header
            self._fh = open(self.tmp_dir / self.files[fi], "wb")
            self._hash = hashlib.sha256()
            head = safetensors_header(self.shards[fi])
            self._fh.write(head)
            self._hash.update(head)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        try:
            nonzero = int(torch.count_nonzero(t))
        except (RuntimeError, NotImplementedError):  # e.g. float8 on older torch
            nonzero = int(torch.count_nonzero(t.float()))
        self.zeros[name] = spec.numel - nonzero
        if spec.numel:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            self._fh.write(buf)
            self._hash.update(buf)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != fi:
            self._close_shard(fi)

    @_disk_full_is_user_error
    def _close_shard(self, fi: int) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self.sha256[self.files[fi]] = self._hash.hexdigest()

    @_disk_full_is_user_error
    def finish(self, config: dict, extra_files: Sequence[Path], report: dict, fmt: str = "dense") -> Path:
        """Write config.json, extra files, index, sparsity.json; fsync; rename into place.

        config.json gets a top-level "sparsity_config" block (compressed-tensors convention).
        Its "targets" and "ignore" hold *module* names (tensor name minus the last component,
        e.g. "model.layers.0.mlp.up_proj"), which is what compressed-tensors matches against:
        targets = modules with at least one pruned tensor, ignore = every other module.
        `fmt` is export.format: dense, or sparse-bitmask / sparse-24-bitmask (pruned weights stored
        compressed, as compressed-tensors does; `dist-prune pull --decompress` undoes it).
        """
        if self._done:
            raise RuntimeError("export already finished or aborted")
        if self._next != len(self._order):
            missing = [s.name for _, s in self._order[self._next:]]
            raise ValueError(f"export incomplete: {len(missing)} tensors not written, next is {missing[0]!r}")
        clash = _RESERVED & set(report)
        if clash:
            raise ValueError(f"report may not set reserved keys {sorted(clash)}")
        pruned = set(report.get("pruned_tensors", ()))
        unknown = pruned - {s.name for s in self.specs}
        if unknown:
            raise ValueError(f"pruned_tensors names unknown tensors: {sorted(unknown)[:5]}")

        # Structural pruning (dist_prune/structural.py) removes elements and whole tensors: they
        # count as pruned in the overall sparsity, and each shrunk tensor records what it lost.
        removed = report.get("removed_elements", {})
        dropped = sum(report.get("dropped_tensors", {}).values())
        tensors, p_numel, p_zeros = {}, dropped, dropped
        for s in self.specs:
            z, r = self.zeros[s.name], removed.get(s.name, 0)
            tensors[s.name] = {"shape": list(s.shape), "numel": s.numel, "zeros": z,
                               "sparsity": z / s.numel if s.numel else 0.0, "pruned": s.name in pruned,
                               **({"removed": r} if r else {})}
            if s.name in pruned:
                p_numel += s.numel + r
                p_zeros += z + r
        overall = p_zeros / p_numel if p_numel else 0.0

        targets = sorted({_module_name(n) for n in pruned})
        ignore = sorted({_module_name(s.name) for s in self.specs} - set(targets))
        cfg = dict(config)
        cfg["sparsity_config"] = {"format": fmt, "global_sparsity": overall,
                                  "sparsity_structure": report.get("structure", "unstructured"),
                                  "targets": targets, "ignore": ignore,
                                  "registry_requires_subclass": False}
        # fmt sparse-bitmask / sparse-24-bitmask (dist_prune/io/compressed.py): the dense shards just
        # written are replaced by compressed ones; config.json also gets the "quantization_config"
        # compressed-tensors reads, sparsity.json keeps the dense shards' sha256 for decompression.
        total_size = sum(s.nbytes for s in self.specs)
        shards, stored_size = dict(self.sha256), total_size
        weight_map = {s.name: self.files[fi] for fi, s in self._order}
        if fmt != "dense":
            from dist_prune.io.compressed import FORMATS, compress_shards, compressible, compression_config

            if fmt not in FORMATS:
                raise ValueError(f"unknown export format {fmt!r} (allowed: {', '.join(FORMATS)})")
            if "quantization_config" in cfg:
                raise UserError(f"export.format {fmt} cannot be written for a model whose config.json "
                                "already has a quantization_config")
            cfg["quantization_config"] = compression_config(cfg["sparsity_config"])
            names = {n for n, entry in tensors.items() if compressible(n, entry)}
            shards, weight_map, stored_size = compress_shards(self.tmp_dir, self.files, fmt, names)
        write_json(self.tmp_dir / "config.json", cfg, indent=2, sort_keys=True)

        for src in extra_files:
            src = Path(src)
            if not src.is_file():
                raise UserError(f"extra file {src} does not exist or is not a file")
            if src.name in set(self.files) | {"config.json", INDEX_FILE, SPARSITY_FILE}:
                raise UserError(f"extra file {src} would overwrite the export's own {src.name}")
            dst = self.tmp_dir / src.name
            shutil.copyfile(src, dst)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())

        if len(self.files) > 1:
            index = {"metadata": {"total_parameters": sum(s.numel for s in self.specs),
                                  "total_size": stored_size},
                     "weight_map": weight_map}
            write_json(self.tmp_dir / INDEX_FILE, index, indent=2, sort_keys=True)

        record = {"producer": PRODUCER, "format_version": 1, "format": fmt,
                  **{k: v for k, v in report.items() if k != "pruned_tensors"},
                  "tensors": tensors, "overall_sparsity": overall, "total_size": total_size,
                  "shards": shards, **({"dense_shards": dict(self.sha256)} if fmt != "dense" else {})}
        write_json(self.tmp_dir / SPARSITY_FILE, record, indent=2, default=str)
        fsync_dir(self.tmp_dir)
        self._publish()
        self._done = True
        return self.final_dir

    def _publish(self) -> None:
        check_destination(self.final_dir)  # re-check: something may have appeared meanwhile
        old = None
        if self.final_dir.exists():
            old = self.final_dir.parent / f".{self.final_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.final_dir, old)
        try:
            os.rename(self.tmp_dir, self.final_dir)
        except BaseException:
            if old is not None:
                os.rename(old, self.final_dir)
            raise
        fsync_dir(self.final_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary directory; nothing appears at final_dir."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # flushing its buffer onto a full disk: the file goes anyway
                pass
            self._fh = None
        if not self._done:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True


