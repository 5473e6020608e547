"""Row scope without the radix passes where they are not needed: rows that lie whole in one rank's
slice are selected by that rank alone.

A ZeRO-3 slice cuts a tensor at most twice, so all but at most two of a slice's rows are whole
there. For those, the k smallest of a row (ties by column, as in dist_prune/selection.py) come from
a per-row kthvalue on integer keys that order like the floats. Only the rows cut by a slice
boundary go through the distributed radix select, as one small group each: the ranks agree on which
rows those are with one all_reduce of a flag per row. Row-scope selection of a 7-linear decoder layer
then costs a few passes over the local scores instead of four [rows, 256] histogram all_reduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dist_prune.float_keys import order_keys


@dataclass(frozen=True)
class Piece:
    """Elements of one rank's segment that lie in one row cut by a slice boundary."""

    segment: int  # index into the caller's segments (and masks)
    lo: int  # local offset of the piece in that segment
    length: int
    group: int  # global row-group id
    column: int  # column of the piece's first element within its row


def split_rows(starts: Sequence[int], lengths: Sequence[int], tensor_indices: Sequence[int],
               first: Sequence[int], row_lengths: Sequence[int]) -> tuple[list[tuple[int, int, int, int]], list[Piece]]:
    """Each segment's whole rows, as (segment, local offset, first global row group, rows), and the
    pieces of rows it holds only part of. Row groups are numbered tensor by tensor, row by row:
    tensor t's first is first[t]."""
    whole, pieces = [], []
    for i, (start, length, t) in enumerate(zip(starts, lengths, tensor_indices)):
        r = row_lengths[t]
        head = min(-start % r, length)  # the end of a row that began on an earlier rank
        rows = (length - head) // r
        tail = head + rows * r  # the start of a row that ends on a later rank
        if head:
            pieces.append(Piece(i, 0, head, first[t] + start // r, start % r))
        if rows:
            whole.append((i, head, first[t] + (start + head) // r, rows))
        if tail < length:
            pieces.append(Piece(i, tail, length - tail, first[t] + (start + tail) // r, 0))
    return whole, pieces


def whole_row_flags(whole: Sequence[tuple[int, int, int, int]], n_groups: int, device: torch.device) -> torch.Tensor:
    """[groups] int64, 1 where this rank holds the whole row; summed over ranks, the rows held whole."""
    flags = torch.zeros(n_groups, dtype=torch.int64, device=device)
    for _, _, g0, rows in whole:
        flags[g0 : g0 + rows] = 1
    return flags


def select_rows(scores: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = the k[i] smallest of row i of `scores` [rows, row length] (ties: lowest column)."""
    keys = order_keys(scores.float().contiguous())
    for kv in torch.unique(k).tolist():
        rows = None if k.numel() and bool((k == kv).all()) else (k == kv).nonzero().squeeze(1)
        sub = keys if rows is None else keys[rows]
        if kv == 0 or kv == sub.shape[1]:
            pruned = torch.full_like(sub, kv != 0, dtype=torch.bool)
        else:
            threshold = sub.kthvalue(kv, dim=1, keepdim=True).values
            below, equal = sub < threshold, sub == threshold
            need = kv - below.sum(1, keepdim=True)  # how many of the equal ones go
            split = (equal.sum(1, keepdim=True) > need).squeeze(1)
            pruned = below | equal
            if bool(split.any()):  # more equal to the threshold than go: the lowest columns
                e = equal[split]
                pruned[split] = below[split] | (e & (e.cumsum(1) <= need[split]))
        if rows is None:
            out.copy_(pruned)
        else:
            out[rows] = pruned
