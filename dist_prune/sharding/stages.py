"""`open_training`: one ZeRO stage's `Training` on the partitioned model for the length of a block."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from dist_prune.masking import Target
from dist_prune.sharding.engine import temporary_engine
from dist_prune.sharding.partition import partition_dtype, zero3_config
from dist_prune.sharding.training import Training
from dist_prune.sharding.whole import DataParallelTraining, whole_copy
from dist_prune.sharding.zero import Zero2Training, Zero3Training

STAGES: dict[int, type[Training]] = {3: Zero3Training, 2: Zero2Training, 0: DataParallelTraining}


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
    if stage == 0:  # no engine: plain data parallelism on the whole copy
        for p in trained.parameters():
            p.requires_grad_(bool(trainable(p)))
        training = DataParallelTraining(trained, optimizer_for([p for p in trained.parameters() if trainable(p)]),
                                        targets, accumulation=accumulation, max_grad_norm=max_grad_norm)
        yield training
        training.finish(model)
        return
    optimizer = optimizer_for([p for p in trained.parameters() if trainable(p)])
    with temporary_engine(trained, optimizer, config, trainable=trainable) as engine:
        training = STAGES[stage](engine, targets)
        yield training
        training.finish(model)
