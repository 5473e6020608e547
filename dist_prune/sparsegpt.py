"""SparseGPT (Frantar & Alistarh 2023): OBS pruning of one linear from its input Hessian.

Follows the reference code IST-DASLab/sparsegpt (`sparsegpt.py`, `fasterprune`):
H = 2 X^T X / n over the calibration tokens, damped by `percdamp * mean(diag H)`, and the upper
Cholesky factor of H^-1 drives both the saliency w^2 / [H^-1]_jj^2 and the column-by-column
error compensation. Differences from the reference, all deliberate:
- the unstructured cut prunes exactly round(sparsity * tile size) entries per rows x block tile
  (the reference's `score <= sorted[int(k)]` prunes one more, and more again on ties);
- a failed Cholesky is retried with 10x the damping instead of crashing (never magnitude);
- H is normalised by the number of tokens, not of sequences.
"""

from __future__ import annotations

import logging

import torch

from dist_prune.calibrate import InputCollector
from dist_prune.collectives import all_reduce_

log = logging.getLogger(__name__)

# Damping of the first retry when the requested one is 0: with the default 5 retries the
# sequence 0, 1e-6, ..., 1e-2 ends at the reference's default percdamp.
FIRST_RETRY_DAMP = 1e-6


class HessianCollector(InputCollector):
    """Forward hooks that accumulate, per linear, H_sum = sum_t x_t x_t^T and the token count.

    H_sum is float32, like the reference: the 1% damping bounds the condition number of what is
    factorised far above float32 rounding (~1e-7 relative, matmuls sum pairwise), and a float64
    [in, in] matrix per linear would double the largest buffer of the stage (11008^2 * 8 B ~ 1 GB
    for a 7B model's down_proj). x^T x is computed on the input's device (a GPU when there is one),
    then added to the accumulator on `device` (default: the module's weight device, so that the
    all_reduce runs on the device the backend wants: CUDA for nccl, CPU for gloo).
    """

    def __init__(self, linears: dict[str, torch.nn.Module], device: torch.device | str | None = None):
        super().__init__(linears)
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}  # allocated on first input: shared ones never are
        self.tokens = dict.fromkeys(linears, 0)

    def _zeros(self, name: str) -> torch.Tensor:
        m = self.linears[name]
        return torch.zeros(m.in_features, m.in_features, dtype=torch.float32,
                           device=self.device if self.device is not None else _home(m))

    def _accumulate(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = self._zeros(name)
        acc += (x.T @ x).to(acc.device)
        self.tokens[name] += x.shape[0]

    def _reduce_owned(self, names: list[str]) -> dict[str, dict]:
        """{name: {"hessian", "tokens"}}: hessian = 2 * H_sum / tokens (zeros when no token was
        seen: every column is then dead)."""
        for name in names:
            all_reduce_(self.sums.setdefault(name, self._zeros(name)))
        counts = all_reduce_(torch.tensor([self.tokens[n] for n in names], dtype=torch.long))
        self.tokens.update(zip(names, counts.tolist()))
        return {name: {"hessian": self.sums[name] * (2.0 / max(self.tokens[name], 1)), "tokens": self.tokens[name]}
                for name in names}


def _home(module: torch.nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float, max_damp_retries: int) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = (H + damp I)^-1), damp = percdamp * mean diag.

    U's row i holds what the reference calls Hinv[i, i:]: the inverse Hessian of the columns
    not yet pruned when column i is, so the sequential updates need no re-inversion.
    A failed factorisation (or a non-finite result) is retried with 10x the damping.
    """
    mean_diag = hessian.diagonal().mean().item()
    damp, tried = percdamp * mean_diag, []
    for _ in range(max_damp_retries + 1):
        tried.append(damp)
        damped = hessian.clone()
        damped.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                if len(tried) > 1:  # not silent: the caller asked for less damping than was used
                    log.warning("SparseGPT: Cholesky needed damping %.3g x mean(diag H) (asked %.3g)",
                                damp / mean_diag, percdamp)
                return upper
        damp = damp * 10 if damp > 0 else FIRST_RETRY_DAMP * mean_diag
    raise RuntimeError(
        f"SparseGPT: Cholesky factorisation of the damped Hessian [{hessian.shape[0]}x{hessian.shape[1]}] "
        f"failed in {len(tried)} attempt(s), damping x mean(diag H) = "
        f"{', '.join(f'{d / mean_diag:.3g}' for d in tried)}; raise percdamp or max_damp_retries, "
        "or calibrate on more tokens")


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k smallest entries of `scores` (ties broken arbitrarily)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(k, largest=False).indices] = True
    return flat.view_as(scores)


def _prune_block(W: torch.Tensor, Hinv: torch.Tensor, mask: torch.Tensor, start: int, end: int,
                 quota: int, n: int, m: int) -> None:
    """Prune columns [start, end) of W in place (`quota` of the tile unstructured, else n of every
    m), set mask there, push the error right of `end`."""
    W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
    d, M1, Err1 = Hinv1.diagonal(), mask[:, start:end], torch.zeros_like(W1)
    if n == 0:  # one cut over the whole rows x block tile, from the weights as updated so far
        M1 |= _smallest(W1 ** 2 / d ** 2, quota)
    for i in range(end - start):
        if n and i % m == 0:  # n:m groups are chosen lazily, after the updates of earlier columns
            scores = W1[:, i:i + m] ** 2 / d[i:i + m] ** 2
            M1[:, i:i + m].scatter_(1, scores.topk(n, dim=1, largest=False).indices, True)
        w = W1[:, i]
        q = w.masked_fill(M1[:, i], 0)
        err = (w - q) / d[i]
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # OBS update of the columns not yet fixed
        W1[:, i] = q  # the update leaves w - err * d ~ q up to rounding; pruned ones must be exactly 0
        Err1[:, i] = err
    W[:, start:end] = W1
    W[:, end:] -= Err1 @ Hinv[start:end, end:]  # lazy batch update of the later blocks


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
                    prune_n: int = 0, prune_m: int = 0, pruned: int | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, max_damp_retries: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS pruning of one linear weight [out, in] given its input Hessian [in, in].

    Returns (weight with the pruned entries exactly 0, in weight's dtype; bool mask, True = pruned).
    Unstructured: each rows x `blocksize` tile (the last one may be narrower) gets exactly
    round(sparsity * tile numel) pruned; with `pruned`, exactly that many in the tensor, the tiles
    getting round(pruned * columns so far / in) - the same before them (OWL's per-tensor budgets). n:m (prune_n > 0): every prune_m consecutive inputs of
    every row have exactly prune_n pruned; `sparsity` is then ignored.
    Dead inputs (H_ii == 0) get H_ii = 1 and W[:, i] = 0 as in the reference; their score is 0, so
    they are the first pruned, but when a tile or group has more of them than its quota the extra
    ones are zeros outside the mask (the mask keeps the requested sparsity exact).
    The maths runs in float32 on weight's device.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not match")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if prune_n or prune_m:
        if not 0 < prune_n <= prune_m or blocksize % prune_m or weight.shape[1] % prune_m:
            raise ValueError(f"n:m = {prune_n}:{prune_m} needs 0 < n <= m, m dividing blocksize "
                             f"{blocksize} and in_features {weight.shape[1]}")
    elif not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if pruned is not None and not 0 <= pruned <= weight.numel():
        raise ValueError(f"cannot prune {pruned} of {weight.numel()} weights")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("SparseGPT: the Hessian has non-finite entries")

    W = weight.detach().to(torch.float32, copy=True)
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    dead = H.diagonal() == 0  # inputs always 0 on the calibration data: no information on them
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    Hinv = damped_inverse_cholesky(H, percdamp, max_damp_retries)

    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    rows, cols = W.shape
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        quota = (round(sparsity * rows * (end - start)) if pruned is None else
                 round(pruned * end / cols) - round(pruned * start / cols))
        _prune_block(W, Hinv, mask, start, end, quota, prune_n, prune_m)
    return W.to(weight.dtype), mask
