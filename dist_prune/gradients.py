"""Stage 2c, calibrate with gradients: per-element gradient statistics of the targets.

Taylor, OBD and SEVEN need dL/dw of every target weight. The model is already
partitioned by `deepspeed.zero.Init` (sharding/partition.py), so a short-lived DeepSpeed ZeRO-3
engine is built on it for the duration of the calibration pass: its hooks gather each
layer for forward and backward, and its gradient hooks reduce-scatter every weight's
gradient straight into the owning rank's partition, so no process ever holds a full
gradient. The engine gets a client optimizer with lr=0 that is never stepped (DeepSpeed
needs one to build its gradient partitions). Afterwards the engine is destroyed and
everything it attached to the model is taken off again (dist_prune/sharding/).

Statistics are accumulated on each rank's own slice of each target, in the slice's
layout (padding excluded), so scorers read them like `LocalSlice.weight`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Collection

import torch
import torch.nn.functional as F

from dist_prune.collectives import all_reduce_, any_rank, rank_and_world
from dist_prune.errors import UserError
from dist_prune.sharding.partition import local_range
from dist_prune.sharding.stages import open_training
from dist_prune.sharding.training import Training

if TYPE_CHECKING:
    from dist_prune.masking import Target

# Per-token statistics. For a linear y = x W^T the gradient w.r.t. W is sum_t delta_t x_t^T over the
# tokens t (delta_t = dL/dy_t); squared (or absolute) per token before the sum, each is one matmul:
# "token_sq" = (delta^2)^T (x^2), the empirical Fisher with one sample per token, "token_abs" =
# |delta|^T |x|. Summed gradients cancel at a trained minimum; these do not
# (benchmarks/results/gradient_methods.md).
TOKEN_STATS = ("token_sq", "token_abs")
# What `accumulate_gradient_stats` can collect ("steps" always comes along).
STATS = ("grad_sum", "grad_sq_sum", "seven", "movement", *TOKEN_STATS)
SEVEN_EPS = 1e-9  # added to v_hat, as in the SEVEN reference code
FP16_LOSS_SCALE = 1024.0  # static: the scaler never adapts without optimizer steps



def step_plan(window_counts: list[int], seq_lens: list[int], micro_batch: int) -> list[int]:
    """Predicted tokens of every global step (one entry per step).

    Rank r runs its windows in order, `micro_batch` at a time; step s is the s-th
    micro-batch of every rank together. A rank whose windows have run out takes part
    with a dummy micro-batch whose loss is multiplied by 0, so every rank runs
    `len(result)` forward/backward passes (each backward holds collectives).
    """
    steps = max((math.ceil(n / micro_batch) for n in window_counts), default=0)
    return [sum(max(0, min(micro_batch, n - s * micro_batch)) * (length - 1)
                for n, length in zip(window_counts, seq_lens)) for s in range(steps)]


def accumulate_gradient_stats(model: torch.nn.Module, windows: torch.Tensor, targets: list["Target"], *,
                              seven_betas: tuple[float, float] = (0.8, 0.9), micro_batch: int = 1,
                              stats: Collection[str] = STATS) -> dict[str, dict[str, torch.Tensor]]:
    """Gradient statistics of every target over this rank's and the other ranks' windows.

    Collective: every rank calls it with the same targets, each with its own share of
    the calibration windows (`windows`: [n_r, seq_len] token ids, n_r may differ across
    ranks and may be 0).

    Step structure. A step is one global batch: rank r's s-th micro-batch of up to
    `micro_batch` windows, for every r. All ranks run the same number of steps, the
    largest number any rank needs; a rank with no windows left in a step runs a dummy
    micro-batch with its loss multiplied by 0 (padding steps, chosen over re-dealing the
    windows so that a rank's data never moves). DeepSpeed averages gradients over the W
    ranks, so each rank's loss is its summed next-token NLL times W / N_s, N_s being the
    number of predicted tokens in the whole global batch of step s: the g of a step is
    exactly the gradient of the mean next-token NLL per token of that global batch,
    whatever the ranks' shares.

    Per target, on this rank's slice (fp32, length = `local_range` size, padding cut off):
      "grad_sum"    = sum_s g_s                           (Taylor: |w * grad_sum|)
      "grad_sq_sum" = sum_s g_s^2                         (OBD: F = grad_sq_sum / steps)
      "steps"       = number of steps S (0-d int64 tensor)
      "seven"       = SEVEN score (SEVENpre: no optimizer step between calibration steps):
                      a = |g_s|, m = b1 m + (1-b1) a, v = b2 v + (1-b2) a^2,
                      m_hat = m / (1 - b1^(s+1)), v_hat = sqrt(v / (1 - b2^(s+1))) + 1e-9,
                      seven += |w * a * m_hat / v_hat|
      "token_sq"    = sum over every token t of all steps of (delta_t x_t^T)^2, delta_t the
                      gradient of its step's mean NLL w.r.t. the linear's output at t
      "token_abs"   = sum_t |delta_t x_t^T|
    `stats` limits what is kept (each is one fp32 copy of the slice; "seven" holds two
    more, m and v, during the call). Only the targets get gradients: the other parameters
    have requires_grad off during the call.

    The model comes back as it went in: the same partition values (the optimizer never
    steps), no DeepSpeed hooks or attributes left, the same requires_grad and train/eval
    flags. During the call it runs in eval mode (no dropout). The targets' partitions do
    move, though: DeepSpeed copies every optimized `param.ds_tensor` into one contiguous
    buffer and points the parameter at it, so a `local_weight` view taken before the call
    no longer aliases the parameter; take views afterwards.
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown gradient statistics {sorted(unknown)} (known: {', '.join(STATS)})")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if windows.ndim != 2:
        raise ValueError(f"windows must be [num_windows, seq_len], got shape {tuple(windows.shape)}")
    rank, world = rank_and_world()
    shares = torch.zeros(world, 2, dtype=torch.long)
    shares[rank] = torch.tensor([windows.shape[0], windows.shape[1]])
    all_reduce_(shares)  # every rank learns every rank's share: the same plan everywhere
    counts, lengths = shares[:, 0].tolist(), shares[:, 1].tolist()
    if any(n > 0 and length < 2 for n, length in zip(counts, lengths)):
        raise UserError("gradient calibration needs windows of at least 2 tokens")
    tokens = step_plan(counts, lengths, micro_batch)
    if not tokens:
        raise UserError("gradient-based scoring needs calibration windows; none were given")
    if not targets:
        return {}
    dummy_len = max(lengths)

    target_ids = {id(t.param) for t in targets}

    def never_stepped(params):  # DeepSpeed builds its gradient partitions for an optimizer
        return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)

    with open_training(model, 3, targets, never_stepped, trainable=lambda p: id(p) in target_ids,
                       micro_batch=micro_batch, static_loss_scale=FP16_LOSS_SCALE) as training:
        training.train(False)
        return _run(training, windows, targets, tokens, world, micro_batch, dummy_len, seven_betas,
                    set(stats))


def token_products(x: torch.Tensor, delta: torch.Tensor, keys: Collection[str]) -> dict[str, torch.Tensor]:
    """The [out, in] sums over tokens of the per-token gradients delta_t x_t^T of a linear, squared
    ("token_sq") or absolute ("token_abs"), for the `keys` asked; x: [..., in], delta: [..., out]."""
    x = x.reshape(-1, x.shape[-1]).float()
    delta = delta.reshape(-1, delta.shape[-1]).float()
    products = {"token_sq": lambda: delta.square().T @ x.square(), "token_abs": lambda: delta.abs().T @ x.abs()}
    return {key: product() for key, product in products.items() if key in keys}


class TokenProducts:
    """Collects "token_sq" / "token_abs" into `acc` (this rank's slices) during backward passes.

    A forward hook on each target's Linear keeps its input x; a hook on the gradient of its output
    forms the [out, in] products over this rank's tokens, one all-reduce sums them over every rank's
    tokens, and each rank adds its own slice (so the full product exists for one target at a time).
    Every rank runs the same backward graph (padding steps too, with a zero loss), so the hooks
    reach the all-reduces in the same order everywhere. `unscale` turns the backpropagated delta
    into the gradient of the step's mean NLL (see `_run`: the loss carries the world size and
    fp16's loss scale)."""

    def __init__(self, targets: list["Target"], acc: dict[str, dict[str, torch.Tensor]], ranges: dict,
                 unscale: float):
        self.acc, self.ranges, self.unscale = acc, ranges, unscale
        self.handles = [t.module.register_forward_hook(self._forward(t.name)) for t in targets
                        if set(TOKEN_STATS) & set(acc[t.name])]

    def _forward(self, name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda delta: self._add(name, x, delta))
        return hook

    def _add(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        start, stop = self.ranges[name]
        acc = self.acc[name]
        for key, full in token_products(x, delta.detach() * self.unscale, acc.keys()).items():
            acc[key].add_(all_reduce_(full.reshape(-1))[start:stop].to(acc[key].device))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def new_stats(size: int, keep: Collection[str], device=None) -> dict[str, torch.Tensor]:
    """Zeroed accumulators for one slice of `size` elements (SEVEN's moments as "_m", "_v")."""
    names = [k for k in STATS if k in keep] + (["_m", "_v"] if "seven" in keep else [])
    return {k: torch.zeros(size, dtype=torch.float32, device=device) for k in names}


def update_stats(acc: dict[str, torch.Tensor], grad: torch.Tensor, weight: torch.Tensor | None,
                 step: int, betas: tuple[float, float] = (0.8, 0.9)) -> None:
    """Add step `step` (0-based) with gradient `grad` to the accumulators of `new_stats`.
    `weight` (the slice's current weights) is needed only for "seven" and "movement"."""
    if "grad_sum" in acc:
        acc["grad_sum"].add_(grad)
    if "grad_sq_sum" in acc:
        acc["grad_sq_sum"].addcmul_(grad, grad)
    if "seven" in acc:
        b1, b2 = betas
        a = grad.abs()
        acc["_m"].mul_(b1).add_(a, alpha=1 - b1)
        acc["_v"].mul_(b2).addcmul_(a, a, value=1 - b2)
        m_hat = acc["_m"] / (1 - b1 ** (step + 1))
        v_hat = (acc["_v"] / (1 - b2 ** (step + 1))).sqrt_().add_(SEVEN_EPS)
        acc["seven"].add_((weight.to(torch.float32) * a * m_hat / v_hat).abs_())
    if "movement" in acc:  # Sanh et al. 2020: S -= w * dL/dw, weights moving away from 0 score high
        acc["movement"].sub_(weight.to(torch.float32) * grad)


def _run(training: Training, windows, targets, tokens, world, micro_batch, dummy_len, betas,
         keep) -> dict[str, dict[str, torch.Tensor]]:
    acc: dict[str, dict[str, torch.Tensor]] = {}
    for t in targets:
        view = training.local_weight(t)
        acc[t.name] = new_stats(view.numel(), keep, view.device)
    loss_scale = training.loss_scale
    # the loss below is the step's summed NLL x world / tokens, times fp16's loss scale
    tokens_of = TokenProducts(targets, acc, {t.name: local_range(t.param) for t in targets},
                              1.0 / (world * loss_scale))
    try:
        _steps(training, windows, targets, tokens, world, micro_batch, dummy_len, betas, keep, acc)
    finally:
        tokens_of.close()
    steps = torch.tensor(len(tokens), dtype=torch.long)
    finite = all(bool(torch.isfinite(v).all()) for a in acc.values() for v in a.values())
    if any_rank(not finite):  # every rank raises, or none
        raise RuntimeError("gradient calibration produced NaN or Inf gradients (with float16 "
                           "weights, try model.dtype bfloat16 or float32)")
    return {name: {**{k: v for k, v in a.items() if not k.startswith("_")}, "steps": steps}
            for name, a in acc.items()}


def _steps(training: Training, windows, targets, tokens, world, micro_batch, dummy_len, betas, keep,
           acc) -> None:
    device, loss_scale = training.device, training.loss_scale
    step_stats = keep - set(TOKEN_STATS)  # what the step's gradient partitions give
    for step, step_tokens in enumerate(tokens):
        chunk = windows[step * micro_batch: (step + 1) * micro_batch]
        scale = world / step_tokens  # DeepSpeed divides by world: g = grad of the global mean
        if len(chunk) == 0:  # this rank's windows have run out: a zero-loss padding step
            chunk, scale = torch.zeros(1, dummy_len, dtype=windows.dtype), 0.0
        chunk = chunk.to(device)
        logits = training.logits(chunk)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                              chunk[:, 1:].reshape(-1), reduction="sum")
        training.backward(nll * scale)
        del logits, nll
        for t in targets if step_stats else ():
            grad = training.local_grad(t)  # a copy, padding cut off
            if loss_scale != 1.0:
                grad = grad / loss_scale
            weight_now = training.local_weight(t) if {"seven", "movement"} & keep else None
            update_stats(acc[t.name], grad, weight_now, step, betas)
        # reset the partitioned gradients: ZeRO-3 copies (does not accumulate) into them at
        # the next backward only once its micro-step counter is back at 0
        training.zero_grad()
