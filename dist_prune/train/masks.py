"""Masks kept through DeepSpeed optimizer steps.

A pruned weight does not stay zero by itself: AdamW moves it as soon as its gradient
or its moments are non-zero, and DeepSpeed keeps two copies of every weight (the fp32
master in the optimizer, the 16-bit copy the model computes with). So at every step:

  before `step()`  the gradients of pruned weights are zeroed,
  after  `step()`  the mask is applied to the fp32 master and to the 16-bit copy,
  when a mask grows (gradual pruning) the Adam moments of the newly pruned weights are
                   zeroed, so they cannot push the weight back later.

Masks are always held in the layout of the pruning stage: one bool tensor per target
over this rank's ZeRO-3 slice (True = pruned). `Zero3Masks` works on those slices
through DeepSpeed's local-partition API; `Zero2Masks` (stage 2: every rank holds whole
weights) assembles each whole mask once and maps it onto the optimizer's partition.
"""

from __future__ import annotations

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.masking import Target, local_start
from dist_prune.sharding.partition import local_range, local_weight

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state; other optimizers: whatever tensors they keep


class Zero3Masks:
    """Masks over ZeRO-3 slices of `targets`, kept while `engine` (stage 3) trains them."""

    def __init__(self, engine, targets: list[Target], masks: dict[str, torch.Tensor]):
        self.engine, self.targets = engine, targets
        self.masks = {t.name: masks[t.name].clone() for t in targets}
        self.update(self.masks)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for t in self.targets:
            grad = safe_get_local_grad(t.param)  # padded to the partition length
            grad[: self.masks[t.name].numel()].masked_fill_(self.masks[t.name], 0.0)
            safe_set_local_grad(t.param, grad)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights in the fp32 master and in the 16-bit partition."""
        from deepspeed.utils import safe_get_local_fp32_param

        for t in self.targets:
            mask = self.masks[t.name]
            safe_get_local_fp32_param(t.param)[: mask.numel()].masked_fill_(mask, 0.0)
            local_weight(t.param).masked_fill_(mask, 0.0)

    @torch.no_grad()
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """New masks (a superset of the old ones): weights, master and moments follow."""
        from deepspeed.utils import safe_get_local_optimizer_state

        self.masks = {name: m.clone() for name, m in masks.items()}
        self.apply()
        if not _has_state(self.engine):
            return
        for t in self.targets:
            mask = self.masks[t.name]
            for key in MOMENTS:
                safe_get_local_optimizer_state(t.param, key)[: mask.numel()].masked_fill_(mask, 0.0)


class NoMasks:
    """Nothing is pruned and nothing will be (a dense fine-tune): no mask work at all."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def mask_gradients(self) -> None:
        pass

    def apply(self) -> None:
        pass

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        if any(bool(m.any()) for m in masks.values()):
            raise RuntimeError("NoMasks cannot keep masks that prune something")
        self.masks = masks


class Zero2Masks:
    """Masks of `targets` while `engine` (stage 2, whole weights on every rank) trains the
    unpartitioned `model`; `targets` name the same weights in the partitioned model."""

    def __init__(self, engine, model: torch.nn.Module, targets: list[Target],
                 masks: dict[str, torch.Tensor]):
        self.engine = engine
        params = dict(model.named_parameters())
        self.params = {t.name: params[t.name] for t in targets}
        self.targets = targets
        self.masks: dict[str, torch.Tensor] = {}
        self.full: dict[str, torch.Tensor] = {}
        self._hooks = [p.register_hook(self._grad_hook(name)) for name, p in self.params.items()]
        self.update(masks)

    def _grad_hook(self, name: str):
        # a tensor hook runs before DeepSpeed's gradient reduction hooks: the reduced,
        # partitioned and accumulated gradients of pruned weights are exactly zero
        return lambda grad: grad.masked_fill(self.full[name].to(grad.device), 0.0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Done by the gradient hooks, before DeepSpeed's reduction."""

    @torch.no_grad()
    def apply(self) -> None:
        for name, p in self.params.items():
            full = self.full[name].to(p.device)
            p.data.masked_fill_(full, 0.0)
            master = _stage2_fragment(self.engine, p)
            if master is not None:
                view, start = master
                view.masked_fill_(full.view(-1)[start: start + view.numel()], 0.0)

    @torch.no_grad()
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: m.clone() for name, m in masks.items()}
        self.full = {t.name: whole_mask(t, self.masks[t.name]) for t in self.targets}
        self.apply()
        if not _has_state(self.engine):
            return
        for name, p in self.params.items():
            full = self.full[name].view(-1)
            for key in MOMENTS:
                moment = _stage2_fragment(self.engine, p, key)
                if moment is not None:
                    view, start = moment
                    view.masked_fill_(full[start: start + view.numel()].to(view.device), 0.0)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()


def whole_mask(target: Target, local: torch.Tensor) -> torch.Tensor:
    """The full bool mask of a target, assembled from every rank's slice (collective)."""
    full = torch.zeros(target.numel, dtype=torch.uint8)
    start = local_start(target)
    full[start: start + local.numel()] = local.to(torch.uint8)
    return all_reduce_(full).bool().view(target.shape)


def _has_state(engine) -> bool:
    return bool(getattr(engine.optimizer, "optimizer", engine.optimizer).state)


def _stage2_fragment(engine, param: torch.nn.Parameter, key: str | None = None):
    """(view, start): the part of the fp32 master (or of optimizer state `key`) that this
    rank's stage-2 partition holds for `param`, and where it starts in the flat param."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    start = mapping.lp_fragment_address.start
    if key is None:
        return mapping.hp_fragment, start
    flat = engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
    state = engine.optimizer.optimizer.state.get(flat, {})
    if key not in state:
        return None
    address = mapping.hp_fragment_address
    return state[key].narrow(0, address.start, address.numel), start


def local_slices_of(full: torch.Tensor, target: Target) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a whole tensor of `target`'s shape (for scores of stage-2
    weights, which must be selected in the same layout as everywhere else)."""
    start, stop = local_range(target.param)
    return full.reshape(-1)[start:stop]


