"""A DeepSpeed engine on a model that `deepspeed.zero.Init` already partitioned, for the
length of one stage (gradient calibration, fine-tuning), taken off the model afterwards.

The pruning stages gather layers themselves (layerwise.py); an engine's module hooks
would fight that. So an engine lives only while a stage needs DeepSpeed's gradient
partitioning and optimizer, and `temporary_engine` hands the model back as it found
it: same hooks, attributes, requires_grad and train/eval flags, and the partition
values the engine left in it (trained weights stay trained).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")
_PARAM_HOOK_DICTS = ("_post_accumulate_grad_hooks", "_backward_hooks")


@contextlib.contextmanager
def temporary_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, *,
                     trainable: Callable[[torch.nn.Parameter], bool]) -> Iterator:
    """`deepspeed.initialize(model, optimizer, config)` for the duration of the block.
    Only parameters for which `trainable(p)` holds get gradients. Collective.

    The partitions do move: ZeRO-3 copies every optimized `param.ds_tensor` into one
    contiguous buffer and points the parameter at it, so a `local_weight` view taken
    before the block no longer aliases the parameter; take views inside or after it.
    """
    import deepspeed  # lazy: sharding/__init__.py

    state = _snapshot(model)
    for p in model.parameters():
        p.requires_grad_(bool(trainable(p)))
    engine = None
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        yield engine
    finally:
        if engine is not None:
            engine.destroy()
        _restore(model, state)
        del engine, optimizer
        gc.collect()  # the engine's fp32 copies and gradient buffers sit in reference cycles


@dataclass
class _State:
    training: bool
    requires_grad: dict[int, bool] = field(default_factory=dict)
    module_attrs: dict[int, set] = field(default_factory=dict)
    module_params: dict[int, dict] = field(default_factory=dict)
    module_hooks: dict[int, dict[str, set]] = field(default_factory=dict)
    param_attrs: dict[int, set] = field(default_factory=dict)
    param_hooks: dict[int, dict[str, set]] = field(default_factory=dict)


def _snapshot(model: torch.nn.Module) -> _State:
    state = _State(model.training)
    for m in model.modules():
        state.module_attrs[id(m)] = set(vars(m))
        state.module_params[id(m)] = m._parameters
        state.module_hooks[id(m)] = {d: set(getattr(m, d, {})) for d in _HOOK_DICTS}
    for p in model.parameters():
        state.requires_grad[id(p)] = p.requires_grad
        state.param_attrs[id(p)] = set(vars(p))
        state.param_hooks[id(p)] = {d: set(getattr(p, d, None) or {}) for d in _PARAM_HOOK_DICTS}
    return state


def _restore(model: torch.nn.Module, state: _State) -> None:
    """Take off what the engine put on the model and its parameters.

    `engine.destroy()` removes the ZeRO-3 module and gradient hooks, but not the engine's
    own forward pre/post hooks on the root module, the `ZeROOrderedDict` that replaced
    every module's `_parameters`, the attributes set on modules (ds_id, ds_grads_remaining,
    pre_bwd_fn, ...), nor `param._z3_optimizer`, which would keep the optimizer's fp32
    copies and gradient buffers alive. Anything not there before the call goes.
    """
    from deepspeed.runtime.zero import parameter_offload  # lazy: sharding/__init__.py

    for m in model.modules():
        for d, before in state.module_hooks.get(id(m), {}).items():
            hooks = getattr(m, d, None)
            for key in set(hooks or {}) - before:
                del hooks[key]
        original = state.module_params.get(id(m))
        if original is not None and m._parameters is not original:
            now, before = dict(m._parameters.items()), dict(original.items())
            if list(now) != list(before) or any(now[k] is not before[k] for k in before):
                raise RuntimeError(f"DeepSpeed changed the parameters of {type(m).__name__}")
            m.__dict__["_parameters"] = original
        for key in set(vars(m)) - state.module_attrs.get(id(m), set(vars(m))):
            delattr(m, key)
    for p in model.parameters():
        for d, before in state.param_hooks.get(id(p), {}).items():
            hooks = getattr(p, d, None)
            for key in set(hooks or {}) - before:
                del hooks[key]
        for key in set(vars(p)) - state.param_attrs.get(id(p), set(vars(p))):
            delattr(p, key)
        p.grad = None
        p.requires_grad_(state.requires_grad.get(id(p), p.requires_grad))
    stack = parameter_offload.FWD_MODULE_STACK  # the engine pushes the root module once
    while stack and stack[-1] is model:
        stack.pop()
    model.train(state.training)


def init_distributed(backend: str) -> None:
    """The process group of this worker, through DeepSpeed's comm layer (its engines and
    zero.Init use that layer's backend, not torch.distributed's default group directly).
    Reads RANK, WORLD_SIZE, MASTER_ADDR/PORT as torch.distributed does; a no-op for the group
    if one exists already (Ray Train made it)."""
    import deepspeed  # lazy: sharding/__init__.py

    deepspeed.init_distributed(dist_backend=backend)


def release_process_groups(*, destroy: bool = True) -> None:
    """Drop DeepSpeed's references to its process groups and (`destroy`) destroy every group of
    this process; for the end of a worker. Collective, like destroy_process_group. Under Ray Train,
    which destroys the groups itself after the train loop, `destroy=False`.

    `torch.distributed.destroy_process_group()` forgets the groups, but deepspeed.utils.groups
    keeps those `deepspeed.initialize` made (expert, expert-data, world and all-to-all groups: one
    more gloo group, with its TCP loop and 2 worker threads) in module globals, and deepspeed.comm
    keeps its backend. Measured on 2 ranks after a taylor job: all 6 gloo threads of both groups
    still ran after destroy_process_group() and gc.collect(). Their C++ objects then live until
    interpreter exit, whose teardown destroys them while those threads run: in a full test run a
    spawned rank aborted after its last export with `terminate called without an active
    exception` (SIGABRT). Dropping the references first lets the destructors join the threads.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    for name, value in list(vars(groups).items()) if groups is not None else ():
        if "GROUP" in name:
            if isinstance(value, dict):
                value.clear()
            elif value is not None:
                setattr(groups, name, None)
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    if destroy and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
