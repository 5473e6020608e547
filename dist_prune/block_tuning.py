"""Block reconstruction after a layer's linears are pruned: the kept weights of one decoder layer
are tuned by Adam, masks fixed, so that the pruned layer's output follows the dense layer's on the
calibration windows (the block-wise reconstruction of EBFT, Guo et al. 2024, and BESA).

A per-linear reconstruction (SparseGPT, ADMM) makes each linear's output follow its dense output
on that linear's own inputs, one linear at a time. It cannot see what the layer does with them:
the attention softmax, SiLU's gate, the residual stream. Tuning the layer as a whole minimises
the error that the next layer actually receives,

    min_W  sum_windows || layer(X; W * keep) - Y ||^2 / sum_windows ||Y||^2,

with X the windows entering the pruned layer (the outputs of the already-pruned layers before it)
and Y the dense model's outputs of the same layer (pruning.prune keeps the dense hidden
states beside the pruned ones), so a layer also corrects what the layers before it left. The pruned
entries stay exactly zero: the layer runs on W * keep, so their gradients are zero too.

Distributed: each rank holds its own calibration windows; every step, each rank's gradient of its
micro-batch is all-reduced before Adam, so every rank takes the very same steps. The same number of
steps on every rank: a rank with fewer micro-batches contributes zero gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.layerwise import Batch
from dist_prune.sharding.partition import gathered, local_range, local_weight
from dist_prune.sharding.whole import whole_mask


@dataclass
class Tuned:
    """The tuned full weights (pruned entries 0) and the relative output error before and after,
    summed over every rank's windows. When tuning did not lower the error, `weights` is empty and
    the layer keeps the reconstruction's weights."""

    weights: dict[str, torch.Tensor]
    error_before: float
    error_after: float


def _output(layer: torch.nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    out = functional_call(layer, params, (batch.hidden,), dict(batch.layer_kwargs))
    return out[0] if isinstance(out, tuple) else out


def relative_error(layer: torch.nn.Module, params: dict[str, torch.Tensor], batches: list,
                   targets: list[torch.Tensor]) -> float:
    """sum ||layer(X) - Y||^2 / sum ||Y||^2 over every rank's batches (collective)."""
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch, target in zip(batches, targets):
            diff = _output(layer, params, batch).float() - target.float()
            sums[0] += float(diff.pow(2).sum())
            sums[1] += float(target.float().pow(2).sum())
    all_reduce_(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else 0.0


def tune_layer(layer: torch.nn.Module, weights: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor],
               batches: list, targets: list[torch.Tensor], *, epochs: int, lr: float) -> Tuned:
    """Tune `weights` ({parameter name in `layer`: full weight}) with their masks `pruned` (bool,
    True = pruned, full shape) so that layer(batch) follows each target. `layer` runs whole
    (gathered); its other parameters stay as they are. Collective: every rank calls it with the
    same weights; `batches` (layerwise.Batch) and `targets` are this rank's own. A cosine learning
    rate from `lr` to 0 over the `epochs` passes."""
    keep = {name: (~pruned[name]).to(w.dtype) for name, w in weights.items()}
    params = {name: (w.detach().float() * keep[name]).requires_grad_() for name, w in weights.items()}

    def masked() -> dict[str, torch.Tensor]:
        return {name: (p * keep[name]).to(weights[name].dtype) for name, p in params.items()}

    before = relative_error(layer, masked(), batches, targets)
    # the same number of steps on every rank, and one loss scale: the whole step's target energy
    steps_per_epoch = int(all_reduce_(torch.tensor([len(batches)]), op=torch.distributed.ReduceOp.MAX)[0])
    energy = [float(t.float().pow(2).sum()) for t in targets]
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    total = max(1, epochs * steps_per_epoch)
    names = list(params)
    for step in range(epochs * steps_per_epoch):
        index = step % steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        if index < len(batches):
            scale = all_reduce_(torch.tensor([energy[index]], dtype=torch.float64))
            diff = _output(layer, masked(), batches[index]).float() - targets[index].float()
            loss = diff.pow(2).sum() / float(scale[0])
            grads = torch.autograd.grad(loss, [params[n] for n in names])
        else:
            all_reduce_(torch.zeros(1, dtype=torch.float64))  # the scale's collective
            grads = [torch.zeros_like(params[n]) for n in names]
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        for name, g in zip(names, flat.split([params[n].numel() for n in names])):
            params[name].grad = g.view_as(params[name])
        optimizer.step()
    tuned = {name: w.detach() for name, w in masked().items()}
    after = relative_error(layer, tuned, batches, targets)
    return Tuned(tuned if after < before else {}, before, after)


def in_steps(batches: list[Batch], windows: int) -> list[Batch]:
    """`batches` re-cut into `windows` windows each, in order (the last may hold fewer). The layer
    arguments must be the same for every window (rotary tables of batch size 1, no padding mask):
    they are shared by every new batch."""
    if not batches:
        return []
    kwargs = batches[0].layer_kwargs
    for value in kwargs.values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 1 and tensor.shape[0] != 1:
                raise RuntimeError("block tuning re-batches the calibration windows; this model passes its "
                                   f"layers per-window arguments of shape {tuple(tensor.shape)}")
    hidden = torch.cat([b.hidden for b in batches])
    return [Batch(chunk, kwargs) for chunk in hidden.split(windows)]


def tune_pruned_layer(layer: torch.nn.Module, targets: list, pruned: dict[str, torch.Tensor], batches: list[Batch],
                      dense_outputs: list[Batch], *, epochs: int, lr: float, windows_per_step: int) -> Tuned:
    """tune_layer on a ZeRO-3 partitioned decoder layer: `targets` (masking.Target) its pruned
    weights and `pruned` their local masks (True = pruned); `batches` this rank's calibration
    windows entering the layer, `dense_outputs` the dense model's outputs of the layer for them. A step takes `windows_per_step` windows
    over all ranks, windows [s G, (s + 1) G) of the dealt order (rank r holds windows r, r + W, ...),
    so every world size takes the same steps. The tuned weights are written into every rank's
    partitions. Collective."""
    _, world = rank_and_world()
    per_rank = windows_per_step // world
    names = {id(p): n for n, p in layer.named_parameters()}
    full_masks = {names[id(t.param)]: whole_mask(t, pruned[t.name]).to(pruned[t.name].device) for t in targets}
    with gathered(layer.parameters()):
        weights = {names[id(t.param)]: t.param.data for t in targets}
        tuned = tune_layer(layer, weights, full_masks, in_steps(batches, per_rank),
                           [b.hidden for b in in_steps(dense_outputs, per_rank)], epochs=epochs, lr=lr)
    for t in targets:
        if names[id(t.param)] in tuned.weights:
            start, stop = local_range(t.param)
            local_weight(t.param).copy_(tuned.weights[names[id(t.param)]].reshape(-1)[start:stop])
    return tuned
