"""NEFTune noise: present in training, absent in eval, bounded by alpha / sqrt(L * d)."""

from __future__ import annotations

import math

import torch

from dist_prune.train.neftune import NEFTune, DynamicAlpha, neftune_noise, neftune_scale


def _embedding(seed: int = 0) -> torch.nn.Embedding:
    torch.manual_seed(seed)
    return torch.nn.Embedding(50, 16)


def test_noise_only_in_training_mode_and_bounded():
    emb = _embedding()
    ids = torch.randint(0, 50, (3, 10))
    clean = emb(ids).detach()
    noise = NEFTune(emb, alpha=5.0, seed=0, rank=0)
    emb.train()
    noisy = emb(ids).detach()
    delta = noisy - clean
    bound = 5.0 / math.sqrt(10 * 16)
    assert delta.abs().max() <= bound + 1e-6
    assert delta.abs().max() > 0.8 * bound  # uniform over [-b, b]: the max comes close to b
    assert abs(delta.mean().item()) < 0.1 * bound
    emb.eval()
    assert torch.equal(emb(ids).detach(), clean)
    noise.remove()
    emb.train()
    assert torch.equal(emb(ids).detach(), clean)


def test_noise_is_reproducible_per_step_and_differs_between_steps():
    emb = _embedding()
    ids = torch.randint(0, 50, (2, 8))
    noise = NEFTune(emb, alpha=5.0, seed=3, rank=1)
    emb.train()
    noise.at(7, 0)
    first = emb(ids).detach()
    noise.at(7, 0)
    assert torch.equal(emb(ids).detach(), first)
    noise.at(8, 0)
    assert not torch.equal(emb(ids).detach(), first)


def test_alpha_zero_is_no_noise_and_scale_formula():
    emb = _embedding()
    ids = torch.randint(0, 50, (2, 8))
    clean = emb(ids).detach()
    NEFTune(emb, alpha=0.0, seed=0, rank=0)
    emb.train()
    assert torch.equal(emb(ids).detach(), clean)
    assert neftune_scale(5.0, 512, 576) == 5.0 / math.sqrt(512 * 576)
    sample = neftune_noise(torch.Size([4, 512, 576]), 5.0, torch.Generator().manual_seed(0))
    # E|U(-b, b)|^2 = b^2 / 3 per element: the noise norm per sequence is alpha / sqrt(3)
    per_sequence = sample.flatten(1).norm(dim=1)
    torch.testing.assert_close(per_sequence, torch.full((4,), 5.0 / math.sqrt(3)), rtol=0.01, atol=0)


def test_dynamic_alpha_follows_the_loss():
    dyn = DynamicAlpha(5.0)
    assert dyn.value() == 5.0
    dyn.update(4.0)
    assert dyn.value() == 5.0
    for _ in range(50):
        dyn.update(2.0)  # the loss halves: alpha follows it down
    assert abs(dyn.value() - 2.5) < 0.05
    dyn.update(float("nan"))  # a NaN loss does not move alpha
    assert abs(dyn.value() - 2.5) < 0.05
    for _ in range(50):
        dyn.update(9.0)  # never above the configured alpha
    assert dyn.value() == 5.0
    restored = DynamicAlpha(5.0)
    restored.load_state_dict(dyn.state_dict())
    assert restored.value() == dyn.value()
