"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training.

noise = Uniform(-1, 1) * alpha / sqrt(L * d), L the sequence length and d the hidden
size, as in transformers' `integrations/neftune.py`: the expected norm of the noise
over a sequence is independent of L and d. Only in training mode; evaluation and
export never see it.

The noise of each micro-batch comes from a generator seeded by (seed, step, rank,
micro-batch), so a run resumed from a checkpoint draws exactly the noise the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import math

import torch


def neftune_scale(alpha: float, seq_len: int, hidden: int) -> float:
    """Bound of |noise| per element: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * hidden)


def neftune_noise(shape: torch.Size, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform(-s, s) noise, s = alpha / sqrt(L * d), for embeddings of `shape` [..., L, d]."""
    bound = neftune_scale(alpha, shape[-2], shape[-1])
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound


class NEFTune:
    """A forward hook that adds NEFTune noise to the output of the input embeddings.
    `alpha` may change between steps (dynamic alpha); call `at(step, micro)` before every
    training forward so the noise is reproducible."""

    def __init__(self, embeddings: torch.nn.Module, alpha: float, seed: int, rank: int):
        self.alpha, self.seed, self.rank = alpha, seed, rank
        self.generator = torch.Generator()
        self.at(0, 0)
        self._handle = embeddings.register_forward_hook(self._hook)

    def at(self, step: int, micro: int) -> None:
        self.generator.manual_seed(hash((self.seed, step, self.rank, micro)) & (2**63 - 1))

    def _hook(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha == 0.0:
            return output
        noise = neftune_noise(output.shape, self.alpha, self.generator)
        return output + noise.to(output.device, output.dtype)

    def remove(self) -> None:
        self._handle.remove()


class DynamicAlpha:
    """alpha_t = alpha * min(1, EMA(loss)_t / loss_0).

    What it follows: the training loss, relative to the loss of the first step. Why: the
    noise is a regulariser. Right after pruning the model is far from a good solution and
    the loss is high; full noise there helps it settle in a flat region (what NEFTune
    is credited with). As the sparse model recovers, the loss falls and the same noise
    would be a growing share of what is left to learn, so it is scaled down with the
    loss. An exponential moving average (decay 0.9) keeps one noisy batch from moving
    alpha. State (loss_0, ema) is saved with every checkpoint.
    """

    decay = 0.9

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.loss_0: float | None = None
        self.ema: float | None = None

    def value(self) -> float:
        if self.loss_0 is None or self.ema is None or self.loss_0 <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.ema / self.loss_0)

    def update(self, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if self.loss_0 is None:
            self.loss_0 = self.ema = loss
        else:
            self.ema = self.decay * self.ema + (1 - self.decay) * loss

    def state_dict(self) -> dict:
        return {"loss_0": self.loss_0, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.loss_0, self.ema = state["loss_0"], state["ema"]
