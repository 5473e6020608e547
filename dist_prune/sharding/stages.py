"""`open_training`: one ZeRO stage's `Training` on the partitioned model for the length of a block,
and `agreed_stage`: which stage `finetune.zero_stage: auto` means for this model on these workers."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.masking import Target
from dist_prune.sharding.engine import temporary_engine
from dist_prune.sharding.partition import full_numel, model_device, partition_dtype, zero3_config
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
    trained = model if stage == 3 else whole_copy(model)
    optimizer = optimizer_for([p for p in trained.parameters() if trainable(p)])
    if stage == 0:  # no engine: plain data parallelism on the whole copy
        for p in trained.parameters():
            p.requires_grad_(bool(trainable(p)))
        training = DataParallelTraining(trained, optimizer, targets, accumulation=accumulation,
                                        max_grad_norm=max_grad_norm)
        yield training
        training.finish(model)
        return
    config = _deepspeed_config(partition_dtype(model), stage, micro_batch, accumulation, max_grad_norm,
                               static_loss_scale)
    with temporary_engine(trained, optimizer, config, trainable=trainable) as engine:
        training = STAGES[stage](engine, targets)
        yield training
        training.finish(model)


def _deepspeed_config(dtype: torch.dtype, stage: int, micro_batch: int, accumulation: int,
                      max_grad_norm: float, static_loss_scale: float | None) -> dict:
    config = zero3_config(dtype)
    config["zero_optimization"]["stage"] = stage
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation,
                  gradient_clipping=max_grad_norm, steps_per_print=2**31 - 1, wall_clock_breakdown=False)
    if dtype == torch.float16 and static_loss_scale is not None:
        config["fp16"] = {"enabled": True, "loss_scale": static_loss_scale}
    return config

# Stage 0 holds, whole on every worker: fp32 weights, gradients and AdamW's two moments.
BYTES_PER_PARAMETER = 16
# ... in at most this share of what a worker can count on: the rest is for activations, the
# partitioned model the job keeps, the token windows and the interpreter.
MEMORY_SHARE = 0.5


def choose_stage(requested: str, *, parameters: int, dtype: torch.dtype, free_bytes: int) -> int:
    """The stage `finetune.zero_stage` names; for "auto": plain data parallelism (0) when the model
    computes in float32 and its training state fits, ZeRO-3 otherwise. Stage 0 ran a masked
    SmolLM2-135M step in 3.45 s against 5.48 s at ZeRO-3 on 2 CPU workers
    (benchmarks/results/finetune_speed_stages.md); ZeRO-3 is the one whose memory per worker
    shrinks with the number of workers."""
    if requested != "auto":
        return int(requested)
    fits = parameters * BYTES_PER_PARAMETER <= MEMORY_SHARE * free_bytes
    return 0 if dtype == torch.float32 and fits else 3


def free_memory_bytes(device: torch.device) -> int:
    """What one worker can count on: free GPU memory, or the node's available RAM shared by the
    workers on it (LOCAL_WORLD_SIZE, which Ray Train and torchrun set)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory, less a margin
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def agreed_stage(requested: str, model: torch.nn.Module) -> int:
    """`choose_stage` on every rank, and the largest answer for all (one rank short of memory
    makes it ZeRO-3 everywhere). Collective."""
    stage = choose_stage(requested, parameters=sum(full_numel(p) for p in model.parameters()),
                         dtype=partition_dtype(model), free_bytes=free_memory_bytes(model_device(model)))
    return int(all_reduce_(torch.tensor([stage]), op=torch.distributed.ReduceOp.MAX).item())
