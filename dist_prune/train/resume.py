"""Fine-tuning checkpoints: everything a worker needs to continue a run exactly.

Each rank writes its own two files into the checkpoint directory (Ray Train merges
the workers' directories into one):

  rank{r}.safetensors  the optimizer's flat fp32 partitions (master weights) and their
                       AdamW moments, the masks, the training-time score statistics;
                       with ZeRO stage 2 also the whole (16-bit) weights, on rank 0 only
  rank{r}.json         the step, AdamW's step counts, the dynamic-alpha state, the
                       metrics so far, the world size and ZeRO stage

safetensors, not DeepSpeed's `save_checkpoint` (torch.save pickles): loading a checkpoint
never runs code, whoever wrote the storage. Resuming needs the same world size and
stage; the data position is the step (schedule.py), so it needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_prune.collectives import rank_and_world
from dist_prune.errors import UserError
from dist_prune.masking import Target
from dist_prune.sharding.partition import model_device
from dist_prune.sharding.training import Training
from dist_prune.train.state import TrainState


def save_train_state(directory: Path, state: TrainState, training: Training, extra: dict) -> None:
    """Write this rank's files into `directory` (collective only in that every rank writes)."""
    rank, world = rank_and_world()
    tensors, optimizer_meta = training.state_dict(rank)
    for name, mask in state.masks.items():
        tensors[f"mask.{name}"] = mask.to(torch.uint8).cpu()
    for name, stats in state.stats.items():
        for key, value in stats.items():
            tensors[f"stat.{name}.{key}"] = value.detach().cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"rank{rank}.safetensors"))
    meta = {"step": state.step, **optimizer_meta, "alpha": state.alpha, "history": state.history,
            "world_size": world, "zero_stage": training.stage, **extra}
    (directory / f"rank{rank}.json").write_text(json.dumps(meta))


def read_meta(directory: Path) -> dict:
    rank, _ = rank_and_world()
    path = Path(directory) / f"rank{rank}.json"
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no state for rank {rank}")
    return json.loads(path.read_text())


def load_train_state(directory: Path, training: Training, targets: list[Target]) -> TrainState:
    """Restore this rank's optimizer partitions, moments, masks and statistics; refresh
    the weights the model computes with from the restored masters. Collective."""
    directory = Path(directory)
    rank, world = rank_and_world()
    meta = read_meta(directory)
    if meta["world_size"] != world or meta["zero_stage"] != training.stage:
        raise UserError(f"checkpoint {directory} was written by {meta['world_size']} workers at ZeRO "
                        f"stage {meta['zero_stage']}; this run has {world} at stage {training.stage}")
    tensors = load_file(str(directory / f"rank{rank}.safetensors"))
    training.load_state_dict(tensors, meta, lambda: load_file(str(directory / "rank0.safetensors")))
    device = model_device(training.module)  # masks and statistics are read onto the CPU; used where the model is
    masks = {t.name: tensors[f"mask.{t.name}"].bool().to(device) for t in targets}
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("stat."):
            name, stat = key[len("stat."):].rsplit(".", 1)
            stats.setdefault(name, {})[stat] = value.to(device)
    return TrainState(step=meta["step"], masks=masks, stats=stats, alpha=meta["alpha"] or {},
                      history=meta["history"])
