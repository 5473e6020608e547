"""Exact distributed k-th-smallest selection: which elements to prune.

Scores are split across ranks like ZeRO-3 parameters. Every group (the whole model, one tensor or
one row) prunes exactly counts[g] elements: its smallest scores, ties broken by a global order index
(global scope: tensor offset + flat index; layer and row scope: flat index in the tensor), so the
union of the masks is the same for every world size. Ranks agree only through all_reduce of small
int64 histograms; scores are never gathered.

Radix select on an unsigned 32-bit key that orders like the floats (positive: flip the sign bit;
negative: flip all bits; -0.0 is a different key just below +0.0): 4 rounds of 8 bits, each one
all_reduce of a [groups, 256] histogram. Then, if only some of the elements equal to the threshold
key T are to go, a radix select over their order indices finds the last one pruned.

Passes over the scores decide the speed. There are three: a sum (NaN check), a histogram of the
top 16 key bits (feeding rounds 1 and 2), and one pass that writes "below the 16-bit bracket" into
the masks while it collects the few candidates inside it. Rounds 3-4, the tie-break and the final
fix-up touch only those (re-scanned when too many to keep). Row scope selects the rows a rank holds
whole on that rank alone (dist_prune/selection_rows.py); only rows cut between ranks come here, as
one group each.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, groupby
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch

from dist_prune.collectives import all_reduce_, any_rank
from dist_prune.float_keys import HIGH_HALF, below_key, unsigned_keys
from dist_prune.selection_rows import select_rows, split_rows, whole_row_flags

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SCOPES = ("global", "layer", "row")

CHUNK = 1 << 22  # elements per step of a pass on a CPU: bounds temporaries (tens of MiB) and per-op overheads
# A GPU reads 4M floats in microseconds, less than one kernel launch and host sync cost: bigger steps
# (a few hundred MiB of temporaries, small beside the scores) keep the passes near HBM bandwidth.
CUDA_CHUNK = 1 << 26
HIST_BINS = 1 << 22  # most local histogram bins per batch of groups (32 MiB of int64)
COMPACT_MIN = 1 << 22  # keep up to this many candidates in memory ...
COMPACT_SHARE = 16  # ... or up to 1/16 of the local elements, whichever is more

# Copies of the top-16-bit histogram that consecutive scores spread their counts over, by device.
# Scores crowd into a few hundred of its 65536 bins, and a GPU's atomic adds to one bin serialise:
# on an H100, counting 1e9 |normal| scores took 123 ms into one copy and 33 ms into 64.
HIST_LANES = {"cpu": 1, "cuda": 64}  # powers of two

_NO_LIMIT = torch.iinfo(torch.int64).max
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (values, batch-local group ids)


@dataclass(frozen=True)
class Segment:
    """One rank's contiguous piece of one tensor's scores."""

    # 1-D, float32 / bfloat16 / float16; local elements only (no padding). Anything with dim(), dtype,
    # device, numel() and contiguous slices [lo:hi] giving tensors does: selection reads chunk by chunk.
    scores: torch.Tensor
    tensor_index: int  # index into `numels` (the same tensor order on every rank)
    start: int  # flat index of scores[0] within the full tensor


def group_sizes(numels: Sequence[int], scope: str, row_lengths: Sequence[int] | None = None) -> list[int]:
    """Sizes of the selection groups: global -> [sum(numels)]; layer -> numels; row -> for each tensor t,
    numels[t] // row_lengths[t] groups of row_lengths[t] elements (tensor by tensor, row by row).
    Row lengths must divide their tensors: a partial row would be a group of its own."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        return [sum(numels)]
    if scope == "layer":
        return list(numels)
    if row_lengths is None or len(row_lengths) != len(numels):
        raise ValueError("scope 'row' needs one row length per tensor")
    if any(r <= 0 or n % r for n, r in zip(numels, row_lengths)):
        raise ValueError(f"row lengths {list(row_lengths)} must divide the tensor sizes {list(numels)}")
    return [r for n, r in zip(numels, row_lengths) for _ in range(n // r)]


def prune_counts(sparsity: float, sizes: Sequence[int]) -> torch.Tensor:
    """k per group = floor(sparsity * n + 0.5) as int64."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    n = torch.tensor(list(sizes), dtype=torch.float64)  # exact below 2**53
    return torch.floor(sparsity * n + 0.5).to(torch.int64)


def select_pruned(segments: Sequence[Segment], numels: Sequence[int], counts: torch.Tensor, *,
                  scope: str = "global", row_lengths: Sequence[int] | None = None,
                  group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Bool masks (True = prune), one per segment, same length as segment.scores.

    Exactly counts[g] elements of group g are pruned: the smallest scores, equal scores by order
    index. A collective: every rank of `group` calls it with the same numels, counts and scope.
    Masks and histograms live on the scores' device (all segments on one device)."""
    _check_segments(segments, numels)
    device = segments[0].scores.device if segments else torch.device("cpu")  # histograms live there too
    counts = _checked_counts(counts, group_sizes(numels, scope, row_lengths)).to(device)
    _reject_nan(segments, device, group)
    masks = [torch.empty(len(s.scores), dtype=torch.bool, device=device) for s in segments]  # scans fill them
    radix_masks = masks
    if scope == "row":  # whole rows locally; only the rows cut between ranks below, one group each
        segments, numels, counts, radix_masks = _select_whole_rows(segments, numels, counts, row_lengths,
                                                                   masks, group)
        scope = "layer"
    for batch, parts in _plan(segments, numels, scope):
        _select_batch(parts, counts[batch.g0 : batch.g0 + batch.n_groups], batch, radix_masks, group)
    return masks


def _select_whole_rows(segments: Sequence[Segment], numels: Sequence[int], counts: torch.Tensor,
                       row_lengths: Sequence[int], masks: list[torch.Tensor], group: ProcessGroup | None,
                       ) -> tuple[list[Segment], list[int], torch.Tensor, list[torch.Tensor]]:
    """Mark the rows each rank holds whole (dist_prune/selection_rows.py); return the rest as a
    layer-scope problem: one tensor per cut row, its pieces as segments, views of their masks."""
    first = [0, *accumulate(n // r for n, r in zip(numels, row_lengths))]  # each tensor's first row group
    whole, pieces = split_rows([s.start for s in segments], [len(s.scores) for s in segments],
                               [s.tensor_index for s in segments], first, row_lengths)
    flags = whole_row_flags(whole, len(counts), counts.device)
    all_reduce_(flags, group)
    cut = (flags == 0).nonzero().squeeze(1).tolist()
    for i, lo, g0, rows in whole:
        s, length = segments[i], row_lengths[segments[i].tensor_index]
        step = max(1, _chunk(s.scores.device) // length)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            span = slice(lo + a * length, lo + b * length)
            select_rows(s.scores[span].view(b - a, length), counts[g0 + a : g0 + b],
                        masks[i][span].view(b - a, length))
    position = {g: j for j, g in enumerate(cut)}
    rest = [Segment(segments[p.segment].scores[p.lo : p.lo + p.length], position[p.group], p.column)
            for p in pieces]
    rest_masks = [masks[p.segment][p.lo : p.lo + p.length] for p in pieces]
    cut_numels = [row_lengths[bisect_right(first, g) - 1] for g in cut]
    return rest, cut_numels, counts[cut], rest_masks


# --- plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Consecutive tensors whose groups share one sequence of collectives."""

    g0: int  # global id of the first group
    n_groups: int
    order_bits: int  # width of the order indices, in whole 8-bit digits


@dataclass(frozen=True)
class _Part:
    """A non-empty segment as its batch sees it."""

    index: int  # position in the caller's segment list and in the masks
    scores: torch.Tensor
    group: int  # batch-local group of all its elements
    order0: int  # order index of scores[0]


@dataclass(frozen=True)
class _Block:
    """Candidates found in one chunk of one part."""

    part: _Part
    pos: torch.Tensor  # int64 positions in the segment
    key: torch.Tensor  # int64 score keys
    gid: torch.Tensor  # int64 batch-local groups


def _plan(segments: Sequence[Segment], numels: Sequence[int],
          scope: str) -> Iterator[tuple[_Batch, list[_Part]]]:
    """Batches of consecutive tensors whose local histograms fit in HIST_BINS, with their parts:
    one group at global scope, one per tensor at layer scope."""
    n_tensors = len(numels)
    if scope == "global":  # one group; order index = offset of the tensor + flat index
        first, offsets, bounds = [0] * (n_tensors + 1), [0, *accumulate(numels)], [(0, n_tensors)]
    else:
        first, offsets = list(range(n_tensors + 1)), [0] * n_tensors
        step = max(1, HIST_BINS >> 16)
        bounds = [(lo, min(lo + step, n_tensors)) for lo in range(0, n_tensors, step)]
    for a, b in bounds:
        largest = sum(numels) if scope == "global" else max(numels[a:b], default=0)  # order indices < this
        n_groups = 1 if scope == "global" else b - a
        batch = _Batch(first[a], n_groups, max(8, -(-max(largest - 1, 0).bit_length() // 8) * 8))
        yield batch, [_Part(i, s.scores, first[s.tensor_index] - first[a], offsets[s.tensor_index] + s.start)
                      for i, s in enumerate(segments) if a <= s.tensor_index < b and s.scores.numel()]


# --- the selection -------------------------------------------------------------------------------


def _select_batch(parts: list[_Part], counts: torch.Tensor, batch: _Batch, masks: list[torch.Tensor],
                  group: ProcessGroup | None) -> None:
    """Mark exactly counts[g] elements of every group of the batch in `masks`."""
    n_groups, width, active = batch.n_groups, 16, counts > 0
    zero = torch.zeros(n_groups, dtype=torch.int64, device=counts.device)
    # Rounds 1-2: the top 16 key bits.
    prefix, k, _, local = _resolve(_top16_hist(parts, n_groups, counts.device), counts, group)
    prefix[~active] = -1  # matches no key: these groups prune nothing

    # One pass marks everything below the bracket and finds the candidates inside it.
    n_local = sum(p.scores.numel() for p in parts)
    first_scan = _scan(parts, prefix, masks)
    if int(local[active].sum()) <= max(COMPACT_MIN, n_local // COMPACT_SHARE):
        kept = _merged(first_scan)
        candidates: Callable[[], Iterable[_Block]] = lambda: kept
        width = 8  # passes over kept candidates are cheap, 65536-bin histograms are not
    else:  # too many to keep: finish the marking pass, re-scan whenever candidates are needed
        for _ in first_scan:
            pass
        candidates = lambda: _scan(parts, prefix, None)

    # Rounds 3-4: the low 16 bits of T, over the candidates only (T < 0: group prunes nothing).
    # The local width may differ between ranks: either way there is one all_reduce per 8 bits.
    threshold, k, ties, _ = _select_bits(lambda: ((b.key, b.gid) for b in candidates()), k, prefix,
                                         16, 32, 32, width, group)

    # k of the `ties` elements with key T go: those with the lowest order indices.
    last = torch.full((n_groups,), _NO_LIMIT, device=counts.device)
    split = active & (k < ties)
    if bool(split.any()):  # computed from reduced counts, so every rank takes the same branch
        order, *_ = _select_bits(lambda: _tie_pairs(candidates(), threshold), k, zero, 0,
                                 batch.order_bits, batch.order_bits, 8, group)
        last = torch.where(split, order, last)

    for b in candidates():
        t = threshold[b.gid]
        prune = (b.key < t) | ((b.key == t) & (b.pos + b.part.order0 <= last[b.gid]))
        masks[b.part.index][b.pos[prune]] = True


def _select_bits(pairs: Callable[[], _Pairs], k: torch.Tensor, prefix: torch.Tensor, known: int, stop: int,
                 bits: int, width: int, group: ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """Radix-select bits [known, stop) of each group's k-th smallest `bits`-bit value, one pass over
    `pairs()` per `width` bits. Returns the longer prefix and the rest of `_resolve`'s answer."""
    while True:
        digits, k, size, local = _resolve(_local_hist(pairs(), prefix, known, bits, width, len(k)), k, group)
        prefix, known = (prefix << width) | digits, known + width
        if known >= stop:
            return prefix, k, size, local


def _resolve(hist: torch.Tensor, k: torch.Tensor, group: ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """Agree on the next bits of each group's k-th smallest value, 8 bits per all_reduce.

    hist: local [groups, 2**width] counts of the bracket by its next bits; k: 1-based rank in the
    bracket (0: inactive group). Returns the digits, k within the chosen bin, and that bin's global
    and local sizes."""
    n_groups = hist.shape[0]
    rows = torch.arange(n_groups, device=hist.device)
    digits = torch.zeros(n_groups, dtype=torch.int64, device=hist.device)
    for _ in range((hist.shape[1] - 1).bit_length() // 8):
        sub = hist.view(n_groups, 256, -1)
        coarse = sub.sum(2)
        all_reduce_(coarse, group)
        upto = coarse.cumsum(1)
        d = (upto < k[:, None]).sum(1)  # the first bin whose running count reaches k
        size = coarse[rows, d]
        k = k - (upto[rows, d] - size)
        digits, hist = (digits << 8) | d, sub[rows, d]
    return digits, k, size, hist[:, 0]


def _local_hist(pairs: _Pairs, prefix: torch.Tensor, known: int, bits: int, width: int,
                n_groups: int) -> torch.Tensor:
    """[groups, 2**width] counts of the next `width` bits of the values whose top `known` bits equal
    their group's prefix. Inputs are pooled until they outnumber the bins, so that counting costs
    per element, not per (mostly empty) histogram."""
    n_bins = n_groups << width
    hist = torch.zeros(n_bins + 1, dtype=torch.int64, device=prefix.device)  # last bin: outside the bracket
    pending: list[torch.Tensor] = []
    for value, gid in pairs:  # in-place steps: fresh memory is costly, and this may see every score
        digit = value >> (bits - known - width)
        index = (gid << width).bitwise_or_(digit.bitwise_and_((1 << width) - 1))
        if known:
            top = (value >> (bits - known)).bitwise_and_((1 << known) - 1)  # int32 holds unsigned keys
            index.masked_fill_(top != prefix.to(value.dtype)[gid], n_bins)
        pending.append(index)
        if sum(map(len, pending)) >= max(_chunk(prefix.device), n_bins):
            _count(hist, pending)
            pending = []
    _count(hist, pending)
    return hist[:n_bins].view(n_groups, 1 << width)


# --- passes over the scores ----------------------------------------------------------------------


def _chunk(device: torch.device) -> int:
    return CUDA_CHUNK if device.type == "cuda" else CHUNK


def _chunks(scores: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, float32 chunk); contiguous float32 input is not copied."""
    step = _chunk(scores.device)
    for lo in range(0, scores.numel(), step):
        yield lo, scores[lo : lo + step].float().contiguous()


def _count(hist: torch.Tensor, indices: list[torch.Tensor]) -> None:
    """hist[i] += occurrences of i in `indices` (int64); like bincount, but about 1.6x faster on CPU."""
    if not indices:
        return
    index = indices[0] if len(indices) == 1 else torch.cat(indices)
    hist.scatter_add_(0, index, torch.ones(1, dtype=torch.int64, device=hist.device).expand(len(index)))


def _top16_hist(parts: Sequence[_Part], n_groups: int, device: torch.device) -> torch.Tensor:
    """[groups, 65536] counts of the top 16 key bits."""
    lanes = HIST_LANES.get(device.type, 1)
    hist = torch.zeros(n_groups, lanes << 16, dtype=torch.int64, device=device)
    size = min(_chunk(device), max((p.scores.numel() for p in parts), default=0))
    top = torch.empty(size, dtype=torch.int64, device=device)
    lane = torch.arange(size, device=device).bitwise_and_(lanes - 1) if lanes > 1 else None
    for p in parts:
        for _, x in _chunks(p.scores):
            n = x.numel()
            top[:n].copy_(x.view(torch.uint16)[HIGH_HALF::2])  # raw high halves, not keys: cheaper
            if lane is not None:
                top[:n].mul_(lanes).add_(lane[:n])
            _count(hist[p.group], [top[:n]])
    hist = hist.view(n_groups, 1 << 16, lanes).sum(2)
    # Raw high half r to key order: positives (r < 2**15) go to 2**15 + r, negatives run backwards.
    return torch.cat([hist[:, 1 << 15 :].flip(1), hist[:, : 1 << 15]], 1)


def _sparse_nonzero(hit: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a mostly False bool vector: find the 8-byte words holding
    any first (an eighth of the entries to scan), then look inside those words only."""
    if hit.numel() % 8:
        hit = torch.cat([hit, hit.new_zeros(8 - hit.numel() % 8)])
    words = torch.nonzero(hit.view(torch.int64)).squeeze(1)
    inner = torch.nonzero(hit.view(-1, 8)[words])
    return words[inner[:, 0]] * 8 + inner[:, 1]


def _scan(parts: Sequence[_Part], prefix: torch.Tensor, masks: list[torch.Tensor] | None) -> Iterator[_Block]:
    """Yield the elements whose top 16 key bits equal their group's prefix; with `masks`, also mark
    every element below its group's bracket as pruned and every other as kept."""
    for p in parts:
        yield from _scan_part(p, prefix, None if masks is None else masks[p.index])


def _scan_part(p: _Part, prefix: torch.Tensor, mask: torch.Tensor | None) -> Iterator[_Block]:
    """`_scan` for one part: float compares on the raw bits, keys for hits only."""
    top = int(prefix[p.group])
    if top < 0:
        if mask is not None:
            mask.zero_()
        return
    high = top - (1 << 15) if top >= 1 << 15 else 0xFFFF - top  # raw high half of the bracket's floats
    for lo, x in _chunks(p.scores):
        if mask is not None:
            below_key(x, top << 16, out=mask[lo : lo + x.numel()])
        pos = _sparse_nonzero(x.view(torch.uint16)[HIGH_HALF::2] == high)
        if pos.numel():
            yield _Block(p, pos + lo, unsigned_keys(x[pos]), torch.full_like(pos, p.group))


def _merged(blocks: Iterable[_Block]) -> list[_Block]:
    """One block per part, so that later passes cost per candidate rather than per chunk."""
    merged = []
    for _, same_part in groupby(blocks, key=lambda b: b.part.index):
        bs = list(same_part)
        pos, key, gid = (torch.cat(field) for field in zip(*((b.pos, b.key, b.gid) for b in bs)))
        merged.append(_Block(bs[0].part, pos, key, gid))
    return merged


def _tie_pairs(blocks: Iterable[_Block], threshold: torch.Tensor) -> _Pairs:
    """(order indices, groups) of the candidates whose key equals their group's threshold."""
    for b in blocks:
        tie = b.key == threshold[b.gid]
        yield b.pos[tie] + b.part.order0, b.gid[tie]


# --- checks and communication --------------------------------------------------------------------


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
            raise ValueError(f"scores must be 1-D float32/bfloat16/float16, got {s.scores.dtype} "
                             f"of shape {tuple(s.scores.shape)}")
        end = s.start + len(s.scores)
        if not 0 <= s.tensor_index < len(numels) or s.start < 0 or end > numels[s.tensor_index]:
            raise ValueError(f"segment [{s.start}, {end}) of tensor {s.tensor_index} "
                             f"exceeds the tensor sizes {list(numels)}")


def _reject_nan(segments: Sequence[Segment], device: torch.device, group: ProcessGroup | None) -> None:
    """Raise on every rank if any rank has a NaN (a sum is NaN only if an input is NaN or
    infinities cancel, so the exact check rarely runs); no rank is left waiting in a collective."""
    bad = any(bool(x.sum().isnan() and x.isnan().any()) for s in segments for _, x in _chunks(s.scores))
    if any_rank(bad, group):
        raise ValueError("scores contain NaN; cannot select which elements to prune")
