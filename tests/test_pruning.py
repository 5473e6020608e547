"""The pruning stage: selection layer by layer where no group spans layers (the same elements as
one selection over all targets, with one layer's scores at a time), and masks kept only when asked."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_prune import pruning, structures
from dist_prune.io.checkpoint import open_checkpoint
from dist_prune.config import load_config
from dist_prune.masking import find_targets
from dist_prune.sharding.partition import build_partitioned_model
from dist_prune.pruning import Pruned, by_layer, prune
from dist_prune.report import StageTimer
from dist_prune.methods import METHODS, LocalSlice
from multirank import run_on_ranks

CASES = {  # name -> overrides; every one splits into per-layer selections except global
    "magnitude-layer": ["prune.method=magnitude", "prune.scope=layer", "prune.sparsity=0.5"],
    "magnitude-row": ["prune.method=magnitude", "prune.scope=row", "prune.sparsity=0.4"],
    "magnitude-global": ["prune.method=magnitude", "prune.scope=global", "prune.sparsity=0.6"],
    "wanda-row-onepass": ["prune.method=wanda", "prune.scope=row", "data.calibration.sequential=false"],
    "owl-layer-onepass": ["prune.method=wanda", "prune.scope=layer", "prune.layer_sparsity=owl",
                          "prune.owl_threshold=2", "data.calibration.sequential=false"],
}


def test_by_layer_splits_unless_global():
    targets = [SimpleNamespace(name=n, layer=layer) for n, layer in
               [("a", 0), ("b", 0), ("c", 1), ("head", None), ("d", 1)]]
    assert by_layer(targets, "global") == [targets]
    for scope in ("layer", "row"):
        assert [[t.name for t in call] for call in by_layer(targets, scope)] == [["a", "b"], ["c", "d"], ["head"]]


def test_pruned_keeps_counts_and_masks_only_when_asked():
    masks = {"a": torch.tensor([True, False, True]), "b": torch.tensor([False, False])}
    kept, counted = Pruned(keep_masks=True), Pruned(keep_masks=False)
    for p in (kept, counted):
        p.add(masks)
    assert kept.masks.keys() == {"a", "b"} and counted.masks == {}
    targets = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    assert kept.counts(targets) == counted.counts(targets) == {"a": 2, "b": 0}


def _prune_cases(model_dir: str, calibration: torch.Tensor) -> dict:
    return {name: _prune_both_ways(model_dir, overrides, calibration) for name, overrides in CASES.items()}


def _prune_both_ways(model_dir: str, overrides: list[str], calibration: torch.Tensor) -> dict:
    """Runs on every rank: the default pruning, and one selection over all targets at once."""
    cfg = load_config(None, [f"model.path={model_dir}", *overrides])
    scorer = METHODS[cfg.prune.method]
    sizes: list[int] = []  # elements scored per select_pruned call
    select = structures.select_pruned  # what Unstructured.select calls

    def recording(segments, *args, **kwargs):
        sizes.append(sum(len(s.scores) for s in segments))
        return select(segments, *args, **kwargs)

    results = {}
    for label, split in (("per layer", pruning.by_layer), ("all at once", lambda targets, scope: [targets])):
        model = build_partitioned_model(Path(model_dir), open_checkpoint(Path(model_dir)), torch.float32)
        targets = find_targets(model, cfg.prune.exclude)
        pruning.by_layer, structures.select_pruned, sizes[:] = split, recording, []
        try:
            pruned = prune(model, targets, scorer, cfg, calibration, StageTimer(), show=False)
        finally:
            pruning.by_layer, structures.select_pruned = by_layer, select
        results[label] = {"masks": pruned.masks, "counts": pruned.counts(targets), "largest_call": max(sizes),
                          "local": sum(len(m) for m in pruned.masks.values())}
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_per_layer_selection_prunes_the_same_elements(tiny_llama, world):
    calibration = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    for rank, results in enumerate(run_on_ranks(_prune_cases, world, str(tiny_llama), calibration)):
        for name, result in results.items():
            layered, whole = result["per layer"], result["all at once"]
            assert layered["counts"] == whole["counts"], (name, rank)
            for target, mask in whole["masks"].items():
                assert torch.equal(layered["masks"][target], mask), (name, rank, target)
            if "global" in name:
                assert layered["largest_call"] == whole["largest_call"] == whole["local"]
            else:  # one layer's scores at a time: a 2-layer model's largest layer, not the whole
                assert layered["largest_call"] < whole["largest_call"] == whole["local"], name


def test_global_scope_scores_are_computed_piece_by_piece(monkeypatch):
    """At global scope every target takes part in one selection, at row scope each row on its own:
    scores are read in chunks (recomputed per pass), never held whole, and select exactly what held
    scores select."""
    from dist_prune import selection
    from dist_prune.pruning import LazyScores
    from dist_prune.selection import Segment, prune_counts, select_pruned

    g = torch.Generator().manual_seed(3)
    shapes = [(8, 12), (5, 12), (12, 7)]
    weights = [torch.randn(o * i, generator=g) for o, i in shapes]
    weights[1][::3] = weights[1][1]  # ties across chunks
    stats = [{"input_sq_sum": torch.rand(i, generator=g, dtype=torch.float64),  # per input column
              "token_sq": torch.rand(o * i, generator=g), "steps": 3}  # per element
             for o, i in shapes]
    before = [torch.rand(w.numel(), generator=g) < 0.2 for w in weights]
    pieces = []

    class Recorded:  # Wanda's score times OBD's: both kinds of statistics must follow the piece
        stats, training_stats = METHODS["obd"].stats, ()

        def score(self, local, st):
            pieces.append(local.weight.numel())
            return METHODS["wanda"].score(local, st) * METHODS["obd"].score(local, st)

    numels = [w.numel() for w in weights]
    monkeypatch.setattr(selection, "CHUNK", 16)
    for start in (0, 5):  # a slice that starts mid-row, as on a later rank
        lazy = [Segment(LazyScores(w[start:], start, shape, Recorded(),
                                   {**st, "token_sq": st["token_sq"][start:]}, b[start:]), i, start)
                for i, (w, shape, st, b) in enumerate(zip(weights, shapes, stats, before))]
        held = [Segment(Recorded().score(LocalSlice(w[start:], start, shape),
                                         {**st, "token_sq": st["token_sq"][start:]}).masked_fill(b[start:], -math.inf),
                        i, start) for i, (w, shape, st, b) in enumerate(zip(weights, shapes, stats, before))]
        k = prune_counts(0.5, [sum(numels) - len(weights) * start])  # of the elements these slices hold
        pieces.clear()
        got, want = select_pruned(lazy, numels, k), select_pruned(held, numels, k)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(bool(m[b[start:]].all()) for m, b in zip(got, before))  # pruned before: still pruned
        assert pieces and max(pieces) <= 16
        if start == 0:  # row scope: rows selected on their own, a chunk of rows at a time
            rows = [i for _, i in shapes]
            k = prune_counts(0.5, [i for o, i in shapes for _ in range(o)])
            pieces.clear()
            got = select_pruned(lazy, numels, k, scope="row", row_lengths=rows)
            want = select_pruned(held, numels, k, scope="row", row_lengths=rows)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert pieces and max(pieces) <= 16
