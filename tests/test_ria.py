"""RIA (methods/ria.py): the score against a hand computation, and its full-row and full-column
sums of |W| from ZeRO-3 slices, by all-reduce, equal to the sums over the whole tensor on 1, 2
and 3 ranks (the masks themselves: tests/test_worker.py, the same on 1 and 2 ranks)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dist_prune.methods import METHODS, LocalSlice
from dist_prune.methods.ria import abs_sums, ria
from multirank import run_on_ranks

FULL = torch.tensor([[1., -2, 3, -4], [5, -6, 7, -8], [9, -10, 11, -12]])


def test_score_by_hand():
    # this rank holds flat elements 3..7: -4 (row 0, col 3), 5, -6, 7, -8 (row 1, cols 0..3)
    local = LocalSlice(FULL.reshape(-1)[3:8], start=3, shape=(3, 4))
    stats = {"row_abs_sum": torch.tensor([10., 26, 42], dtype=torch.float64),
             "col_abs_sum": torch.tensor([15., 18, 21, 24], dtype=torch.float64),
             "input_sq_sum": torch.tensor([1., 4, 9, 16], dtype=torch.float64)}  # norms 1, 2, 3, 4
    expected = [(4 / 10 + 4 / 24) * 2,  # column 3: norm 4, and 4 ** 0.5 = 2
                (5 / 26 + 5 / 15) * 1, (6 / 26 + 6 / 18) * math.sqrt(2),
                (7 / 26 + 7 / 21) * math.sqrt(3), (8 / 26 + 8 / 24) * 2]
    assert ria(local, stats).tolist() == pytest.approx(expected, rel=1e-6)
    assert METHODS["ria"].default_scope == "row" and METHODS["ria"].needs_calibration_data


def _sums_on_ranks(full: torch.Tensor) -> dict:
    """Every rank holds ZeRO-3's slice [r*ps, (r+1)*ps) of `full`, padded to ps."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ps = -(-full.numel() // world)
    flat = torch.cat([full.reshape(-1), torch.zeros(ps * world - full.numel())])
    param = SimpleNamespace(ds_tensor=flat[rank * ps:(rank + 1) * ps].clone(), ds_numel=full.numel(),
                            ds_shape=full.shape)
    target = SimpleNamespace(name="w", param=param, shape=tuple(full.shape), numel=full.numel())
    stop = min((rank + 1) * ps, full.numel()) - min(rank * ps, full.numel())
    return abs_sums([target], {"w": param.ds_tensor[:stop]})["w"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_and_column_sums_from_slices_match_the_whole_tensor(world):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(7, 5, generator=g)  # 35 elements: slices end mid-row, the last rank padded
    for sums in run_on_ranks(_sums_on_ranks, world, full, deepspeed_comm=False):
        # float64 sums of the same float32 values, added in another order: equal to ~1e-16
        torch.testing.assert_close(sums["row_abs_sum"], full.double().abs().sum(1), rtol=1e-13, atol=0)
        torch.testing.assert_close(sums["col_abs_sum"], full.double().abs().sum(0), rtol=1e-13, atol=0)
