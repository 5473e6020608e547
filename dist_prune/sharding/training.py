"""Training on the partitions: one ZeRO stage behind one interface.

Fine-tuning (train/loop.py), its mask keeping (train/masks.py), its checkpoints (train/resume.py)
and gradient calibration (gradients.py) ask a `Training` for what they need and never look at
DeepSpeed's attributes. `open_training(model, stage, ...)` puts an engine on the ZeRO-3 partitioned
model for the block (sharding/stages.py) and yields one of:

  Zero3Training  (sharding/zero.py) the partitioned model itself: weights, gradients and optimizer state in 1/W flat
                 slices, which is the pruning layout, so masks and scores apply to them as they are;
  Zero2Training  (sharding/zero.py) a whole copy of the weights on every rank (gathered once, written back into the
                 partitions when the block ends); DeepSpeed partitions the gradients and optimizer
                 state in its own flat layout, onto which the masks are mapped;
  DataParallelTraining  (stage 0, sharding/whole.py) a whole fp32 copy on every rank, torch
                 DDP, no engine.

At this interface everything is in the pruning layout: `local_weight(t)` and `local_grad(t)` are
this rank's ZeRO-3 slice of target t (padding cut off), and a mask is a bool tensor over that slice.

A later FSDP2 backend fits the same interface: `local_weight` would be `DTensor.to_local()` (a row
shard, so the pruning stage would use that layout too), `local_grad` the local shard of
`param.grad`, the fp32 masters the parameters themselves next to the optimizer's `state`, and
`state_dict` a reshardable `torch.distributed.checkpoint` state dict, as torchtune's
training/_distributed.py does. It is not built.
"""

from __future__ import annotations

from typing import Callable

import torch

from dist_prune.masking import Target

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state; other optimizers: whatever tensors they keep


class Training:
    """What every stage shares: the engine's forward, backward and step, the learning rate,
    and the optimizer's flat fp32 partitions for checkpoints."""

    stage: int
    description: str  # for the job's summary
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
