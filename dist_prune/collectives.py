"""The collectives dist-prune uses, on any backend and without a process group.

Statistics, histograms and counts live on the CPU. gloo reduces CPU tensors; nccl
reduces only CUDA tensors, so under nccl they make a round trip through the GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce_(tensor: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """Sum (or `op`) `tensor` over all ranks, in place; a no-op on a single process."""
    if rank_and_world(group)[1] == 1:
        return tensor
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend(group) == "nccl" and not tensor.is_cuda:
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op, group=group)
        tensor.copy_(on_device)
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if `flag` is true on any: how ranks agree that one of them failed, so
    that all raise together and none is left waiting in the next collective."""
    return bool(all_reduce_(torch.tensor([int(bool(flag))]), group).item())
