"""Stream a pruned model into an export directory, one tensor at a time, each shard written once.

Rank 0 gathers one full tensor at a time and hands it to `StreamingExport.write`. The export
format (io/formats/) declares the stored tensors of each dense tensor from its shape, dtype and
exact non-zero count, counted on every rank's ZeRO-3 slice and all-reduced before the export
(worker.export_model); so every shard's safetensors header is computed up front, each tensor's
stored bytes are appended as they arrive (hashed on the way) and only the current tensor is ever
in memory. Everything is written into a temporary sibling directory renamed into place by `finish`.

Directory layout of the dense format (as `save_pretrained` writes it): config.json,
model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json, extra files
(tokenizer, ...), and sparsity.json (our provenance record: per-tensor zeros, shard sha256; see
`finish`). A format that is not `loadable` names its files otherwise (formats/bitmask.py).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from dist_prune import __version__
from dist_prune.errors import UserError
from dist_prune.io.destination import check_destination, publish
from dist_prune.io.formats import DENSE, FORMAT_VERSION, HF_LAYOUT, ExportFormat, compressed_names
from dist_prune.io.model_files import read_side_file
from dist_prune.io.shards import (SPARSITY_FILE, ShardWriter, TensorSpec, count_non_finite, fsync_dir,
                                   plan_shards, write_json)

PRODUCER = f"dist-prune {__version__}"
_RESERVED = {"producer", "format_version", "format", "tensors", "overall_sparsity", "shards", "total_size",
             "dense_shards"}


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
    """Writes an export directory one tensor at a time (see module docstring), in format `fmt`.

    `pruned`: the names of the pruned tensors; `nonzero`: for each tensor `fmt` compresses (io/
    formats.compressed_names), its number of non-zero bit patterns (formats.stored_nonzero), which
    sizes its stored tensors. An existing `final_dir` is accepted if it is empty, or a previous
    dist-prune export and `overwrite` (it is replaced at the final rename, atomically); anything
    else is refused with UserError.
    """

    def __init__(self, final_dir: Path, specs: Sequence[TensorSpec], max_shard_size: int,
                 fmt: ExportFormat = DENSE, pruned: Iterable[str] = (), nonzero: Mapping[str, int] | None = None,
                 overwrite: bool = False):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors export needs a little-endian host")
        self.final_dir = Path(final_dir).absolute()
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("nothing to export: no tensor specs")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in specs")
        self.fmt, self.pruned = fmt, set(pruned)
        self.compressed = set(compressed_names(fmt, [(s.name, s.shape) for s in self.specs], self.pruned))
        missing = sorted(self.compressed - set(nonzero or {}))
        if missing:
            raise ValueError(f"export.format {fmt.name} needs the non-zero count of each tensor it "
                             f"compresses; {len(missing)} missing, the first {missing[0]}")
        self.stored = {s.name: fmt.stored_specs(s, nonzero[s.name]) if s.name in self.compressed else [s]
                       for s in self.specs}
        stored_names = [p.name for parts in self.stored.values() for p in parts]
        if len(set(stored_names)) != len(stored_names):
            raise ValueError(f"export.format {fmt.name}: stored tensor names clash with tensor names")
        self.overwrite = overwrite
        check_destination(self.final_dir, overwrite)
        # Shard i of every format holds the tensors of dense shard i: each decompresses on its own.
        self.shards = plan_shards(self.specs, max_shard_size)
        self.files = fmt.layout.shard_names(len(self.shards))
        self.dense_files = HF_LAYOUT.shard_names(len(self.shards))
        self._order = [(fi, spec) for fi, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._writers: list[ShardWriter] = []  # the open shard's: stored file [, dense sha256 only]
        self.sha256: dict[str, str] = {}
        self.dense_sha256: dict[str, str] = {}
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
        if not self._writers:  # first tensor of this shard: its header goes first
            stored = [p for s in self.shards[fi] for p in self.stored[s.name]]
            self._writers = [ShardWriter(self.tmp_dir / self.files[fi], stored)]
            if not self.fmt.loadable:  # what `dist-prune pull` must give back, checked there
                self._writers.append(ShardWriter(None, self.shards[fi]))
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        try:
            nonzero = int(torch.count_nonzero(t))
        except (RuntimeError, NotImplementedError):  # e.g. float8 on older torch
            nonzero = int(torch.count_nonzero(t.float()))
        self.zeros[name] = spec.numel - nonzero
        _refuse_non_finite(name, t)
        for part in (self.fmt.encode(name, t) if name in self.compressed else {name: t}).values():
            self._writers[0].append(part)
        if len(self._writers) > 1:
            self._writers[1].append(t)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != fi:
            self._close_shard(fi)

    @_disk_full_is_user_error
    def _close_shard(self, fi: int) -> None:
        self.sha256[self.files[fi]] = self._writers[0].close()
        if len(self._writers) > 1:
            self.dense_sha256[self.dense_files[fi]] = self._writers[1].close()
        self._writers = []

    @_disk_full_is_user_error
    def finish(self, config: dict, extra_files: Sequence[Path] | Mapping[str, Path], report: dict) -> Path:
        """Write the config, extra files, index, sparsity.json (and the format's notice); fsync;
        rename into place. `extra_files`: paths, or {name in the export: path}; each is read
        without following a link and checked by its format (io/model_files.read_side_file).

        The config gets a top-level "sparsity_config" block: dist-prune's summary of the pruning,
        shaped as compressed-tensors' SparsityCompressionConfig but read by no loader (compressed-
        tensors reads one only under "quantization_config"; transformers keeps unknown keys as
        config attributes), so it is harmless metadata for whoever reads config.json; sparsity.json
        is the record dist-prune itself reads. Its "targets" and "ignore" hold *module* names
        (tensor name minus the last component, e.g. "model.layers.0.mlp.up_proj"): targets =
        modules with at least one pruned tensor, ignore = every other module. Its "format" is
        "dense": the config is that of the dense model, the one `dist-prune pull` gives back from a
        compressed format too.
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
        if self.compressed and pruned != self.pruned:  # the stored layout was chosen by self.pruned
            raise ValueError("report's pruned_tensors differ from the pruned tensors the export was planned with")

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
        cfg["sparsity_config"] = {"format": DENSE.name, "global_sparsity": overall,
                                  "sparsity_structure": report.get("structure", "unstructured"),
                                  "targets": targets, "ignore": ignore,
                                  "registry_requires_subclass": False}
        layout = self.fmt.layout
        write_json(self.tmp_dir / layout.config, cfg, indent=2, sort_keys=True)
        if layout.notice:
            (self.tmp_dir / layout.notice).write_text(self.fmt.notice())

        named = extra_files.items() if isinstance(extra_files, Mapping) else ((Path(p).name, p) for p in extra_files)
        for name, src in named:
            if name in {*self.files, *self.dense_files} | layout.own_files() | HF_LAYOUT.own_files():
                raise UserError(f"extra file {src} would overwrite the export's own {name}")
            with open(self.tmp_dir / name, "wb") as f:
                f.write(read_side_file(Path(src)))
                f.flush()
                os.fsync(f.fileno())

        total_size = sum(s.nbytes for s in self.specs)
        if len(self.files) > 1:
            stored = [(self.files[fi], p) for fi, s in self._order for p in self.stored[s.name]]
            index = {"metadata": {"total_parameters": sum(s.numel for s in self.specs),
                                  "total_size": sum(p.nbytes for _, p in stored)},
                     "weight_map": {p.name: file for file, p in stored}}
            write_json(self.tmp_dir / layout.index, index, indent=2, sort_keys=True)

        record = {"producer": PRODUCER, "format_version": FORMAT_VERSION, "format": self.fmt.name,
                  **{k: v for k, v in report.items() if k != "pruned_tensors"},
                  "tensors": tensors, "overall_sparsity": overall, "total_size": total_size,
                  "shards": dict(self.sha256),
                  **({"dense_shards": dict(self.dense_sha256)} if self.dense_sha256 else {})}
        write_json(self.tmp_dir / SPARSITY_FILE, record, indent=2, default=str)
        fsync_dir(self.tmp_dir)
        self._publish()
        self._done = True
        return self.final_dir

    def _publish(self) -> None:
        publish(self.tmp_dir, self.final_dir, self.overwrite)

    def abort(self) -> None:
        """Remove the temporary directory; nothing appears at final_dir."""
        for writer in self._writers:
            writer.abort()
        self._writers = []
        if not self._done:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True


def _refuse_non_finite(name: str, tensor: torch.Tensor) -> None:
    """A NaN or Inf in what is about to be exported (a diverged fine-tuning, an overflow in a
    narrower export dtype) is refused: nothing broken is published or registered."""
    bad = count_non_finite(tensor)
    if bad:
        raise UserError(f"the exported tensor {name} holds {bad:,} NaN or Inf values (of {tensor.numel():,}): "
                        "nothing is exported or registered; did fine-tuning diverge (finetune.lr)?")
