"""Exact distributed k-th-smallest selection (dist_prune.selection).

Every case runs on 1, 2 and 4 gloo ranks (each world size spawned once, all cases inside the
workers) and the union of the ranks' masks must equal a sort-based reference exactly. Each case
runs twice: with the default settings, and with tiny chunks, small histogram batches and no
compaction, so that the multi-chunk, multi-batch and re-scanning paths are exercised too. The
reference orders by the same float32 key (so -0.0 sorts just below +0.0) and is itself checked
against torch.kthvalue.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_prune import selection
from dist_prune.selection import Segment, group_sizes, prune_counts, select_pruned

WORLD_SIZES = (1, 2, 4)
SETTINGS = {
    "default": {},
    # 64-element chunks, 8 tensors (layer) or 2048 rows per batch, candidates re-scanned, not kept.
    "small": {"CHUNK": 64, "HIST_BINS": 1 << 19, "COMPACT_MIN": 0, "COMPACT_SHARE": 1 << 40},
    # The GPU's top-16-bit histogram: counts spread over copies, then summed.
    "lanes": {"HIST_LANES": {"cpu": 4}},
}
SUBGROUP_CASES = ("random-global", "all-layer", "all-row")
FORBIDDEN = ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "gather_object",
             "all_to_all", "all_to_all_single", "broadcast", "scatter", "reduce_scatter")


@dataclass(frozen=True)
class Case:
    name: str
    tensors: tuple[torch.Tensor, ...]
    scope: str
    counts: torch.Tensor
    row_lengths: tuple[int, ...] | None = None

    @property
    def numels(self) -> list[int]:
        return [t.numel() for t in self.tensors]


@contextmanager
def settings(values: dict) -> Iterator[None]:
    old = {name: getattr(selection, name) for name in values}
    for name, value in values.items():
        setattr(selection, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(selection, name, value)


def make_cases() -> list[Case]:
    """The same cases in every process (fixed seeds)."""
    g = torch.Generator().manual_seed(1234)
    uneven = (1000, 37, 513, 3, 1, 5)  # numel % W != 0; 3, 1 and 5 leave late ranks short or empty
    row_shapes = ((35, 7), (12, 10), (9, 4), (1, 6))  # (rows, row length): rows straddle rank slices

    def tensors(make, sizes=uneven):
        return tuple(make(n) for n in sizes)

    def row_tensors(make):
        return tensors(make, [r * n for r, n in row_shapes]), tuple(n for _, n in row_shapes)

    def randn(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g)

    def small_ints(n: int) -> torch.Tensor:
        return torch.randint(0, 4, (n,), generator=g).float()

    def pick(values: list[float], n: int) -> torch.Tensor:
        return torch.tensor(values)[torch.randint(0, len(values), (n,), generator=g)]

    generators = {
        "random": randn,
        "tied": small_ints,
        "bf16": lambda n: randn(n).bfloat16(),
        "fp16": lambda n: (randn(n) * 3).half(),
        "equal": lambda n: torch.full((n,), 0.25),
        "negative": lambda n: -torch.rand(n, generator=g) - 1,
        "mixed": lambda n: randn(n) * 1e3,
        "zeros": lambda n: pick([-0.0, 0.0, 1e-45, -1e-45, -1.0, 1.0], n),  # signed zeros, denormals
        "inf": lambda n: pick([math.inf, -math.inf, -math.inf, -math.inf, 0.5, -2.0, 1e38], n),
    }
    # Global: one case per kind of data. Layer and row: every kind side by side in one call (their
    # groups are independent), with k = 0, k = n and k = sparsity * n in turn.
    cases, layer, rows, row_lengths = [], [], [], []
    for label, make in generators.items():
        ts = tensors(make)
        cases.append(Case(f"{label}-global", ts, "global", prune_counts(0.5, [sum(map(len, ts))])))
        layer += tensors(make)
        ts, lengths = row_tensors(make)
        rows += ts
        row_lengths += lengths
    for scope, ts, lengths, sparsity in (("layer", layer, None, 0.3), ("row", rows, row_lengths, 0.6)):
        sizes = group_sizes([t.numel() for t in ts], scope, lengths)
        counts = torch.tensor([(int(prune_counts(sparsity, [n])), 0, n)[i % 3] for i, n in enumerate(sizes)])
        cases.append(Case(f"all-{scope}", tuple(ts), scope, counts, lengths and tuple(lengths)))
    ts = tensors(small_ints)
    for sparsity in (0.0, 1.0):  # k = 0 and k = n
        cases.append(Case(f"k{sparsity}-global", ts, "global", prune_counts(sparsity, [sum(map(len, ts))])))
    big = tensors(randn, (20_011, 7_777))
    cases.append(Case("big-global", big, "global", prune_counts(0.7, [sum(map(len, big))])))
    return cases


def slices(tensors: tuple[torch.Tensor, ...], rank: int, world: int) -> list[Segment]:
    """ZeRO-3 partitioning: rank r owns [r*ps, min((r+1)*ps, numel)), ps = ceil(numel / W)."""
    segments = []
    for index, t in enumerate(tensors):
        ps = math.ceil(t.numel() / world)
        lo, hi = min(rank * ps, t.numel()), min((rank + 1) * ps, t.numel())
        segments.append(Segment(t[lo:hi].clone(), index, lo))
    return segments


def reference(case: Case) -> list[torch.Tensor]:
    """Stable sort of every group by (score key, order index); the first counts[g] are pruned."""
    keys, orders, gids = [], [], []
    offset, first_row = 0, 0
    for index, t in enumerate(case.tensors):
        bits = t.float().numpy().view(np.int32).astype(np.int64)
        keys.append(np.where(bits >= 0, bits + 2**31, -1 - bits))  # -0.0 sorts below +0.0
        flat = np.arange(t.numel())
        if case.scope == "global":
            orders.append(offset + flat)
            gids.append(np.zeros_like(flat))
        elif case.scope == "layer":
            orders.append(flat)
            gids.append(np.full_like(flat, index))
        else:
            orders.append(flat)
            gids.append(first_row + flat // case.row_lengths[index])
            first_row += t.numel() // case.row_lengths[index]
        offset += t.numel()
    key, order, gid = (np.concatenate(a) for a in (keys, orders, gids))
    perm = np.lexsort((order, key, gid))
    group_start = np.searchsorted(gid[perm], np.arange(len(case.counts)))
    rank_in_group = np.arange(len(perm)) - group_start[gid[perm]]
    pruned = np.zeros(len(key), dtype=bool)
    pruned[perm] = rank_in_group < case.counts.numpy()[gid[perm]]
    return list(torch.from_numpy(pruned).split(case.numels))


def run_case(case: Case, rank: int, world: int) -> list[torch.Tensor] | str:
    try:
        return select_pruned(slices(case.tensors, rank, world), case.numels, case.counts,
                             scope=case.scope, row_lengths=case.row_lengths)
    except ValueError as error:
        return f"ValueError: {error}"


def nan_case(rank: int, world: int) -> str | None:
    """NaN on the last rank only: every rank must raise (none may hang in a collective)."""
    scores = torch.ones(4)
    if rank == world - 1:
        scores[2] = float("nan")
    try:
        select_pruned([Segment(scores, 0, 4 * rank)], [4 * world], prune_counts(0.5, [4 * world]))
    except ValueError as error:
        return str(error)
    return None


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for name in FORBIDDEN:
        def forbidden(*_, _name=name, **__):
            raise AssertionError(f"selection must not call torch.distributed.{_name}")
        setattr(dist, name, forbidden)
    reduced: list[tuple[torch.dtype, int]] = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        reduced.append((tensor.dtype, tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    results = {}
    for label, values in SETTINGS.items():
        with settings(values):
            for case in make_cases():
                results[label, case.name] = run_case(case, rank, world)
    nan = nan_case(rank, world)
    # The `group` argument: the first half of the ranks selects on its own, the rest stays out.
    half = world // 2
    subgroup = dist.new_group(list(range(half))) if half else None
    if rank < half:
        results["half"] = [select_pruned(slices(c.tensors, rank, half), c.numels, c.counts, scope=c.scope,
                                         row_lengths=c.row_lengths, group=subgroup)
                           for c in make_cases() if c.name in SUBGROUP_CASES]
    torch.save({"results": results, "nan": nan, "reduced": reduced}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return make_cases()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def ranks(request) -> tuple[int, list[dict]]:
    """Spawn one gloo world of the given size; every rank runs every case."""
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, str(Path(tmp) / "init"), tmp), nprocs=world,
                           join=True, start_method="spawn")
        return world, [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def union(per_rank: list[list[torch.Tensor]], case: Case, world: int) -> list[torch.Tensor]:
    """Concatenate the ranks' masks of each tensor in rank order (the ZeRO-3 layout)."""
    for r, masks in enumerate(per_rank):
        for seg, mask in zip(slices(case.tensors, r, world), masks):
            assert mask.dtype == torch.bool and mask.shape == seg.scores.shape
    return [torch.cat([masks[t] for masks in per_rank]) for t in range(len(case.tensors))]


@pytest.mark.parametrize("label", SETTINGS)
def test_distributed_matches_reference(ranks, cases, label):
    world, outputs = ranks
    for case in cases:
        per_rank = [out["results"][label, case.name] for out in outputs]
        assert not any(isinstance(p, str) for p in per_rank), (case.name, per_rank)
        got = union(per_rank, case, world)
        for t, (a, b) in enumerate(zip(got, reference(case))):
            differ = int((a ^ b).sum())
            assert not differ, f"{case.name} ({label}, W={world}), tensor {t}: {differ} masks differ"


def test_process_subgroup(ranks, cases):
    world, outputs = ranks
    if world == 1:
        pytest.skip("no rank to leave out of a subgroup")
    half = world // 2
    for i, case in enumerate(c for c in cases if c.name in SUBGROUP_CASES):
        got = union([out["results"]["half"][i] for out in outputs[:half]], case, half)
        assert all(torch.equal(a, b) for a, b in zip(got, reference(case))), case.name


def test_distributed_only_all_reduces_small_int_histograms(ranks, cases):
    world, outputs = ranks
    most_bins = 256 * max(len(case.counts) for case in cases)  # one [groups, 256] histogram
    row_groups = {len(case.counts) for case in cases if case.scope == "row"}  # a whole-row flag per row
    for out in outputs:
        # one rank has nothing to agree with: collectives.all_reduce_ skips the call
        assert bool(out["reduced"]) == (world > 1), "every selection agrees through all_reduce"
        for dtype, numel in out["reduced"]:
            assert dtype == torch.int64 and (numel == 1 or numel % 256 == 0 or numel in row_groups)
            assert numel <= most_bins


def test_nan_raises_on_every_rank(ranks):
    world, outputs = ranks
    for out in outputs:
        assert out["nan"] is not None and "NaN" in out["nan"]


def test_pruned_count_and_kthvalue(cases):
    """The reference itself: exactly k per group, and the k-th value is the largest one pruned."""
    for case in cases:
        pruned = torch.cat(reference(case))
        scores = torch.cat([t.float() for t in case.tensors])
        sizes = group_sizes(case.numels, case.scope, case.row_lengths)
        for g, (lo, n) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes)):
            values, mask = scores[lo : lo + n], pruned[lo : lo + n]
            k = int(case.counts[g])
            assert int(mask.sum()) == k, case.name
            if k:
                assert torch.kthvalue(values, k).values == values[mask].max(), case.name


@pytest.mark.parametrize("label", SETTINGS)
def test_without_process_group(cases, label):
    assert not dist.is_initialized()
    with settings(SETTINGS[label]):
        for case in cases:
            got = select_pruned([Segment(t, i, 0) for i, t in enumerate(case.tensors)], case.numels,
                                case.counts, scope=case.scope, row_lengths=case.row_lengths)
            assert all(torch.equal(a, b) for a, b in zip(got, reference(case))), case.name


def test_large_single_process_against_kthvalue():
    x = torch.randn(3_000_017, generator=torch.Generator().manual_seed(7)).abs()
    k = int(prune_counts(0.5, [x.numel()]))
    [mask] = select_pruned([Segment(x, 0, 0)], [x.numel()], torch.tensor([k]))
    assert int(mask.sum()) == k
    assert x[mask].max() == torch.kthvalue(x, k).values
    assert x[mask].max() <= x[~mask].min()


def test_nan_raises_without_process_group():
    x = torch.rand(100)
    x[17] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_pruned([Segment(x, 0, 0)], [100], torch.tensor([50]))


def test_group_sizes_and_counts():
    assert group_sizes([6, 4], "global") == [10]
    assert group_sizes([6, 4], "layer") == [6, 4]
    assert group_sizes([6, 4], "row", [3, 2]) == [3, 3, 2, 2]
    assert prune_counts(0.5, [10, 3, 1, 0]).tolist() == [5, 2, 1, 0]
    assert prune_counts(0.25, [2]).tolist() == [1]  # floor(0.5 + 0.5): halves round up
    assert prune_counts(0.5, [3]).dtype == torch.int64
    with pytest.raises(ValueError):
        group_sizes([6], "row", [4])  # rows must tile the tensor
    with pytest.raises(ValueError):
        group_sizes([6], "block")
    with pytest.raises(ValueError):
        prune_counts(1.5, [3])


def test_rejects_bad_input():
    x = torch.rand(10)
    with pytest.raises(ValueError, match="counts"):
        select_pruned([Segment(x, 0, 0)], [10], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="between"):
        select_pruned([Segment(x, 0, 0)], [10], torch.tensor([11]))
    with pytest.raises(ValueError, match="exceeds"):
        select_pruned([Segment(x, 0, 5)], [10], torch.tensor([1]))
    with pytest.raises(ValueError, match="1-D"):
        select_pruned([Segment(x.double(), 0, 0)], [10], torch.tensor([1]))
