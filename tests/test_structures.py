"""Structures (dist_prune.structures): N:M masks and block pooling / selection across ZeRO-3 slices.

Each world size (2, 3, 4 gloo ranks) is spawned once and runs every case; world size 1 runs in
this process without a process group. The union of the ranks' local masks must equal a
single-process reference exactly, including groups that straddle rank slices.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_prune.selection import prune_counts
from dist_prune.structures import (NM, Block, Unstructured, block_mask, block_scores, block_segment,
                                   check_shape, nm_mask, parse_structure, select_blocks)
from multirank import run_on_ranks

WORLDS = (2, 3, 4)
FORBIDDEN = ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "broadcast",
             "scatter", "reduce_scatter", "all_to_all", "all_to_all_single")
# (shape, n, m): numel % W != 0 for some W, groups straddling slices, slices shorter than a group
# ([1, 16] on 4 ranks: one group over 4 ranks; [1, 5] on 4 ranks: one empty rank).
NM_SHAPES = (((6, 12), 2, 4), ((5, 16), 4, 8), ((3, 24), 4, 8), ((5, 12), 1, 3), ((7, 6), 3, 6),
             ((1, 16), 5, 16), ((1, 5), 2, 5), ((3, 8), 1, 2))
BLOCK_SHAPES = (((8, 12), 4, 4), ((6, 12), 2, 3), ((9, 10), 3, 5), ((5, 7), 1, 1))
SELECT_BLOCK = Block(2, 3)
SELECT_SHAPES = ((6, 12), (4, 9), (2, 3), (8, 6))  # 12, 6, 1 and 8 blocks; some straddle slices
SELECTIONS = [(scope, pool, s) for scope in ("global", "layer") for pool in ("sum", "l2") for s in (0.5, 0.3)]


def _scores(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(shape, generator=g)
    if kind == "tied":
        return torch.randint(0, 3, shape, generator=g).float()
    if kind == "constant":
        return torch.zeros(shape)
    return torch.randint(-2, 2, shape, generator=g).to(torch.bfloat16)  # "bf16"


def nm_cases() -> list[tuple[torch.Tensor, NM]]:
    g = torch.Generator().manual_seed(7)
    return [(_scores(kind, shape, g), NM(n, m)) for shape, n, m in NM_SHAPES
            for kind in ("random", "tied", "constant", "bf16")]


def block_cases() -> list[tuple[torch.Tensor, Block]]:
    g = torch.Generator().manual_seed(11)
    return [(_scores(kind, shape, g), Block(r, c)) for kind in ("random", "tied") for shape, r, c in BLOCK_SHAPES]


def select_cases() -> list[list[torch.Tensor]]:
    """Tensors of one selection: random, and heavily tied (ties within and across tensors)."""
    g = torch.Generator().manual_seed(13)
    return [[_scores(kind, shape, g) for shape in SELECT_SHAPES] for kind in ("random", "tied")]


def local(full: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """ZeRO-3 slice of a full tensor: (local scores, start)."""
    flat = full.reshape(-1)
    ps = -(-flat.numel() // world)
    lo = min(rank * ps, flat.numel())
    return flat[lo : lo + ps], lo


def nm_reference(full: torch.Tensor, nm: NM) -> torch.Tensor:
    out_f, in_f = full.shape
    groups = full.float().reshape(out_f, in_f // nm.m, nm.m)
    order = torch.argsort(groups, dim=2, stable=True)[..., : nm.n]
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(2, order, True).reshape(-1)


def pool_reference(full: torch.Tensor, block: Block, pool: str) -> torch.Tensor:
    out_f, in_f = full.shape
    x = full.double().reshape(out_f // block.rows, block.rows, in_f // block.cols, block.cols)
    return (x.sum((1, 3)) if pool == "sum" else (x * x).sum((1, 3)).sqrt()).reshape(-1).float()


def run_all(rank: int, world: int) -> dict:
    """Every case on this rank (world 1: no process group)."""
    calls = {"all_reduce": 0}
    if world > 1:
        for name in FORBIDDEN:
            def forbidden(*_, _name=name, **__):
                raise AssertionError(f"structures must not call dist.{_name}")
            setattr(dist, name, forbidden)
        all_reduce = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls["all_reduce"] += 1
            return all_reduce(tensor, *args, **kwargs)
        dist.all_reduce = counting
    out: dict = {"nm": [], "nm_reduces": [], "pooled": [], "select": []}
    for full, nm in nm_cases():
        before = calls["all_reduce"]
        scores, start = local(full, rank, world)
        out["nm"].append(nm_mask(scores, start, tuple(full.shape), nm))
        out["nm_reduces"].append(calls["all_reduce"] - before)
    for full, block in block_cases():
        scores, start = local(full, rank, world)
        out["pooled"].append([block_scores(scores, start, tuple(full.shape), block, pool=p) for p in ("sum", "l2")])
    for scope, pool, sparsity in SELECTIONS:
        for fulls in select_cases():
            tensors = [(*local(full, rank, world), tuple(full.shape)) for full in fulls]
            out["select"].append(select_blocks(tensors, SELECT_BLOCK, sparsity, scope, pool))
    return out


def _spawned(world: int) -> dict:
    return run_all(dist.get_rank(), world)


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict]]:
    """Per world size, every rank's results."""
    runs = {1: [run_all(0, 1)]}
    for world in WORLDS:
        runs[world] = run_on_ranks(_spawned, world, world, deepspeed_comm=False)
    return runs


def union(per_rank: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(per_rank)


def test_nm_union_matches_reference(results):
    for world, ranks in results.items():
        for i, (full, nm) in enumerate(nm_cases()):
            got = union([r["nm"][i] for r in ranks])
            ref = nm_reference(full, nm)
            assert torch.equal(got, ref), f"W={world} case {i} shape {tuple(full.shape)} {nm}"
            per_group = got.reshape(-1, nm.m).sum(1)
            assert bool((per_group == nm.n).all()), f"W={world} case {i}: not exactly n per group"
            if world > 1:
                assert all(r["nm_reduces"][i] == 1 for r in ranks), "one all_reduce per tensor"


def test_block_scores_identical_and_match_reference(results):
    for world, ranks in results.items():
        for i, (full, block) in enumerate(block_cases()):
            for j, pool in enumerate(("sum", "l2")):
                first = ranks[0]["pooled"][i][j]
                assert all(torch.equal(r["pooled"][i][j], first) for r in ranks), f"W={world} differs by rank"
                torch.testing.assert_close(first, pool_reference(full, block, pool), rtol=1e-6, atol=1e-6)
                assert torch.equal(first, results[1][0]["pooled"][i][j]), f"W={world} {pool} vs W=1"


def expected_blocks(fulls: list[torch.Tensor], scope: str, pool: str, sparsity: float) -> list[torch.Tensor]:
    """Reference block decisions: the k lowest pooled scores, ties by (tensor, block) order."""
    pooled = [pool_reference(f, SELECT_BLOCK, pool) for f in fulls]
    groups = [torch.cat(pooled)] if scope == "global" else pooled
    decided = []
    for p in groups:
        want = torch.zeros(p.numel(), dtype=torch.bool)
        want[torch.argsort(p, stable=True)[: int(prune_counts(sparsity, [p.numel()])[0])]] = True
        decided.append(want)
    return list(torch.cat(decided).split([p.numel() for p in pooled]))


def test_select_blocks_whole_blocks_exact_count_same_for_every_world(results):
    r, c = SELECT_BLOCK.rows, SELECT_BLOCK.cols
    k = 0
    for scope, pool, sparsity in SELECTIONS:
        for kind, fulls in zip(("random", "tied"), select_cases()):
            want = expected_blocks(fulls, scope, pool, sparsity)
            for world, ranks in results.items():
                for t, full in enumerate(fulls):
                    mask = union([rk["select"][k][t] for rk in ranks])
                    per_block = mask.reshape(full.shape[0] // r, r, full.shape[1] // c, c).sum((1, 3)).reshape(-1)
                    label = f"W={world} {scope} {pool} s={sparsity} {kind} tensor {t}"
                    assert bool(((per_block == 0) | (per_block == r * c)).all()), f"{label}: partial block"
                    assert torch.equal(per_block > 0, want[t]), label
                    assert torch.equal(mask, results[1][0]["select"][k][t]), f"{label}: differs from W=1"
            n_blocks = [w.numel() for w in want]
            pruned = [int(w.sum()) for w in want]
            if scope == "global":
                assert sum(pruned) == int(prune_counts(sparsity, [sum(n_blocks)])[0])
            else:
                assert pruned == prune_counts(sparsity, n_blocks).tolist()
            k += 1


def test_block_segment_shares_blocks_once():
    scores = torch.arange(10.0)
    for world in (1, 3, 4, 12):
        parts = [block_segment(scores, r, world) for r in range(world)]
        assert torch.equal(torch.cat([p for p, _ in parts]), scores)
        assert [s for _, s in parts] == sorted(s for _, s in parts)
        assert all(s + p.numel() <= 10 for p, s in parts)


def test_block_mask_expands_decisions():
    shape, block = (4, 6), Block(2, 3)
    decide = torch.tensor([True, False, False, True])
    want = decide.reshape(2, 1, 2, 1).expand(2, 2, 2, 3).reshape(-1)
    for world in (1, 3, 5):
        got = torch.cat([block_mask(*local(torch.zeros(shape), r, world), shape, block, decide)
                         for r in range(world)])
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="4 block decisions"):
        block_mask(torch.zeros(24), 0, shape, block, torch.zeros(3, dtype=torch.bool))


def test_parse_structure():
    assert parse_structure("unstructured") == Unstructured()
    assert parse_structure(" 2:4 ") == NM(2, 4)
    assert parse_structure("Block:4x8") == Block(4, 8)
    assert str(NM(4, 8)) == "4:8" and str(Block(2, 3)) == "block:2x3"
    for bad in ("0:4", "4:4", "5:4"):
        with pytest.raises(ValueError, match="0 < N < M"):
            parse_structure(bad)
    for bad in ("block:0x4", "block:4x0"):
        with pytest.raises(ValueError, match=">= 1"):
            parse_structure(bad)
    assert str(parse_structure("heads")) == "heads"
    for bad in ("head", "2-4", "block:4", ""):
        with pytest.raises(ValueError, match="unstructured.*N:M.*block:RxC.*heads.*channels.*layers") as err:
            parse_structure(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        NM(0, 4)
    with pytest.raises(ValueError):
        Block(1, 0)


def test_check_shape():
    check_shape(Unstructured(), (3, 5), "w")
    check_shape(NM(2, 4), (3, 8), "w")
    check_shape(Block(2, 4), (6, 8), "w")
    with pytest.raises(ValueError, match=r"layers.0.q_proj.*m=4.*\[3, 6\]"):
        check_shape(NM(2, 4), (3, 6), "layers.0.q_proj")
    with pytest.raises(ValueError, match=r"down.*\[5, 8\]"):
        check_shape(Block(2, 4), (5, 8), "down")
    with pytest.raises(ValueError, match=r"up.*\[6, 6\]"):
        check_shape(Block(2, 4), (6, 6), "up")


def test_bad_calls_without_process_group():
    with pytest.raises(ValueError, match="do not tile"):  # a partial group nobody else completes
        nm_mask(torch.zeros(6), 2, (2, 4), NM(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(torch.tensor([1.0, float("nan"), 0.0, 2.0]), 0, (1, 4), NM(2, 4))
    with pytest.raises(ValueError, match="exceeds"):
        nm_mask(torch.zeros(6), 4, (2, 4), NM(2, 4))
    with pytest.raises(ValueError, match="pool"):
        block_scores(torch.zeros(4), 0, (2, 2), Block(1, 1), pool="max")
    with pytest.raises(ValueError, match="scope"):
        select_blocks([(torch.zeros(4), 0, (2, 2))], Block(1, 1), 0.5, "row", "sum")
