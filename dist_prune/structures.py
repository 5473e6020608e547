"""Structures: element scores -> group scores and group decisions -> element masks.

Weights are split like ZeRO-3 parameters: rank r holds flat elements [start, start + len(scores))
of a row-major [out, in] tensor, and its scores cover only those. Groups may straddle the boundary
between two (or, for slices shorter than a group, more) ranks. Ranks agree only through
`all_reduce` of small buffers; a tensor's scores are never gathered.

- `NM` (n:m): within every m consecutive inputs of a row the n lowest scores are pruned, ties by
  column. No threshold: full groups are decided locally; each rank puts its leading and trailing
  partial group into one all_reduce, after which every holder of a straddling group sees the
  whole group and decides it exactly as a single process would.
- `Block` (block:RxC): element scores are pooled per block (sum, or L2 norm); whole blocks are
  selected by `selection.select_pruned` over a ZeRO-style share of the block scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import torch

from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.selection import CHUNK, Segment, group_sizes, prune_counts, select_pruned
from dist_prune.structural import UNITS, Structural

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

POOLS = ("sum", "l2")
BLOCK_SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Unstructured:
    """Any weight may be pruned."""

    kind = "unstructured"
    removes_parameters = False
    scores_in_pieces = True  # selection may read the scores a piece at a time (pruning.LazyScores)

    def __str__(self) -> str:
        return "unstructured"

    def check_shape(self, shape: tuple[int, int], name: str) -> None:
        _check_2d(self, shape, name)

    def max_pruned(self, weight: torch.Tensor) -> int:
        """Its zeros: any of them may have been pruned."""
        return int((weight == 0).sum())

    def select(self, scores: Sequence, starts: Sequence[int], shapes: Sequence[tuple[int, int]], sparsity: float,
               scope: str, *, pool: str = "sum", counts: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The exact k lowest of every group (the model, a tensor or a row); `counts`: how many
        to prune per group, if not round(sparsity * size) (OWL's layer budgets)."""
        numels = [int(a) * int(b) for a, b in shapes]
        row_lengths = [int(b) for _, b in shapes]
        if counts is None:
            counts = prune_counts(sparsity, group_sizes(numels, scope, row_lengths))
        segments = [Segment(x, i, start) for i, (x, start) in enumerate(zip(scores, starts))]
        return select_pruned(segments, numels, counts, scope=scope, row_lengths=row_lengths)


@dataclass(frozen=True)
class NM:
    """n of every m consecutive inputs (along a row) are pruned."""

    n: int
    m: int
    kind = "n:m"

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"N:M structure needs 0 < n < m, got {self.n}:{self.m}")

    removes_parameters = False
    scores_in_pieces = False

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_shape(self, shape: tuple[int, int], name: str) -> None:
        out_f, in_f = _check_2d(self, shape, name)
        if in_f % self.m:
            raise ValueError(f"{name}: {self} needs in_features divisible by m={self.m}, "
                             f"got shape [{out_f}, {in_f}]")

    def max_pruned(self, weight: torch.Tensor) -> int:
        """At most n zeros of every group of m: pruned n:m, each group shows n zeros or more."""
        rows, cols = weight.shape
        zeros = (weight == 0).view(rows, cols // self.m, self.m).sum(-1)
        return int(zeros.clamp(max=self.n).sum())

    def select(self, scores: Sequence, starts: Sequence[int], shapes: Sequence[tuple[int, int]], sparsity: float,
               scope: str, *, pool: str = "sum", counts: torch.Tensor | None = None) -> list[torch.Tensor]:
        """n of every m, each group of m on its own (boundary fragments all-reduced)."""
        return [nm_mask(x, start, shape, self) for x, start, shape in zip(scores, starts, shapes)]


@dataclass(frozen=True)
class Block:
    """Whole rows x cols blocks are pruned."""

    rows: int
    cols: int
    kind = "block"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block structure needs rows, cols >= 1, got {self.rows}x{self.cols}")

    removes_parameters = False
    scores_in_pieces = False

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}"

    def check_shape(self, shape: tuple[int, int], name: str) -> None:
        out_f, in_f = _check_2d(self, shape, name)
        if out_f % self.rows or in_f % self.cols:
            raise ValueError(f"{name}: {self} needs out_features divisible by {self.rows} and "
                             f"in_features divisible by {self.cols}, got shape [{out_f}, {in_f}]")

    def max_pruned(self, weight: torch.Tensor) -> int:
        """The elements of its all-zero blocks: a pruned block is zero as a whole."""
        rows, cols = weight.shape
        zero = (weight == 0).view(rows // self.rows, self.rows, cols // self.cols, self.cols)
        return int(zero.all(3).all(1).sum()) * self.rows * self.cols

    def select(self, scores: Sequence, starts: Sequence[int], shapes: Sequence[tuple[int, int]], sparsity: float,
               scope: str, *, pool: str = "sum", counts: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Whole blocks, their scores pooled (`pool` sum or l2) over the slices."""
        return select_blocks(list(zip(scores, starts, shapes)), self, sparsity, scope, pool=pool)


# A structure is one object behind one protocol: `kind`, `removes_parameters` (whole groups cut
# out of the export: structural.py), `scores_in_pieces`, `check_shape(shape, name)` and
# `select(scores, starts, shapes, sparsity, scope, pool=, counts=)` -> this rank's masks; one that
# keeps the parameters also answers `max_pruned(weight)`: the most elements a mask of it can have
# pruned in an exported [out, in] weight, every pruned element being zero there (the registry
# recounts a manifest's claims with it: dist_prune/registry/recount.py).
Structure = Union[Unstructured, NM, Block, Structural]
_ALLOWED = ("'unstructured', 'N:M' with 0 < N < M (e.g. '2:4'), 'block:RxC' with R, C >= 1 (e.g. "
            "'block:4x4'), or whole 'heads', 'channels' or 'layers'")


def parse_structure(text: str) -> Structure:
    """'unstructured', 'n:m', 'block:RxC' or heads | channels | layers (dist_prune/structural.py);
    case and surrounding spaces ignored."""
    t = str(text).strip().lower()
    if t == "unstructured":
        return Unstructured()
    if t in UNITS:
        return Structural(t)
    if match := re.fullmatch(r"(\d+)\s*:\s*(\d+)", t):
        n, m = map(int, match.groups())
        if not 0 < n < m:
            raise ValueError(f"bad structure {text!r}: N:M needs 0 < N < M, e.g. '2:4'")
        return NM(n, m)
    if match := re.fullmatch(r"block\s*:\s*(\d+)\s*x\s*(\d+)", t):
        rows, cols = map(int, match.groups())
        if rows < 1 or cols < 1:
            raise ValueError(f"bad structure {text!r}: block:RxC needs R, C >= 1, e.g. 'block:4x4'")
        return Block(rows, cols)
    raise ValueError(f"unknown structure {text!r}: expected {_ALLOWED}")


def check_shape(structure: Structure, shape: tuple[int, int], name: str) -> None:
    """ValueError naming the tensor if the structure does not tile its [out, in] shape.
    (Whole heads, channels and layers are checked on the model: structural.check_model.)"""
    structure.check_shape(shape, name)


def _check_2d(structure: Structure, shape: tuple[int, int], name: str) -> tuple[int, int]:
    if len(shape) != 2 or any(int(x) < 1 for x in shape):
        raise ValueError(f"{name}: structure {structure} needs a 2-D [out, in] weight, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


# --- N:M -----------------------------------------------------------------------------------------


def _prune_lowest(values: torch.Tensor, n: int) -> torch.Tensor:
    """[G, m] values -> [G, m] bool: the n lowest of each row, ties by lower column first."""
    order = torch.argsort(values, dim=1, stable=True)[:, :n]
    return torch.zeros(values.shape, dtype=torch.bool, device=values.device).scatter_(1, order, True)


def nm_mask(scores: torch.Tensor, start: int, shape: tuple[int, int], nm: NM,
            group: ProcessGroup | None = None) -> torch.Tensor:
    """Bool mask (True = pruned) over this rank's slice: in every group of m consecutive inputs of
    a row exactly the n lowest scores are pruned (ties: lower column first). Collective per tensor
    (every rank of `group` calls it for the same tensor): ONE all_reduce of [world, 2, 1 + 2m]
    int64 holding each rank's leading and trailing partial group (group id + 1, presence flags,
    float64 bits), plus a NaN counter. Every holder of a straddling group decides its elements from
    the whole group, identically to the single-process answer."""
    check_shape(nm, shape, "nm_mask")
    n, m = nm.n, nm.m
    s, size = int(start), scores.numel()
    e = s + size
    _check_slice(scores, s, shape)
    rank, world = rank_and_world(group)
    mask = torch.zeros(size, dtype=torch.bool, device=scores.device)

    # Local structure: whole groups [fs, fe), and up to two partial fragments (global ranges).
    fs, fe = -(-s // m) * m, e // m * m
    if size == 0:
        fragments = []
    elif fs >= fe:  # no whole group here: the slice lies in one group or spans one boundary
        fragments = [(s, e)] if s // m == (e - 1) // m else [(s, fs), (fe, e)]
    else:
        fragments = [(a, b) for a, b in ((s, fs), (fe, e)) if a < b]
    buf = torch.zeros(world, 2, 1 + 2 * m, dtype=torch.int64)
    for slot, (a, b) in enumerate(fragments):
        g, off = a // m, a % m
        buf[rank, slot, 0] = g + 1
        buf[rank, slot, 1 + off : 1 + off + b - a] = 1
        buf[rank, slot, 1 + m + off : 1 + m + off + b - a] = scores[a - s : b - s].double().view(torch.int64)
    nan = torch.tensor([int(bool(scores.sum().isnan()) and bool(scores.isnan().any()))])
    flat = torch.cat([buf.view(-1), nan])
    all_reduce_(flat, group)
    if flat[-1].item():
        raise ValueError("scores contain NaN; cannot choose the N:M pruned elements")
    frags = flat[:-1].view(world * 2, 1 + 2 * m)

    # Whole groups: decided locally, chunk by chunk.
    step = max(1, CHUNK // m) * m
    for lo in range(fs - s, fe - s, step):
        hi = min(lo + step, fe - s)
        mask[lo:hi] = _prune_lowest(scores[lo:hi].float().view(-1, m), n).view(-1)

    # Straddling groups: merge every rank's fragment of the group, decide, keep my positions.
    for a, b in fragments:
        g = a // m
        rows = frags[frags[:, 0] == g + 1]
        present = rows[:, 1 : 1 + m].sum(0)
        if not bool((present == 1).all()):
            raise ValueError(f"slices do not tile the tensor: N:M group {g} of a {list(shape)} tensor is "
                             f"covered {present.tolist()} times (are all ranks calling with ZeRO slices?)")
        values = rows[:, 1 + m :].sum(0).view(torch.float64)  # one holder per position, zeros elsewhere
        decided = _prune_lowest(values.view(1, m), n).view(-1)
        mask[a - s : b - s] = decided[a % m : a % m + b - a]
    return mask


# --- blocks --------------------------------------------------------------------------------------


def _block_ids(pos: torch.Tensor, shape: tuple[int, int], block: Block) -> torch.Tensor:
    """Row-major block index of the flat elements at `pos`."""
    in_f = int(shape[1])
    return (pos // in_f // block.rows) * (in_f // block.cols) + (pos % in_f) // block.cols


def n_blocks(shape: tuple[int, int], block: Block) -> int:
    return (int(shape[0]) // block.rows) * (int(shape[1]) // block.cols)


def block_scores(scores: torch.Tensor, start: int, shape: tuple[int, int], block: Block, *,
                 pool: str = "sum", group: ProcessGroup | None = None) -> torch.Tensor:
    """Pooled float32 score of every block (row-major block order), identical on every rank:
    float64 local partial sums (of scores, or of squares for pool="l2", then sqrt), one
    all_reduce of the [n_blocks] float64 vector. Collective per tensor."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    check_shape(block, shape, "block_scores")
    _check_slice(scores, int(start), shape)
    total = torch.zeros(n_blocks(shape, block), dtype=torch.float64, device=scores.device)
    for lo in range(0, scores.numel(), CHUNK):
        x = scores[lo : lo + CHUNK].double()
        pos = torch.arange(int(start) + lo, int(start) + lo + x.numel(), device=scores.device)
        total.index_add_(0, _block_ids(pos, shape, block), x * x if pool == "l2" else x)
    all_reduce_(total, group)
    return (total.sqrt() if pool == "l2" else total).float()


def block_mask(scores: torch.Tensor, start: int, shape: tuple[int, int], block: Block,
               prune_blocks: torch.Tensor) -> torch.Tensor:
    """Expand a bool per-block decision (True = prune the block) to this rank's local elements."""
    check_shape(block, shape, "block_mask")
    if prune_blocks.numel() != n_blocks(shape, block):
        raise ValueError(f"expected {n_blocks(shape, block)} block decisions, got {prune_blocks.numel()}")
    decisions = prune_blocks.reshape(-1).bool().to(scores.device)
    mask = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
    for lo in range(0, scores.numel(), CHUNK):
        hi = min(lo + CHUNK, scores.numel())
        pos = torch.arange(int(start) + lo, int(start) + hi, device=scores.device)
        mask[lo:hi] = decisions[_block_ids(pos, shape, block)]
    return mask


def block_segment(block_score: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """This rank's ZeRO-style share of the replicated block scores, (scores_part, start): blocks
    [r*ps, min((r+1)*ps, nb)) with ps = ceil(nb / world), so each block is counted once."""
    nb = block_score.numel()
    ps = -(-nb // world)
    lo = min(rank * ps, nb)
    return block_score[lo : min(lo + ps, nb)], lo


def select_blocks(tensors: Sequence[tuple[torch.Tensor, int, tuple[int, int]]], block: Block, sparsity: float,
                  scope: str = "layer", pool: str = "sum", *,
                  group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Prune round(sparsity * blocks) whole blocks of the model (scope "global") or of each tensor
    ("layer"); returns this rank's element mask (True = pruned) per (scores, start, shape).
    Collective: every rank passes the same tensors in the same order. Communication: one
    all_reduce per tensor for the block scores, select_pruned's histograms, and one uint8
    all_reduce of every block's decision."""
    if scope not in BLOCK_SCOPES:
        raise ValueError(f"block selection scope must be one of {BLOCK_SCOPES}, got {scope!r}")
    rank, world = rank_and_world(group)
    segments, numels = [], []
    for t, (scores, start, shape) in enumerate(tensors):
        pooled = block_scores(scores, start, shape, block, pool=pool, group=group)
        part, lo = block_segment(pooled, rank, world)
        segments.append(Segment(part, t, lo))
        numels.append(pooled.numel())
    counts = prune_counts(sparsity, group_sizes(numels, scope))
    chosen = select_pruned(segments, numels, counts, scope=scope, group=group)
    offsets = [0]
    for nb in numels:
        offsets.append(offsets[-1] + nb)
    decisions = torch.zeros(offsets[-1], dtype=torch.uint8)  # each rank fills its own share
    for seg, picked in zip(segments, chosen):
        o = offsets[seg.tensor_index] + seg.start
        decisions[o : o + picked.numel()] = picked.to(torch.uint8)
    all_reduce_(decisions, group)
    return [block_mask(scores, start, shape, block, decisions[offsets[t] : offsets[t + 1]].bool())
            for t, (scores, start, shape) in enumerate(tensors)]


# --- helpers -------------------------------------------------------------------------------------


def _check_slice(scores: torch.Tensor, start: int, shape: tuple[int, int]) -> None:
    numel = int(shape[0]) * int(shape[1])
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor, got {scores.dtype} of shape {tuple(scores.shape)}")
    if start < 0 or start + scores.numel() > numel:
        raise ValueError(f"slice [{start}, {start + scores.numel()}) exceeds the {numel} elements of "
                         f"shape {list(shape)}")
