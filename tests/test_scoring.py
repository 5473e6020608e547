"""Scorers against hand-computed answers on tiny matrices."""

from __future__ import annotations

import math

import torch

from dist_prune.gradients import new_stats, update_stats
from dist_prune.methods import METHODS, LocalSlice
from dist_prune.methods.magnitude import magnitude
from dist_prune.methods.obd import obd
from dist_prune.methods.seven import seven
from dist_prune.methods.taylor import taylor
from dist_prune.methods.threshold import threshold_counts, threshold_mask
from dist_prune.methods.wanda import wanda

# full weight [[1, -2, 3, -4], [5, -6, 7, -8], [9, -10, 11, -12]]; this rank holds flat 3..7
FULL = torch.tensor([[1., -2, 3, -4], [5, -6, 7, -8], [9, -10, 11, -12]])
LOCAL = LocalSlice(FULL.reshape(-1)[3:8], start=3, shape=(3, 4))  # -4, 5, -6, 7, -8


def test_columns():
    assert LOCAL.columns().tolist() == [3, 0, 1, 2, 3]
    assert LocalSlice(torch.zeros(0), start=12, shape=(3, 4)).columns().tolist() == []


def test_magnitude():
    assert magnitude(LOCAL, {}).tolist() == [4, 5, 6, 7, 8]


def test_wanda():
    # column norms sqrt([1, 4, 9, 16]) = [1, 2, 3, 4]; columns of the slice 3, 0, 1, 2, 3
    stats = {"input_sq_sum": torch.tensor([1., 4, 9, 16], dtype=torch.float64)}
    assert wanda(LOCAL, stats).tolist() == [16, 5, 12, 21, 32]


def test_taylor():
    stats = {"grad_sum": torch.tensor([0.5, 0.25, 0., -1., 2.])}
    assert taylor(LOCAL, stats).tolist() == [2, 1.25, 0, 7, 16]


def test_obd():
    # F = grad_sq_sum / steps = [1, 0.5, 2, 0, 0.25]; 0.5 * F * w^2
    stats = {"grad_sq_sum": torch.tensor([2., 1., 4., 0., 0.5]), "steps": torch.tensor(2)}
    assert obd(LOCAL, stats).tolist() == [8, 6.25, 36, 0, 8]


def test_seven_two_steps_by_hand():
    w = torch.tensor([2., -1., 0.5])
    acc = new_stats(3, ("grad_sum", "grad_sq_sum", "seven"))
    update_stats(acc, torch.tensor([1., 0., -3.]), w, step=0, betas=(0.8, 0.9))
    update_stats(acc, torch.tensor([-1., 2., -3.]), w, step=1, betas=(0.8, 0.9))
    # step 0: a = [1, 0, 3], m = 0.2a, v = 0.1a^2; m_hat = a, v_hat = a (+1e-9): score w*a
    # step 1: element 0: a=1, m=0.36, v=0.19 -> m_hat=1, v_hat=1 -> +2
    #         element 1: a=2, m=0.4, v=0.4 -> m_hat=0.4/0.36, v_hat=sqrt(0.4/0.19) -> +1*2*m_hat/v_hat
    #         element 2: a=3 both steps -> m_hat = v_hat = 3 -> +0.5*3 each step
    expected = [2 + 2, 0 + 2 * (0.4 / 0.36) / math.sqrt(0.4 / 0.19), 1.5 + 1.5]
    stats = {"seven": acc["seven"], "steps": torch.tensor(2)}
    local = LocalSlice(w, start=0, shape=(1, 3))
    assert torch.allclose(seven(local, stats), torch.tensor(expected), rtol=1e-6)
    assert acc["grad_sum"].tolist() == [0, 2, -6]
    assert acc["grad_sq_sum"].tolist() == [2, 4, 18]
    assert taylor(local, acc).tolist() == [0, 2, 3]
    assert obd(local, {**acc, "steps": torch.tensor(2)}).tolist() == [2, 1, 1.125]  # F = [1, 2, 9]


def test_seven_zero_gradient_scores_zero():
    acc = new_stats(2, ("seven",))
    update_stats(acc, torch.zeros(2), torch.tensor([1., 1.]), step=0)
    assert acc["seven"].tolist() == [0, 0] and set(acc) == {"seven", "_m", "_v"}


def test_threshold():
    local = LocalSlice(torch.tensor([0.1, -0.5, 0.3, -0.2999, float("nan")]), start=0, shape=(1, 5))
    assert threshold_mask(local, 0.3).tolist() == [True, False, False, True, True]
    assert threshold_counts([local, LOCAL], 5.5) == [5, 2]  # one process: no all-reduce


def test_registry():
    for name in ("taylor", "obd", "seven"):
        assert METHODS[name].calibration == "gradients" and METHODS[name].default_scope == "global"
    assert METHODS["taylor"].stats == ("grad_sum",)
    assert METHODS["obd"].stats == ("grad_sq_sum",)
    assert METHODS["seven"].stats == ("seven",)
    assert METHODS["threshold"].calibration == "none" and METHODS["threshold"].mask_rule is not None
    assert all(name == m.name for name, m in METHODS.items())
    for m in METHODS.values():  # exactly one way to decide
        assert sum(x is not None and x is not False for x in (m.score, m.reconstruct, m.mask_rule)) + m.group_loss == 1, m.name


def test_row_and_column_of_local_elements():
    assert LOCAL.rows().tolist() == [0, 1, 1, 1, 1]
