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
from dist_prune.train.state import TrainState
from dist_prune.train.masks import MOMENTS
from dist_prune.masking import Target
from dist_prune.sharding.partition import model_device



def _flats(engine, stage: int) -> list[torch.Tensor]:
    """The optimizer's flat fp32 partitions, one per parameter group."""
    if stage == 3:
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return list(engine.optimizer.single_partition_of_fp32_groups)


def save_train_state(directory: Path, state: TrainState, engine, model: torch.nn.Module,
                     stage: int, extra: dict) -> None:
    """Write this rank's files into `directory` (collective only in that every rank writes)."""
    rank, world = rank_and_world()
    tensors: dict[str, torch.Tensor] = {}
    steps = []
    inner = engine.optimizer.optimizer
    for i, flat in enumerate(_flats(engine, stage)):
        tensors[f"master.{i}"] = flat.detach().cpu()
        opt_state = inner.state.get(flat, {})
        for key in MOMENTS:
            if key in opt_state:
                tensors[f"{key}.{i}"] = opt_state[key].detach().cpu()
        steps.append(float(opt_state["step"]) if "step" in opt_state else None)
    for name, mask in state.masks.items():
        tensors[f"mask.{name}"] = mask.to(torch.uint8).cpu()
    for name, stats in state.stats.items():
        for key, value in stats.items():
            tensors[f"stat.{name}.{key}"] = value.detach().cpu()
    if stage == 2 and rank == 0:  # every rank holds the same whole weights
        for name, p in model.named_parameters():
            tensors[f"weight.{name}"] = p.detach().cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"rank{rank}.safetensors"))
    meta = {"step": state.step, "adam_steps": steps, "alpha": state.alpha, "history": state.history,
            "world_size": world, "zero_stage": stage, **extra}
    (directory / f"rank{rank}.json").write_text(json.dumps(meta))


def read_meta(directory: Path) -> dict:
    rank, _ = rank_and_world()
    path = Path(directory) / f"rank{rank}.json"
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no state for rank {rank}")
    return json.loads(path.read_text())


def load_train_state(directory: Path, engine, model: torch.nn.Module, targets: list[Target],
                     stage: int) -> TrainState:
    """Restore this rank's optimizer partitions, moments, masks and statistics; refresh
    the weights the model computes with from the restored masters. Collective."""
    directory = Path(directory)
    rank, world = rank_and_world()
    meta = read_meta(directory)
    if meta["world_size"] != world or meta["zero_stage"] != stage:
        raise UserError(f"checkpoint {directory} was written by {meta['world_size']} workers at ZeRO "
                        f"stage {meta['zero_stage']}; this run has {world} at stage {stage}")
    tensors = load_file(str(directory / f"rank{rank}.safetensors"))
    inner = engine.optimizer.optimizer
    for i, flat in enumerate(_flats(engine, stage)):
        flat.data.copy_(tensors[f"master.{i}"])
        if meta["adam_steps"][i] is not None:
            inner.state[flat] = {"step": torch.tensor(meta["adam_steps"][i]),
                                 **{k: tensors[f"{k}.{i}"].to(flat.device) for k in MOMENTS}}
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        for p in model.parameters():
            p.ds_tensor.data.copy_(safe_get_local_fp32_param(p))
    else:
        _restore_whole_weights(model, directory, rank)
    device = model_device(model)  # masks and statistics are read onto the CPU; used where the model is
    masks = {t.name: tensors[f"mask.{t.name}"].bool().to(device) for t in targets}
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("stat."):
            name, stat = key[len("stat."):].rsplit(".", 1)
            stats.setdefault(name, {})[stat] = value.to(device)
    return TrainState(step=meta["step"], masks=masks, stats=stats, alpha=meta["alpha"] or {},
                      history=meta["history"])


def _restore_whole_weights(model: torch.nn.Module, directory: Path, rank: int) -> None:
    """Stage 2: rank 0 saved the whole weights; every rank reads them (they are equal)."""
    weights = load_file(str(directory / "rank0.safetensors"))
    for name, p in model.named_parameters():
        p.data.copy_(weights[f"weight.{name}"])


