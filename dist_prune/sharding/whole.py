"""Training on a whole copy of the weights on every rank: what ZeRO stage 2 (sharding/zero.py)
and plain data parallelism (stage 0, here) share, and the copy itself."""

from __future__ import annotations

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.masking import Target, local_start
from dist_prune.sharding.partition import gathered, local_range, local_weight, model_device, partition_dtype
from dist_prune.sharding.training import MOMENTS, Training


class WholeWeights:
    """Training on a whole copy of the weights on every rank (ZeRO 2, data parallel): each whole
    mask is assembled once per mask change (collective), the pruned gradients are zeroed, and the
    trained weights go back into the slices at the end."""

    def _hold_whole(self, module: torch.nn.Module, targets: list[Target], *, hooks: bool) -> None:
        params = dict(module.named_parameters())
        self.params = {t.name: params[t.name] for t in targets}
        self.whole: dict[str, torch.Tensor] = {}
        # `hooks`: a tensor hook runs before the gradient reduction hooks (DeepSpeed's): the
        # reduced, partitioned and accumulated gradients of pruned weights are exactly zero. The
        # hooks go with the copy, which is dropped at the end of training.
        for name, p in self.params.items() if hooks else ():
            p.register_hook(self._grad_hook(name))

    def _grad_hook(self, name: str):
        def hook(grad):
            whole = self.whole.get(name)
            return grad if whole is None else grad.masked_fill(whole.to(grad.device), 0.0)
        return hook

    def local_weight(self, target: Target) -> torch.Tensor:
        start, stop = local_range(target.param)
        return self.params[target.name].data.reshape(-1)[start:stop]

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self.whole = {t.name: whole_mask(t, masks[t.name]) for t in self.targets}

    def mask_gradients(self) -> None:
        """Done by the gradient hooks, before the reduction (ZeRO 2)."""

    def finish(self, partitioned: torch.nn.Module) -> None:
        """The trained whole weights into this rank's slices."""
        params = dict(self.module.named_parameters())
        for name, p in partitioned.named_parameters():
            start, stop = local_range(p)
            local_weight(p).copy_(params[name].data.reshape(-1)[start:stop])


class DataParallelTraining(WholeWeights, Training):
    """No ZeRO: plain data parallelism (torch DistributedDataParallel) on a whole fp32 copy per
    rank, the optimizer's state whole on every rank too. For a model whose weights, gradients and
    AdamW state (16 bytes per parameter) fit a worker, this avoids ZeRO's per-layer gathers and
    partition copies, which took most of a ZeRO-3 step of SmolLM2-135M on 2 CPU ranks
    (benchmarks/results/finetune_speed_profile.md). No DeepSpeed engine: the fp32 weights are
    the masters, so there is no 16-bit copy to keep in step."""

    stage, collective_forward, description = 0, False, "data parallel (a whole copy per worker)"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, targets: list[Target], *,
                 accumulation: int, max_grad_norm: float):
        from torch.nn.parallel import DistributedDataParallel

        self.engine, self.targets, self.module, self.masks, self.keep = None, targets, module, {}, {}
        self.optimizer, self.accumulation, self.max_grad_norm = optimizer, accumulation, max_grad_norm
        # DDP's reduced gradients are whole on every rank: the pruned ones are zeroed in place once
        # per step (mask_gradients), not by a hook that allocates a masked copy of every target
        # gradient of every micro-batch.
        self._hold_whole(module, targets, hooks=False)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        # gradient_as_bucket_view: the gradients are the all-reduce buckets themselves, not copied
        # into them and back (2 x 0.54 GB a step for SmolLM2-135M in fp32). The buffers (rotary
        # frequencies) are the same on every rank: no broadcast before each forward.
        self.parallel = DistributedDataParallel(module, forward_sync_buffers=False, gradient_as_bucket_view=True) \
            if world > 1 else module
        self._micro = 0  # micro-batches run so far

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def loss_scale(self) -> float:
        return 1.0

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is not self.module:  # reduce the gradients only with the last micro-batch
            self.parallel.require_backward_grad_sync = self.at_step_boundary()
        return self.parallel(input_ids=ids, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # as DeepSpeed: the mean over the accumulated micro-batches

    def at_step_boundary(self) -> bool:
        return (self._micro + 1) % self.accumulation == 0

    def step(self) -> None:
        if self.at_step_boundary():
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._micro += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        super().set_masks(masks)
        # 1 where kept, as uint8: multiplying by it is 6x faster than masked_fill_ with the bool
        # mask (0.07 s against 0.42 s a step over SmolLM2-135M's 106M target gradients, 1 thread)
        # On the weights' device, once per mask change: not copied there at every step.
        self.keep = {name: (~whole).to(self.params[name].device, torch.uint8) for name, whole in self.whole.items()}

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """After the reduction, before clipping: the mean of the ranks' gradients of a pruned
        weight becomes 0, as if every rank had zeroed its own (-0.0 where it was negative: AdamW
        moves it by exactly 0 all the same)."""
        for name, p in self.params.items():
            if p.grad is not None and name in self.keep:
                p.grad.mul_(self.keep[name])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def local_grad(self, target: Target) -> torch.Tensor:
        start, stop = local_range(target.param)
        grad = self.params[target.name].grad  # reduced over the ranks (mean), whole
        return grad.reshape(-1)[start:stop].to(torch.float32, copy=True)

    @torch.no_grad()
    def zero_pruned(self, *, moments: bool) -> None:
        for name, p in self.params.items():
            whole = self.whole[name].to(p.device)
            p.data.masked_fill_(whole, 0.0)
            state = self.optimizer.state.get(p, {}) if moments else {}
            for key in MOMENTS:
                if key in state:
                    state[key].masked_fill_(whole, 0.0)

    def state_dict(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Every rank holds the same weights and optimizer state: rank 0 saves them."""
        tensors, steps = {}, []
        for i, (name, p) in enumerate(self.module.named_parameters()):
            state = self.optimizer.state.get(p, {})
            steps.append(float(state["step"]) if "step" in state else None)
            if rank == 0:
                tensors[f"weight.{name}"] = p.detach().cpu()
                tensors.update({f"{k}.{i}": state[k].detach().cpu() for k in MOMENTS if k in state})
        return tensors, {"adam_steps": steps}

    def load_state_dict(self, tensors, meta, rank0) -> None:
        saved = rank0()
        for i, (name, p) in enumerate(self.module.named_parameters()):
            p.data.copy_(saved[f"weight.{name}"])
            if meta["adam_steps"][i] is not None:
                self.optimizer.state[p] = {"step": torch.tensor(meta["adam_steps"][i]),
                                           **{k: saved[f"{k}.{i}"].to(p.device) for k in MOMENTS}}


def whole_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain (unpartitioned) copy of a ZeRO-3 partitioned model, gathered one parameter at a
    time, for ZeRO stage 2 (which partitions gradients and optimizer state only)."""
    from transformers import AutoModelForCausalLM  # lazy: heavy, and only stage 2 needs it
    from transformers.initialization import no_init_weights

    with no_init_weights():
        whole = AutoModelForCausalLM.from_config(model.config, dtype=partition_dtype(model))
    # from_config under no_init_weights leaves tied embeddings untied (transformers 5.25): lm_head
    # stayed uninitialised, absent from the partitioned model's parameters, and SmolLM2 trained at
    # stage 0 against garbage logits (loss 10.8 = ln(vocab) on a model whose own loss is 3.4)
    whole.tie_weights()
    whole.to(model_device(model))
    params = dict(whole.named_parameters())
    if params.keys() != dict(model.named_parameters()).keys():  # a parameter nothing would copy into
        missing = sorted(params.keys() ^ dict(model.named_parameters()).keys())
        raise RuntimeError(f"the whole copy's parameters differ from the model's: {', '.join(missing[:5])}")
    for name, p in model.named_parameters():
        with gathered([p]):
            params[name].data.copy_(p.data.reshape(params[name].shape))
    whole.train(model.training)
    return whole


def whole_mask(target: Target, local: torch.Tensor) -> torch.Tensor:
    """The full bool mask of a target, assembled from every rank's slice (collective)."""
    full = torch.zeros(target.numel, dtype=torch.uint8)
    start = local_start(target)
    full[start: start + local.numel()] = local.to(torch.uint8)
    return all_reduce_(full).bool().view(target.shape)
