"""Scorers against hand-computed answers on tiny matrices."""

from __future__ import annotations

import math

import torch

from dist_prune.config import PruneConfig, scope_of
from dist_prune.gradients import new_stats, token_products, update_stats
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


# Per-token statistics on a 4x6 linear, two tokens: x_t (inputs) and delta_t (dL/d output)
X = torch.tensor([[1., 0, 2, -1, 0, 3], [0, 1, -1, 2, 1, 0]])
DELTA = torch.tensor([[1., -1, 0, 2], [2, 0, 1, -1]])
W46 = torch.tensor([[1., -2, 0, 1, 3, -1], [2, 1, -1, 0, 1, 2], [-3, 0, 2, 1, -1, 1], [1, 1, -2, 2, 0, -1]])
# sum_t delta_ti^2 x_tj^2 and sum_t |delta_ti| |x_tj|, by hand row by row
TOKEN_SQ = torch.tensor([[1., 4, 8, 17, 4, 9], [1, 0, 4, 1, 0, 9], [0, 1, 1, 4, 1, 0], [4, 1, 17, 8, 1, 36]])
TOKEN_ABS = torch.tensor([[1., 2, 4, 5, 2, 3], [1, 0, 2, 1, 0, 3], [0, 1, 1, 2, 1, 0], [2, 1, 5, 4, 1, 6]])


def test_token_products_by_hand():
    got = token_products(X, DELTA, ("token_sq", "token_abs"))
    assert torch.equal(got["token_sq"], TOKEN_SQ) and torch.equal(got["token_abs"], TOKEN_ABS)
    assert set(token_products(X[None], DELTA[None], ("token_sq",))) == {"token_sq"}  # [batch, tokens, .]
    # squared or absolute per token, then summed: not the square of the summed gradient
    assert not torch.equal(TOKEN_SQ, (DELTA.T @ X).square())


def test_taylor_per_token():
    # a slice from flat 5 to 17 (mid-row to mid-row, as on a later rank): |w| * token_abs
    local = LocalSlice(W46.reshape(-1)[5:17], start=5, shape=(4, 6))
    stats = {"token_abs": TOKEN_ABS.reshape(-1)[5:17]}
    assert taylor(local, stats).tolist() == [3, 2, 0, 2, 0, 0, 6, 0, 0, 2, 2, 1]
    # while fine-tuning, the steps' summed gradient
    assert taylor(LOCAL, {"grad_sum": torch.tensor([0.5, 0.25, 0., -1., 2.])}).tolist() == [2, 1.25, 0, 7, 16]


def test_obd_per_token_fisher():
    local = LocalSlice(W46.reshape(-1)[5:17], start=5, shape=(4, 6))
    # 0.5 * F * w^2 row by row: [.5, 8, 0, 8.5, 18, 4.5], [2, 0, 2, 0, 0, 18], [0, 0, 2, 2, .5, 0]
    assert obd(local, {"token_sq": TOKEN_SQ.reshape(-1)[5:17]}).tolist() == [4.5, 2, 0, 2, 0, 0, 18, 0, 0, 2, 2, 0.5]


def test_seven_per_token_by_hand():
    local = LocalSlice(W46.reshape(-1), start=0, shape=(4, 6))
    got = seven(local, {"token_abs": TOKEN_ABS.reshape(-1), "token_sq": TOKEN_SQ.reshape(-1)}).reshape(4, 6)
    # |w| * sum_t a_t * mean(a) / rms(a) = |w| * token_abs^2 / sqrt(token_sq), the 1 / sqrt(N) dropped;
    # 0 where no token reaches the weight (row 1 column 1, row 2 column 5)
    r17, r2 = math.sqrt(17), math.sqrt(2)
    expected = torch.tensor([[1, 4, 0, 25 / r17, 6, 3], [2, 0, 2, 0, 0, 6], [0, 0, 2, 2, 1, 0],
                             [2, 1, 50 / r17, 8 * r2, 0, 6]])
    assert torch.allclose(got, expected, rtol=1e-6)
    # mean / rms is at most 1, so token_abs / sqrt(token_sq) at most sqrt(N) = sqrt(2) times per-token
    # taylor, and 1 where one token alone carries the gradient (rows 1 and 2)
    per_token_taylor = taylor(local, {"token_abs": TOKEN_ABS.reshape(-1)}).reshape(4, 6)
    assert (got <= per_token_taylor * r2 * (1 + 1e-6)).all() and torch.equal(got[1:3], per_token_taylor[1:3])


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


def test_seven_zero_gradient_scores_zero():
    acc = new_stats(2, ("seven",))
    update_stats(acc, torch.zeros(2), torch.tensor([1., 1.]), step=0)
    assert acc["seven"].tolist() == [0, 0] and set(acc) == {"seven", "_m", "_v"}


def test_threshold():
    local = LocalSlice(torch.tensor([0.1, -0.5, 0.3, -0.2999, float("nan")]), start=0, shape=(1, 5))
    assert threshold_mask(local, 0.3).tolist() == [True, False, False, True, True]
    assert threshold_counts([local, LOCAL], 5.5) == [5, 2]  # one process: no all-reduce


def test_registry():
    for name, scope in (("taylor", "row"), ("obd", "global"), ("seven", "row")):
        assert METHODS[name].calibration == "gradients" and METHODS[name].default_scope == scope
    assert METHODS["taylor"].stats == ("token_abs",)
    assert METHODS["obd"].stats == ("token_sq",)
    assert METHODS["seven"].stats == ("token_abs", "token_sq")
    # re-scored while fine-tuning: the optimizer steps' statistics, one global threshold, as before
    assert METHODS["taylor"].stats_for("cubic") == ("grad_sum",) and METHODS["seven"].stats_for("cubic") == ("seven",)
    for name in ("taylor", "seven"):
        assert scope_of(PruneConfig(method=name, schedule="cubic")) == "global", name
    assert scope_of(PruneConfig(method="movement", schedule="cubic")) == "layer"  # Sanh et al.'s per-matrix top-k
    assert scope_of(PruneConfig(method="taylor")) == "row" and not METHODS["obd"].training_stats
    assert METHODS["threshold"].calibration == "none" and METHODS["threshold"].mask_rule is not None
    assert all(name == m.name for name, m in METHODS.items())
    for m in METHODS.values():  # exactly one way to decide
        assert sum(x is not None and x is not False for x in (m.score, m.reconstruct, m.mask_rule)) + m.group_loss == 1, m.name


def test_row_and_column_of_local_elements():
    assert LOCAL.rows().tolist() == [0, 1, 1, 1, 1]
