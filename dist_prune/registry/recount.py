"""The registry trusts no manifest: before anything is created in MLflow, what sparsity.json claims
is counted again on the tensors themselves, in the one streaming pass that also checks the
shards' sha256 (io/verify.py), one dense tensor in memory at a time:

- each tensor's shape, element count and zeros, and the sparsity they make, per tensor and
  overall (a manifest rewritten to claim 50% over dense weights, its sha256 recomputed, fails);
- the structure: every pruned tensor holds its pruned count in the structure's own pattern (n:m:
  n zeros or more in every group of m; blocks: whole zero blocks), by the structure's
  `max_pruned` (dist_prune/structures.py); for whole heads, channels or layers removed, the
  parameters left are the tensors' own;
- every value finite: a NaN or Inf (a diverged fine-tuning, its sha256 recomputed) is no model;
- the shapes against config.json: the model transformers builds from it (on the meta device, no
  memory) has exactly these tensors in exactly these shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dist_prune.errors import UserError
from dist_prune.io.formats import format_of
from dist_prune.io.shards import SPARSITY_FILE, count_non_finite
from dist_prune.io.verify import verify_export
from dist_prune.structures import parse_structure


class Recount:
    """Collects, tensor by tensor, what the claims are checked against (`verify_export`'s inspect);
    `check` then compares. Collecting raises nothing, so that a corrupt shard is named as such."""

    def __init__(self, where: Path):
        self.where = where
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.zeros: dict[str, int] = {}
        self.max_pruned: dict[str, int] = {}
        self.misfits: dict[str, str] = {}  # pruned tensor -> why its shape does not fit the structure
        self.non_finite: dict[str, int] = {}  # tensor -> its NaN and Inf values

    def __call__(self, meta: dict):
        """The callback for the tensors of the export `meta` describes."""
        try:
            self.structure = parse_structure(meta.get("structure", "unstructured"))
        except ValueError as e:
            raise UserError(f"{self.where}: {e}") from None
        tensors = meta.get("tensors")
        self.pruned = {n for n, e in tensors.items() if isinstance(e, dict) and e.get("pruned")}
        return self.count

    def count(self, name: str, tensor: torch.Tensor) -> None:
        self.shapes[name] = tuple(tensor.shape)
        self.zeros[name] = tensor.numel() - int(torch.count_nonzero(tensor))
        if bad := count_non_finite(tensor):
            self.non_finite[name] = bad
        if name in self.pruned and not self.structure.removes_parameters:
            try:
                self.structure.check_shape(tuple(tensor.shape), name)
            except ValueError as e:
                self.misfits[name] = str(e)
                return
            self.max_pruned[name] = self.structure.max_pruned(tensor)

    def check(self, meta: dict) -> None:
        """UserError naming the first claim of sparsity.json the tensors do not bear out."""
        tensors = meta["tensors"]
        if self.non_finite:
            name, bad = next(iter(self.non_finite.items()))
            raise UserError(f"{self.where.parent}: tensor {name} holds {bad:,} NaN or Inf values: "
                            f"a model that cannot be used is not registered")
        if self.misfits:
            name, why = next(iter(self.misfits.items()))
            raise UserError(f"{self.where} lists {name} as pruned {self.structure}, which it cannot be: {why}")
        if set(tensors) != set(self.shapes):
            raise UserError(f"{self.where} lists tensors {sorted(set(tensors) ^ set(self.shapes))[:3]} "
                            f"that the shards do not hold as dense tensors")
        for name, entry in tensors.items():
            if not isinstance(entry, dict):
                raise UserError(f"{self.where}: the entry of tensor {name} is not a mapping")
            shape, zeros = self.shapes[name], self.zeros[name]
            numel = math.prod(shape)
            counted = {"shape": list(shape), "numel": numel, "zeros": zeros}
            claimed = {k: entry.get(k) for k in counted}
            if claimed != counted:
                raise UserError(f"{self.where} claims {claimed} for {name}, the shards hold {counted}")
            if not _same(entry.get("sparsity"), zeros / numel if numel else 0.0):
                raise UserError(f"{self.where} claims sparsity {entry.get('sparsity')} for {name}, "
                                f"which has {zeros} zeros of {numel}")
        overall = _overall(meta, tensors, self.zeros)
        if not _same(meta.get("overall_sparsity"), overall):
            raise UserError(f"{self.where} claims overall_sparsity {meta.get('overall_sparsity')}, "
                            f"the shards hold {overall:.6f}")
        self._check_structure(meta)

    def _check_structure(self, meta: dict) -> None:
        if self.structure.removes_parameters:
            after = (meta.get("structural") or {}).get("parameters_after")
            if after is not None and after != sum(math.prod(s) for s in self.shapes.values()):
                raise UserError(f"{self.where} claims {after} parameters left after removing whole "
                                f"{self.structure}, the shards hold {sum(math.prod(s) for s in self.shapes.values())}")
            return
        counts = meta.get("pruned_counts") or {}
        if not isinstance(counts, dict):
            raise UserError(f"{self.where}: pruned_counts is not a mapping of tensor names to counts")
        for name, count in counts.items():
            if name not in self.pruned:
                raise UserError(f"{self.where} counts pruned elements of {name}, which it does not list as pruned")
            if not isinstance(count, int) or not 0 <= count <= self.max_pruned[name]:
                raise UserError(f"{self.where} claims {count} pruned elements of {name} as {self.structure}, "
                                f"but its zeros allow at most {self.max_pruned[name]} in that pattern")


def _same(claimed, counted: float) -> bool:
    return isinstance(claimed, (int, float)) and math.isclose(claimed, counted, rel_tol=1e-9, abs_tol=1e-12)


def _overall(meta: dict, tensors: dict, zeros: dict[str, int]) -> float:
    """Pruned zeros over pruned elements, as io/export.py computes it: the elements of whole
    groups removed (`removed_elements`, `dropped_tensors`) count as pruned."""
    removed = meta.get("removed_elements") or {}
    dropped = sum((meta.get("dropped_tensors") or {}).values())
    numel = zero = dropped
    for name, entry in tensors.items():
        if entry.get("pruned"):
            numel += entry["numel"] + removed.get(name, 0)
            zero += zeros[name] + removed.get(name, 0)
    return zero / numel if numel else 0.0


def check_config_shapes(directory: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """UserError unless the model transformers builds from the export's config.json has exactly
    the tensors `shapes` (names and shapes); built on the meta device, it costs no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: about 3 s, only to register

    path = Path(directory) / format_of(meta).layout.config
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(config, dict) or "auto_map" in config:
        raise UserError(f"{path} is not a config transformers builds by itself (no auto_map code is run to "
                        f"check the shapes)")
    try:
        model_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} describes no causal LM transformers can build: {str(e).splitlines()[0]}") from None
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if expected != shapes:
        wrong = sorted(n for n in expected.keys() | shapes.keys() if expected.get(n) != shapes.get(n))
        first = wrong[0]
        raise UserError(f"{path} disagrees with the shards in {len(wrong)} tensors, the first {first}: "
                        f"config.json makes {list(expected[first]) if first in expected else 'no such tensor'}, "
                        f"the shards hold {list(shapes[first]) if first in shapes else 'none'}")


def verify_claims(directory: Path) -> dict:
    """`verify_export` with every claim of sparsity.json recounted (module docstring); the manifest."""
    directory = Path(directory)
    where = directory / SPARSITY_FILE
    recount = Recount(where)
    meta = verify_export(directory, inspect=recount)
    recount.check(meta)
    check_config_shapes(directory, meta, recount.shapes)
    return meta
