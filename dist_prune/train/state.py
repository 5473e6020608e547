"""What the fine-tuning loop hands its caller and its checkpoints: the state that is not the
optimizer's tensors, and the hooks through which it reports (MLflow, Ray Train checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class TrainState:
    """What a checkpoint holds besides the optimizer's tensors (resume.py)."""

    step: int = 0  # optimizer steps done
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    alpha: dict = field(default_factory=dict)  # DynamicAlpha state
    history: list[dict] = field(default_factory=list)  # logged metrics, step by step
    zero_stage: int | None = None  # the stage the run trained at (finetune.zero_stage auto resolved)
    sharding: str = ""  # that stage, in words


@dataclass
class Hooks:
    """What the loop reports to the outside world (rank-0 MLflow logging, Ray checkpoints)."""

    log: Callable[[int, dict], None] = lambda step, metrics: None
    checkpoint: Callable[[TrainState, object, dict], None] | None = None  # (state, Training, metrics)
    resume: Path | None = None  # a checkpoint directory to restore from (resume.py)
    metrics: dict = field(default_factory=dict)  # the job's metrics so far, saved with checkpoints
