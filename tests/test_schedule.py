"""Schedules as pure functions of the step: cubic sparsity, pruning steps, learning rate,
the windows of each step and each rank's share."""

from __future__ import annotations

import pytest
import torch

from dist_prune.train.schedule import (cubic_sparsity, is_pruning_step, lr_factor, micro_rounds, rank_share,
                                       step_windows)


def test_cubic_sparsity_known_values():
    assert cubic_sparsity(0, 0.0, 0.5, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.0, 0.5, 0, 100) == 0.5
    assert cubic_sparsity(150, 0.0, 0.5, 0, 100) == 0.5
    # s_t = s_f + (s_i - s_f)(1 - t/T)^3 at t = T/2: 0.5 - 0.5 * 0.125
    assert cubic_sparsity(50, 0.0, 0.5, 0, 100) == pytest.approx(0.4375)
    assert cubic_sparsity(20, 0.1, 0.5, 10, 30) == pytest.approx(0.5 - 0.4 * 0.125)
    values = [cubic_sparsity(t, 0.0, 0.7, 0, 40) for t in range(41)]
    assert values == sorted(values)  # monotone: masks only grow


def test_pruning_steps_hit_the_end():
    steps = [t for t in range(30) if is_pruning_step(t, 2, 20, 7)]
    assert steps == [2, 9, 16, 20]


def test_lr_warmup_and_decay():
    assert lr_factor(0, 4, 20, "cosine") == 0.25
    assert lr_factor(3, 4, 20, "cosine") == 1.0
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(19, 4, 20, "constant") == 1.0


def test_step_windows_visit_every_window_once_per_epoch():
    n, batch = 10, 4
    seen = torch.cat([step_windows(s, n, batch, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # reshuffled
    assert torch.equal(step_windows(3, n, batch, seed=1), step_windows(3, n, batch, seed=1))


def test_a_share_of_each_step_comes_from_the_sampled_windows():
    """finetune.data.generated_share: text rows [0, 10), sampled rows [10, 16); each pool is
    walked on its own, every window once an epoch, and the share holds exactly over the steps."""
    text, sampled = 10, 6
    half = [step_windows(s, text, 1, seed=3, sampled=sampled, share=0.5) for s in range(24)]
    assert [int(b[0] >= text) for b in half] == [0, 1] * 12  # a global batch of 1 alternates
    walked = torch.cat(half)
    assert sorted(walked[walked < text][:10].tolist()) == list(range(10))
    assert sorted(walked[walked >= text][:6].tolist()) == list(range(10, 16))
    assert sorted(walked[walked >= text][6:12].tolist()) == list(range(10, 16))
    third = torch.cat([step_windows(s, text, 4, seed=3, sampled=sampled, share=0.3) for s in range(10)])
    assert int((third >= text).sum()) == 12  # floor(10 x 4 x 0.3)
    batch = step_windows(2, text, 4, seed=3, sampled=sampled, share=0.3)
    assert batch.numel() == 4 and (batch[:-1] < text).all() and batch[-1] >= text  # sampled ones last
    assert torch.equal(step_windows(7, text, 4, seed=3, sampled=sampled, share=0.3),
                       step_windows(7, text, 4, seed=3, sampled=sampled, share=0.3))
    # the text's walk is the plain one, shifted by what the sampled windows took
    assert torch.equal(walked[walked < text], torch.cat([step_windows(s, text, 1, seed=3) for s in range(12)]))


def test_rank_shares_partition_the_global_batch():
    batch = torch.arange(12)  # accumulation 3 x world 2 x micro 2
    shares = [rank_share(batch, r, 2, 2) for r in range(2)]
    assert [m.tolist() for m in shares[0]] == [[0, 1], [4, 5], [8, 9]]
    assert sorted(torch.cat(shares[0] + shares[1]).tolist()) == list(range(12))
    # round a of the collective: every rank's micro-batch a, nothing else
    rounds = micro_rounds(batch, 2, 2)
    assert len(rounds) == 3
    for a, windows in enumerate(rounds):
        assert sorted(windows.tolist()) == sorted(torch.cat([shares[0][a], shares[1][a]]).tolist())
