"""Training on the partitions: one ZeRO stage behind one interface.

Fine-tuning (train/loop.py), its mask keeping (train/masks.py), its checkpoints (train/resume.py)
and gradient calibration (gradients.py) ask a `Training` for what they need and never look at
DeepSpeed's attributes. `open_training(model, stage, ...)` puts an engine on the ZeRO-3 partitioned
model for the block and yields one of:

  Zero3Training  the partitioned model itself: weights, gradients and optimizer state in 1/W flat
                 slices, which is the pruning layout, so masks and scores apply to them as they are;
  Zero2Training  a whole copy of the weights on every rank (gathered once, written back into the
                 partitions when the block ends); DeepSpeed partitions the gradients and optimizer
                 state in its own flat layout, onto which the masks are mapped.

At this interface everything is in the pruning layout: `local_weight(t)` and `local_grad(t)` are
this rank's ZeRO-3 slice of target t (padding cut off), and a mask is a bool tensor over that slice.

A later FSDP2 backend fits the same interface: `local_weight` would be `DTensor.to_local()` (a row
shard, so the pruning stage would use that layout too), `local_grad` the local shard of
`param.grad`, the fp32 masters the parameters themselves next to the optimizer's `state`, and
`state_dict` a reshardable `torch.distributed.checkpoint` state dict, as torchtune's
training/_distributed.py does. It is not built.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.masking import Target, local_start
from dist_prune.sharding.engine import temporary_engine
from dist_prune.sharding.partition import (gathered, local_range, local_weight, partition_dtype,
                                           zero3_config)

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state; other optimizers: whatever tensors they keep


class Training:
    """What every stage shares: the engine's forward, backward and step, the learning rate,
    and the optimizer's flat fp32 partitions for checkpoints."""

    stage: int
    collective_forward: bool  # a forward gathers weights: every rank must run as many as the others

    def __init__(self, engine, targets: list[Target]):
        self.engine, self.targets = engine, targets
        self.module: torch.nn.Module = engine.module  # what is trained
        self.masks: dict[str, torch.Tensor] = {}

    # -- running ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def loss_scale(self) -> float:
        """What fp16's static loss scale multiplied the gradients by (1 otherwise)."""
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0))

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=ids, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def at_step_boundary(self) -> bool:
        """The next `step()` updates the weights (the last micro-batch of accumulation)."""
        return self.engine.is_gradient_accumulation_boundary()

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -- the pruning layout, and masks in it (per stage) --------------------------------------
    def local_weight(self, target: Target) -> torch.Tensor:
        raise NotImplementedError

    def local_grad(self, target: Target) -> torch.Tensor:
        """This rank's slice of the step's averaged gradient (fp32, a copy)."""
        raise NotImplementedError

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """The masks the next calls keep (bool over each target's local slice; collective)."""
        self.masks = masks

    def mask_gradients(self) -> None:
        """Zero the pruned weights' gradients (before `step()`)."""
        raise NotImplementedError

    def zero_pruned(self, *, moments: bool) -> None:
        """Zero the pruned weights in the fp32 masters and in the copy the model computes with;
        `moments`: their optimizer moments too (when a mask grows, so they cannot push back)."""
        raise NotImplementedError

    def finish(self, partitioned: torch.nn.Module) -> None:
        """The end of training: the trained weights into `partitioned`'s slices (if they are not
        those slices already)."""

    # -- checkpoints ----------------------------------------------------------------------------
    def _flats(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the client optimizer inside DeepSpeed's wrapper

    def has_optimizer_state(self) -> bool:
        return bool(self._optimizer.state)

    def state_dict(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's optimizer partitions (fp32 masters, moments) as tensors, and their step
        counts; the weights the model computes with follow from the masters."""
        tensors, steps = {}, []
        for i, flat in enumerate(self._flats()):
            tensors[f"master.{i}"] = flat.detach().cpu()
            state = self._optimizer.state.get(flat, {})
            tensors.update({f"{k}.{i}": state[k].detach().cpu() for k in MOMENTS if k in state})
            steps.append(float(state["step"]) if "step" in state else None)
        return tensors, {"adam_steps": steps}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict,
                        rank0: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Restore what `state_dict` saved; `rank0()` reads rank 0's tensors if a stage needs
        them."""
        for i, flat in enumerate(self._flats()):
            flat.data.copy_(tensors[f"master.{i}"])
            if meta["adam_steps"][i] is not None:
                self._optimizer.state[flat] = {"step": torch.tensor(meta["adam_steps"][i]),
                                               **{k: tensors[f"{k}.{i}"].to(flat.device) for k in MOMENTS}}


class Zero3Training(Training):
    """ZeRO-3 on the partitioned model, through DeepSpeed's local-partition API."""

    stage, collective_forward = 3, True
    _grads_alias: bool | None = None

    def local_weight(self, target: Target) -> torch.Tensor:
        return local_weight(target.param)

    def local_grad(self, target: Target) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_grad  # lazy: sharding/__init__.py

        start, stop = local_range(target.param)
        # the gradient partition has the padded length of the weight partition; it may be
        # DeepSpeed's own buffer, hence the copy
        return safe_get_local_grad(target.param)[: stop - start].to(torch.float32, copy=True)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # lazy: sharding/__init__.py

        for t in self.targets:
            grad = safe_get_local_grad(t.param)  # padded to the partition length
            grad[: self.masks[t.name].numel()].masked_fill_(self.masks[t.name], 0.0)
            if not self._grad_is_the_partition(t.param, grad):
                safe_set_local_grad(t.param, grad)

    def _grad_is_the_partition(self, param, grad: torch.Tensor) -> bool:
        """Whether safe_get_local_grad handed out the gradient partition itself (fp32 partitions:
        `.float()` of an fp32 tensor is that tensor) rather than a copy. Then writing it back is a
        copy onto itself, 67M elements a step for SmolLM2-135M on 2 ranks."""
        if self._grads_alias is None:
            from deepspeed.utils import safe_get_local_grad  # lazy: sharding/__init__.py

            self._grads_alias = safe_get_local_grad(param).data_ptr() == grad.data_ptr()
        return self._grads_alias

    @torch.no_grad()
    def zero_pruned(self, *, moments: bool) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state  # lazy: sharding/__init__.py

        moments = moments and self.has_optimizer_state()
        for t in self.targets:
            mask = self.masks[t.name]
            safe_get_local_fp32_param(t.param)[: mask.numel()].masked_fill_(mask, 0.0)
            local_weight(t.param).masked_fill_(mask, 0.0)
            for key in MOMENTS if moments else ():
                safe_get_local_optimizer_state(t.param, key)[: mask.numel()].masked_fill_(mask, 0.0)

    def _flats(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.fp32_partitioned_groups_flat)

    def load_state_dict(self, tensors, meta, rank0) -> None:
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: sharding/__init__.py

        super().load_state_dict(tensors, meta, rank0)
        for p in self.module.parameters():  # the 16-bit partitions from the restored masters
            p.ds_tensor.data.copy_(safe_get_local_fp32_param(p))


class Zero2Training(Training):
    """ZeRO-2 on a whole copy of the weights (every rank holds them all). Each whole mask is
    assembled once per mask change and mapped onto the optimizer's partition."""

    stage, collective_forward = 2, False

    def __init__(self, engine, targets: list[Target]):
        super().__init__(engine, targets)
        params = dict(self.module.named_parameters())
        self.params = {t.name: params[t.name] for t in targets}
        self.whole: dict[str, torch.Tensor] = {}
        # a tensor hook runs before DeepSpeed's gradient reduction hooks: the reduced,
        # partitioned and accumulated gradients of pruned weights are exactly zero. The hooks go
        # with the engine (temporary_engine takes off every hook added while it lived).
        for name, p in self.params.items():
            p.register_hook(self._grad_hook(name))

    def _grad_hook(self, name: str):
        def hook(grad):
            whole = self.whole.get(name)
            return grad if whole is None else grad.masked_fill(whole.to(grad.device), 0.0)
        return hook

    def local_weight(self, target: Target) -> torch.Tensor:
        start, stop = local_range(target.param)
        return self.params[target.name].data.reshape(-1)[start:stop]

    def local_grad(self, target: Target) -> torch.Tensor:
        # config validation refuses methods that need it (Method.reads_gradient_partitions)
        raise NotImplementedError("training-time scores need finetune.zero_stage 3")

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        super().set_masks(masks)
        self.whole = {t.name: whole_mask(t, masks[t.name]) for t in self.targets}

    def mask_gradients(self) -> None:
        """Done by the gradient hooks, before DeepSpeed's reduction."""

    @torch.no_grad()
    def zero_pruned(self, *, moments: bool) -> None:
        moments = moments and self.has_optimizer_state()
        for name, p in self.params.items():
            whole = self.whole[name].to(p.device)
            p.data.masked_fill_(whole, 0.0)
            flat = whole.view(-1)
            for key in (None, *MOMENTS) if moments else (None,):
                fragment = self._fragment(p, key)
                if fragment is not None:
                    view, start = fragment
                    view.masked_fill_(flat[start: start + view.numel()].to(view.device), 0.0)

    def _fragment(self, param: torch.nn.Parameter, key: str | None):
        """(view, start): the part of the fp32 master (`key` None) or of optimizer state `key`
        that this rank's partition holds for `param`, and where it starts in the flat param."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None
        start = mapping.lp_fragment_address.start
        if key is None:
            return mapping.hp_fragment, start
        flat = self._flats()[mapping.param_group_index]
        state = self._optimizer.state.get(flat, {})
        if key not in state:
            return None
        address = mapping.hp_fragment_address
        return state[key].narrow(0, address.start, address.numel), start

    def _flats(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

    def state_dict(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict(rank)
        if rank == 0:  # every rank holds the same whole weights: one copy is enough
            tensors.update({f"weight.{n}": p.detach().cpu() for n, p in self.module.named_parameters()})
        return tensors, meta

    def load_state_dict(self, tensors, meta, rank0) -> None:
        super().load_state_dict(tensors, meta, rank0)
        weights = rank0()
        for name, p in self.module.named_parameters():
            p.data.copy_(weights[f"weight.{name}"])

    def finish(self, partitioned: torch.nn.Module) -> None:
        """The trained whole weights into this rank's slices."""
        params = dict(self.module.named_parameters())
        for name, p in partitioned.named_parameters():
            start, stop = local_range(p)
            local_weight(p).copy_(params[name].data.reshape(-1)[start:stop])


STAGES: dict[int, type[Training]] = {3: Zero3Training, 2: Zero2Training}


@contextlib.contextmanager
def open_training(model: torch.nn.Module, stage: int, targets: list[Target],
                  optimizer_for: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], *,
                  trainable: Callable[[torch.nn.Parameter], bool] = lambda p: True,
                  micro_batch: int = 1, accumulation: int = 1, max_grad_norm: float = 0.0,
                  static_loss_scale: float | None = None) -> Iterator[Training]:
    """Train `model` (ZeRO-3 partitioned) at ZeRO `stage` for the length of the block; the
    partitions hold the trained weights afterwards. `optimizer_for(params)` builds the client
    optimizer over the trainable parameters; `static_loss_scale`: fp16's, when no optimizer
    steps would adapt a dynamic one. Collective."""
    dtype = partition_dtype(model)
    config = zero3_config(dtype)
    config["zero_optimization"]["stage"] = stage
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation,
                  gradient_clipping=max_grad_norm, steps_per_print=2**31 - 1, wall_clock_breakdown=False)
    if dtype == torch.float16 and static_loss_scale is not None:
        config["fp16"] = {"enabled": True, "loss_scale": static_loss_scale}
    trained = model if stage == 3 else whole_copy(model)
    optimizer = optimizer_for([p for p in trained.parameters() if trainable(p)])
    with temporary_engine(trained, optimizer, config, trainable=trainable) as engine:
        training = STAGES[stage](engine, targets)
        yield training
        training.finish(model)


def whole_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain (unpartitioned) copy of a ZeRO-3 partitioned model, gathered one parameter at a
    time, for ZeRO stage 2 (which partitions gradients and optimizer state only)."""
    from transformers import AutoModelForCausalLM  # lazy: heavy, and only stage 2 needs it
    from transformers.initialization import no_init_weights

    with no_init_weights():
        whole = AutoModelForCausalLM.from_config(model.config, dtype=partition_dtype(model))
    params = dict(whole.named_parameters())
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
