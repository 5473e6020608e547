"""Stage 1b, load: build the model straight into DeepSpeed ZeRO-3 partitions.

ZeRO-3 flattens every parameter, pads it to a multiple of the world size W and gives
rank r the flat elements [r*ps, (r+1)*ps), ps = ceil(numel / W). We construct the model
under `deepspeed.zero.Init` (each module is partitioned as soon as it is built) and
then fill each rank's slice from the checkpoint, reading only the rows that cover it.
No process ever holds the whole model; a forward pass gathers one layer at a time.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

from dist_prune.io.checkpoint import Checkpoint
from dist_prune.collectives import rank_and_world
from dist_prune.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """`model.dtype`: auto means bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return DTYPES[name]


def zero3_config(dtype: torch.dtype) -> dict:
    """The DeepSpeed config of the pruning workers.

    stage3_param_persistence_threshold=0: otherwise parameters under 1e5 elements stay
    whole on every rank, and small models (and norms) would not be partitioned at all.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def local_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """Flat [start, stop) of the full parameter held by this rank (padding excluded)."""
    rank, _ = rank_and_world(getattr(param, "ds_process_group", None))
    size = param.ds_tensor.numel()
    start = min(rank * size, param.ds_numel)
    return start, min(start + size, param.ds_numel)


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape of the whole parameter, of which this rank holds a slice."""
    return tuple(param.ds_shape)


def full_numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel


def partition_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the partitions hold (model.dtype as built)."""
    return next(iter(model.parameters())).ds_tensor.dtype


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of model state this rank holds: its partition of every parameter (padding
    included), which is about 1/W of the model."""
    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())


def model_device(module: torch.nn.Module) -> torch.device:
    """Where this rank's partitions of `module` live: cuda:$LOCAL_RANK on a GPU worker
    (`deepspeed.zero.Init` allocates there), cpu otherwise. Token windows come from the driver
    as CPU tensors; whatever meets the model (inputs, statistics, masks) goes here. A module
    that is not partitioned (ZeRO stage 2's whole copy, a plain Linear) answers with its
    parameters' device; one without parameters with cpu."""
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else getattr(param, "ds_tensor", param).device


def local_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """A 1-D view of this rank's elements of `param` (writes go to the partition)."""
    start, stop = local_range(param)
    return param.ds_tensor.data[: stop - start]


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full parameters on every rank inside the block, partitions again after it.
    Collective: every rank must enter with the same parameters."""
    import deepspeed  # lazy: sharding/__init__.py

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def import_model_code(config, *, trust_remote_code: bool = False) -> type | None:
    """Import, outside `deepspeed.zero.Init`, every module that building `config`'s model imports.

    zero.Init replaces `torch.Tensor.__new__` while it is open. A module that imports
    `torch._dynamo` for the first time in that window fails: dynamo's polyfill loader checks
    `Tensor.__new__`'s signature against its own and raises `TypeError: Signature mismatch`.
    transformers 5.24 imports `modeling_utils` (-> fp8 / deepgemm integration -> torch._dynamo)
    from inside `no_init_weights`, and any architecture whose modeling file was not imported
    yet (gpt2 on 5.23) does the same from `from_config`. So import them all here, before
    zero.Init, whatever the transformers version. Returns the model class (None for a class
    that `trust_remote_code` brings: from_config imports it, after dynamo is loaded here).
    """
    import torch._dynamo  # noqa: F401  (the import that must not run under zero.Init)
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM  # heavy, and imported here on purpose (docstring)

    try:
        # the lazy auto mapping imports the architecture's modeling module on look-up
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
            return None
        raise UserError(f"config.json model_type {config.model_type!r} is not a causal LM that "
                        "transformers knows") from None


def build_partitioned_model(model_dir: Path, checkpoint: Checkpoint, dtype: torch.dtype,
                            *, trust_remote_code: bool = False, progress=None) -> torch.nn.Module:
    """The model of `model_dir`, each rank holding only its ZeRO-3 slice of every parameter."""
    import deepspeed  # lazy: sharding/__init__.py
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: heavy, workers only
    from transformers.initialization import no_init_weights

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    import_model_code(config, trust_remote_code=trust_remote_code)
    # The dtype comes from the config's bf16/fp16 flags. Passing `dtype=` is broken in
    # DeepSpeed 0.19 (operator precedence in Init._set_dtype): on CPU, float32 became bf16.
    # No random init: every weight is overwritten from the checkpoint, and some inits
    # (an embedding's padding row) index into partitions that are already empty.
    with deepspeed.zero.Init(config_dict_or_path=zero3_config(dtype)), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # skipped by no_init_weights
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight appears once
            start, stop = local_range(param)
            flat = checkpoint.read_flat(name, start, stop)
            if not torch.isfinite(flat).all():
                raise UserError(f"checkpoint tensor {name} contains NaN or Inf values")
            if tuple(checkpoint.shape(name)) != tuple(param.ds_shape):
                raise UserError(f"checkpoint tensor {name} has shape {checkpoint.shape(name)}, "
                                f"config.json implies {tuple(param.ds_shape)}")
            if param.ds_tensor.dtype != dtype:
                raise RuntimeError(f"{name} partition is {param.ds_tensor.dtype}, expected {dtype}")
            param.ds_tensor.data[: stop - start].copy_(flat)
            if progress is not None:
                progress.update(1)
    return model
