"""Exact distributed k-th-smallest selection: which elements to prune.

Scores are split across ranks like ZeRO-3 parameters (rank r owns flat elements
``[r*ps, min((r+1)*ps, numel))`` of each tensor, ``ps = ceil(numel / W)``). Each group (the whole
model, one tensor, or one row) prunes exactly ``counts[g]`` elements: its smallest scores, ties
broken by a global order index. Ranks agree on the result through ``all_reduce`` of small int64
histograms only; scores are never gathered.

How
* Key: float32 bits mapped to an unsigned 32-bit key that orders like the floats (positive: flip
  the sign bit; negative: flip all bits). -0.0 and +0.0 are different keys, -0.0 < +0.0, so the
  order is total and deterministic. bf16 / fp16 are widened to float32 per chunk (exact).
* Radix select: 4 rounds of 8 key bits; each round is one all_reduce of a [groups, 256]
  histogram. Where a group's histogram stays small (global, layer) one local pass counts 16 bits,
  which feeds two rounds.
* Passes over the scores decide speed, so there are three: a sum (NaN check), the top-16-bit
  histogram, and one pass that marks every element below the 16-bit bracket as pruned while it
  collects the few candidates inside it. Rounds 3-4, the tie-break and the final fix-up touch only
  those candidates (re-scanned instead of stored when there are too many to keep).
* Ties at the threshold key T: if all of them must go they all go; otherwise a further radix
  select over the tied elements' order indices finds the last one pruned. Order index: global
  scope ``offset of the tensor + flat index``, layer and row scope the flat index in the tensor.
  So the union of masks is the same for every world size.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SCOPES = ("global", "layer", "row")

CHUNK = 1 << 22  # elements per step of a pass: bounds every temporary to tens of MiB
HIST_BINS = 1 << 22  # most local histogram bins per batch of groups (32 MiB of int64)
COMPACT_MIN = 1 << 22  # keep up to this many candidates in memory ...
COMPACT_SHARE = 16  # ... or up to 1/16 of the local elements, whichever is more

_SIGN = 1 << 31
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which 16-bit half of a float32 holds its sign
_NO_LIMIT = torch.iinfo(torch.int64).max
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Segment:
    """One rank's contiguous piece of one tensor's scores."""

    scores: torch.Tensor  # 1-D, float32 / bfloat16 / float16; local elements only (no padding)
    tensor_index: int  # index into `numels` (the same tensor order on every rank)
    start: int  # flat index of scores[0] within the full tensor


def group_sizes(numels: Sequence[int], scope: str, row_lengths: Sequence[int] | None = None) -> list[int]:
    """Sizes of the selection groups: global -> [sum(numels)]; layer -> numels; row -> for each tensor t,
    numels[t] // row_lengths[t] groups of row_lengths[t] elements (tensor by tensor, row by row)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        return [sum(numels)]
    if scope == "layer":
        return list(numels)
    if row_lengths is None or len(row_lengths) != len(numels):
        raise ValueError("scope 'row' needs one row length per tensor")
    for n, length in zip(numels, row_lengths):
        if length <= 0 or n % length:
            raise ValueError(f"row length {length} does not divide a tensor of {n} elements")
    return [length for n, length in zip(numels, row_lengths) for _ in range(n // length)]


def prune_counts(sparsity: float, sizes: Sequence[int]) -> torch.Tensor:
    """k per group = floor(sparsity * n + 0.5) as int64."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    n = torch.tensor(list(sizes), dtype=torch.float64)  # exact for sizes below 2**53
    return torch.floor(sparsity * n + 0.5).to(torch.int64)


def select_pruned(
    segments: Sequence[Segment],
    numels: Sequence[int],
    counts: torch.Tensor,
    *,
    scope: str = "global",
    row_lengths: Sequence[int] | None = None,
    group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Bool masks (True = prune), one per segment, same length as segment.scores."""
    sizes = group_sizes(numels, scope, row_lengths)
    counts = _checked_counts(counts, sizes)
    _check_segments(segments, numels)
    _reject_nan(segments, group)
    masks = [torch.empty(s.scores.numel(), dtype=torch.bool) for s in segments]  # first scan fills them
    for batch in _batches(numels, scope, row_lengths):
        parts = _parts(segments, numels, scope, row_lengths, batch)
        _select_batch(parts, counts[batch.g0 : batch.g0 + batch.n_groups], batch, masks, group)
    return masks


# --- plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Consecutive tensors whose groups share one sequence of collectives."""

    tensors: range
    g0: int  # global id of the batch's first group
    n_groups: int
    width: int  # key bits counted per local pass: 16 (group constant per segment) or 8 (rows)
    order_bits: int  # bits of the largest order index, rounded up to whole 8-bit digits


@dataclass(frozen=True)
class _Part:
    """A non-empty segment as one batch sees it."""

    index: int  # position in the caller's segment list (and in the masks)
    scores: torch.Tensor
    group: int  # batch-local group of scores[0]
    row_length: int  # 0: every element is in `group`; else rows of this length start at `group`
    start: int
    order0: int  # order index of scores[0]

    def gids(self, pos: torch.Tensor) -> torch.Tensor:
        """Batch-local group ids of the local elements at `pos`."""
        if not self.row_length:
            return torch.full_like(pos, self.group)
        # Rows count from the tensor's first element, so a row may have begun on the previous rank.
        return (pos + self.start) // self.row_length + self.group


@dataclass(frozen=True)
class _Block:
    """Candidates found in one chunk of one part."""

    part: int  # index into the batch's parts
    pos: torch.Tensor  # int64 positions within the segment
    key: torch.Tensor  # int64 score keys
    gid: torch.Tensor  # int64 batch-local group ids


def _first_groups(numels: Sequence[int], scope: str, row_lengths: Sequence[int] | None) -> list[int]:
    """Global id of each tensor's first group, plus the total at the end."""
    if scope == "global":
        return [0] * len(numels) + [1]
    per = [1] * len(numels) if scope == "layer" else [n // r for n, r in zip(numels, row_lengths or ())]
    first = [0]
    for n in per:
        first.append(first[-1] + n)
    return first


def _order_bits(n: int) -> int:
    """Digit-aligned width of the order indices 0 .. n-1."""
    return max(8, -(-max(n - 1, 0).bit_length() // 8) * 8)


def _batches(numels: Sequence[int], scope: str, row_lengths: Sequence[int] | None) -> list[_Batch]:
    """Split the tensors so that one batch's local histograms stay within HIST_BINS."""
    if scope == "global":
        return [_Batch(range(len(numels)), 0, 1, 16, _order_bits(sum(numels)))]
    width = 16 if scope == "layer" else 8
    first = _first_groups(numels, scope, row_lengths)
    cap = max(1, HIST_BINS >> width)
    bounds, lo = [], 0
    for t in range(1, len(numels)):
        if first[t + 1] - first[lo] > cap:  # a single oversized tensor still gets its own batch
            bounds.append((lo, t))
            lo = t
    bounds.append((lo, len(numels)))
    return [
        _Batch(range(a, b), first[a], first[b] - first[a], width, _order_bits(max(numels[a:b])))
        for a, b in bounds
        if b > a
    ]


def _parts(
    segments: Sequence[Segment],
    numels: Sequence[int],
    scope: str,
    row_lengths: Sequence[int] | None,
    batch: _Batch,
) -> list[_Part]:
    first = _first_groups(numels, scope, row_lengths)
    offsets = [0, *accumulate(numels)] if scope == "global" else [0] * len(numels)
    return [
        _Part(
            index=i,
            scores=s.scores,
            group=first[s.tensor_index] - batch.g0,
            row_length=row_lengths[s.tensor_index] if scope == "row" else 0,  # type: ignore[index]
            start=s.start,
            order0=offsets[s.tensor_index] + s.start,
        )
        for i, s in enumerate(segments)
        if s.tensor_index in batch.tensors and s.scores.numel()
    ]


# --- the selection ------------------------------------------------------------------------------


def _select_batch(
    parts: list[_Part], counts: torch.Tensor, batch: _Batch, masks: list[torch.Tensor], group: ProcessGroup | None
) -> None:
    """Mark exactly counts[g] elements of every group of the batch in `masks`."""
    n_groups, width = batch.n_groups, batch.width
    active = counts > 0
    # Rounds 1-2: the top 16 key bits.
    if width == 16:
        prefix, k, _, local = _resolve(_top16_hist(parts, n_groups), counts, group)
    else:
        zero = torch.zeros(n_groups, dtype=torch.int64)
        prefix, k, _, local = _select_bits(lambda: _all_pairs(parts), counts, zero, 0, 16, 32, width, group)
    prefix[~active] = -1  # a negative prefix matches no key: such groups prune nothing

    # One pass: everything below the bracket is pruned; the candidates inside are collected.
    n_local = sum(p.scores.numel() for p in parts)
    first_scan = _scan(parts, prefix, masks)
    if int(local[active].sum()) <= max(COMPACT_MIN, n_local // COMPACT_SHARE):
        kept = list(first_scan)
        candidates: Callable[[], Iterable[_Block]] = lambda: kept
    else:
        for _ in first_scan:  # the marking is all this pass is for; later passes re-scan
            pass
        candidates = lambda: _scan(parts, prefix, None)

    # Rounds 3-4: the low 16 bits, over candidates only. T < 0 for groups that prune nothing.
    key_pairs = lambda: ((b.key, b.gid) for b in candidates())
    threshold, k, ties, _ = _select_bits(key_pairs, k, prefix, 16, 32, 32, width, group)

    # k of the `ties` elements with key == T are pruned: the ones with the lowest order index.
    last = torch.full((n_groups,), _NO_LIMIT)
    split = active & (k < ties)
    if bool(split.any()):  # from reduced counts, so every rank takes the same branch
        zero = torch.zeros(n_groups, dtype=torch.int64)
        tie_pairs = lambda: _tie_pairs(candidates(), parts, threshold)
        order, *_ = _select_bits(tie_pairs, k, zero, 0, batch.order_bits, batch.order_bits, 8, group)
        last = torch.where(split, order, last)

    for b in candidates():
        t = threshold[b.gid]
        order = b.pos + parts[b.part].order0
        prune = (b.key < t) | ((b.key == t) & (order <= last[b.gid]))
        masks[parts[b.part].index][b.pos[prune]] = True


def _select_bits(
    pairs: Callable[[], _Pairs],
    k: torch.Tensor,
    prefix: torch.Tensor,
    known: int,
    stop: int,
    bits: int,
    width: int,
    group: ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Radix-select bits [known, stop) of each group's k-th smallest `bits`-bit value.

    `pairs()` yields (values, group ids) and is iterated once per local pass of `width` bits.
    Returns the extended prefix and what `_resolve` returns for its last digit."""
    while True:
        hist = _local_hist(pairs(), prefix, known, bits, width, len(k))
        digits, k, size, local = _resolve(hist, k, group)
        prefix = (prefix << width) | digits
        known += width
        if known >= stop:
            return prefix, k, size, local


def _resolve(
    hist: torch.Tensor, k: torch.Tensor, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Agree on the next bits of each group's k-th smallest value, 8 bits per all_reduce.

    hist: local [groups, 2**width] counts of the bracket's elements by their next `width` bits;
    k: 1-based rank of the wanted element within the bracket (0: group inactive).
    Returns the digits, k within the chosen bin, and the bin's global and local sizes."""
    n_groups = hist.shape[0]
    rows = torch.arange(n_groups)
    digits = torch.zeros(n_groups, dtype=torch.int64)
    size = torch.zeros(n_groups, dtype=torch.int64)
    while hist.shape[1] > 1:
        sub = hist.view(n_groups, 256, -1)
        coarse = sub.sum(2)
        _all_reduce(coarse, group)
        upto = coarse.cumsum(1)
        d = (upto < k[:, None]).sum(1)  # first bin whose running count reaches k
        size = coarse[rows, d]
        k = k - (upto[rows, d] - size)
        digits = (digits << 8) | d
        hist = sub[rows, d]
    return digits, k, size, hist[:, 0]


def _local_hist(pairs: _Pairs, prefix: torch.Tensor, known: int, bits: int, width: int, n_groups: int) -> torch.Tensor:
    """[groups, 2**width] counts of the next `width` bits of the values whose top `known` bits
    equal their group's prefix. Small inputs are pooled until they outnumber the bins, so that
    counting costs per element, not per (mostly empty) histogram."""
    n_bins = n_groups << width
    hist = torch.zeros(n_bins, dtype=torch.int64)
    pending: list[torch.Tensor] = []
    n_pending = 0
    for value, gid in pairs:
        if known:
            inside = (value >> (bits - known)) == prefix[gid]
            value, gid = value[inside], gid[inside]
        pending.append((gid << width) | ((value >> (bits - known - width)) & ((1 << width) - 1)))
        n_pending += value.numel()
        if n_pending >= max(CHUNK, n_bins):
            hist += torch.bincount(torch.cat(pending), minlength=n_bins)
            pending, n_pending = [], 0
    if pending:
        hist += torch.bincount(torch.cat(pending), minlength=n_bins)
    return hist.view(n_groups, 1 << width)


# --- passes over the scores ---------------------------------------------------------------------


def _chunks(scores: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, float32 chunk); float32 input is not copied."""
    for lo in range(0, scores.numel(), CHUNK):
        yield lo, scores[lo : lo + CHUNK].float()


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Unsigned order-preserving 32-bit keys of float32 values, as int64."""
    bits = x.view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + _SIGN


def _key_float(key: int) -> float:
    """The float32 whose key is `key`."""
    bits = key - _SIGN if key >= _SIGN else ~key & 0xFFFFFFFF
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _below(x: torch.Tensor, key: int, out: torch.Tensor) -> torch.Tensor:
    """out = key(x) < key, as one float comparison. -0.0 has a lower key than +0.0 but compares
    equal to it, so below the key of +0.0 means "sign bit set"."""
    if key == _SIGN:
        return torch.signbit(x, out=out)
    return torch.lt(x, _key_float(key), out=out)


def _reject_nan(segments: Sequence[Segment], group: ProcessGroup | None) -> None:
    """Raise on every rank if any rank has a NaN score (a sum is NaN only if some input is NaN or
    infinities cancel, so the exact check rarely runs)."""
    bad = sum(bool(s.scores.sum().isnan()) and bool(s.scores.isnan().any()) for s in segments)
    flag = torch.tensor([bad], dtype=torch.int64)
    _all_reduce(flag, group)
    if flag.item():
        raise ValueError("scores contain NaN; cannot select which elements to prune")


def _top16_hist(parts: Sequence[_Part], n_groups: int) -> torch.Tensor:
    """[groups, 65536] counts of the top 16 key bits, for parts that each lie in one group.

    The scores' largest cost: counting is serial in torch, so chunks are spread over
    torch.get_num_threads() Python threads (torch releases the GIL while it counts)."""

    def count(tasks: list[tuple[_Part, int]]) -> torch.Tensor:
        hist = torch.zeros(n_groups, 1 << 16, dtype=torch.int64)
        top = torch.empty(CHUNK, dtype=torch.int64)
        ones = torch.ones(CHUNK, dtype=torch.int64)
        for p, lo in tasks:
            x = p.scores[lo : lo + CHUNK].float()
            n = x.numel()
            top[:n].copy_(x.view(torch.uint16)[_HIGH_HALF::2])  # raw high halves, not keys: cheaper
            hist[p.group].scatter_add_(0, top[:n], ones[:n])  # counts like bincount, ~1.6x faster
        return hist

    tasks = [(p, lo) for p in parts for lo in range(0, p.scores.numel(), CHUNK)]
    n_threads = max(1, min(torch.get_num_threads(), len(tasks)))
    with ThreadPoolExecutor(n_threads) as pool:
        hist = sum(pool.map(count, [tasks[i::n_threads] for i in range(n_threads)]))
    # Raw high half r to key order: positives (r < 2**15) go to 2**15 + r, negatives run backwards.
    return torch.cat([hist[:, 1 << 15 :].flip(1), hist[:, : 1 << 15]], 1)


def _sparse_nonzero(hit: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a mostly False bool vector: first find the 8-byte words
    holding any (an eighth of the entries to scan), then look inside those words only."""
    if hit.numel() % 8:
        hit = torch.cat([hit, hit.new_zeros(8 - hit.numel() % 8)])
    words = torch.nonzero(hit.view(torch.int64)).squeeze(1)
    inner = torch.nonzero(hit.view(-1, 8)[words])
    return words[inner[:, 0]] * 8 + inner[:, 1]


def _all_pairs(parts: Sequence[_Part]) -> _Pairs:
    """(keys, group ids) of every element, chunk by chunk."""
    for p in parts:
        for lo, x in _chunks(p.scores):
            yield _keys(x), p.gids(torch.arange(lo, lo + x.numel()))


def _scan(parts: Sequence[_Part], prefix: torch.Tensor, masks: list[torch.Tensor] | None) -> Iterator[_Block]:
    """Yield the elements whose top 16 key bits equal their group's prefix; with `masks`, also
    mark every element below its group's bracket as pruned."""
    for j, p in enumerate(parts):
        mask = None if masks is None else masks[p.index]
        yield from (_scan_rows if p.row_length else _scan_one_group)(j, p, prefix, mask)


def _scan_one_group(j: int, p: _Part, prefix: torch.Tensor, mask: torch.Tensor | None) -> Iterator[_Block]:
    """`_scan` for a part inside one group: float compares on the raw bits, keys for hits only."""
    top = int(prefix[p.group])
    if top < 0:  # the group prunes nothing
        if mask is not None:
            mask.zero_()
        return
    # The bracket's floats all have this raw high half (sign, exponent, top of the mantissa).
    high = top - (1 << 15) if top >= 1 << 15 else 0xFFFF - top
    for lo, x in _chunks(p.scores):
        if mask is not None:
            _below(x, top << 16, out=mask[lo : lo + x.numel()])
        pos = _sparse_nonzero(x.view(torch.uint16)[_HIGH_HALF::2] == high)
        if pos.numel():
            yield _Block(j, pos + lo, _keys(x[pos]), p.gids(pos))


def _scan_rows(j: int, p: _Part, prefix: torch.Tensor, mask: torch.Tensor | None) -> Iterator[_Block]:
    """`_scan` for a part spanning many groups: keys and group ids for every element."""
    for lo, x in _chunks(p.scores):
        pos = torch.arange(lo, lo + x.numel())
        key, gid = _keys(x), p.gids(pos)
        top, want = key >> 16, prefix[gid]
        if mask is not None:
            torch.lt(top, want, out=mask[lo : lo + x.numel()])
        hit = _sparse_nonzero(top == want)
        if hit.numel():
            yield _Block(j, pos[hit], key[hit], gid[hit])


def _tie_pairs(blocks: Iterable[_Block], parts: Sequence[_Part], threshold: torch.Tensor) -> _Pairs:
    """(order indices, group ids) of the candidates whose key equals their group's threshold."""
    for b in blocks:
        tie = b.key == threshold[b.gid]
        yield b.pos[tie] + parts[b.part].order0, b.gid[tie]


# --- checks and communication -------------------------------------------------------------------


def _checked_counts(counts: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    counts = torch.as_tensor(counts).to(torch.int64).reshape(-1)
    if counts.numel() != len(sizes):
        raise ValueError(f"expected {len(sizes)} counts (one per group), got {counts.numel()}")
    if bool((counts < 0).any()) or bool((counts > torch.tensor(sizes, dtype=torch.int64)).any()):
        raise ValueError("every count must lie between 0 and its group's size")
    return counts


def _check_segments(segments: Sequence[Segment], numels: Sequence[int]) -> None:
    for s in segments:
        if s.scores.dim() != 1 or s.scores.dtype not in _DTYPES:
            raise ValueError(f"scores must be 1-D float32/bfloat16/float16, got {s.scores.dtype} {tuple(s.scores.shape)}")
        if not 0 <= s.tensor_index < len(numels):
            raise ValueError(f"tensor_index {s.tensor_index} out of range for {len(numels)} tensors")
        if s.start < 0 or s.start + s.scores.numel() > numels[s.tensor_index]:
            raise ValueError(f"segment [{s.start}, {s.start + s.scores.numel()}) exceeds tensor {s.tensor_index}")


def _all_reduce(t: torch.Tensor, group: ProcessGroup | None) -> None:
    """Sum over ranks in place; a no-op without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group)
