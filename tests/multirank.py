"""Run a function on W gloo ranks in spawned processes (no Ray), collect each rank's result."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dist_prune.sharding.engine import init_distributed, release_process_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args: tuple, deepspeed_comm: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if deepspeed_comm:
        init_distributed("gloo")
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
    finally:
        torch.distributed.barrier()
        release_process_groups()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # No interpreter teardown: gloo threads (2 workers and a TCP loop per group) can still run at
    # exit even after release_process_groups (after a zero.Init build, one group's 3 threads were
    # still there), and a teardown destroying their C++ objects under them aborted a rank with
    # `terminate called without an active exception` (SIGABRT) in a full test run. The result is
    # on disk; the kernel ends the threads.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world: int, *args, deepspeed_comm: bool = True) -> list:
    """`fn(*args)` on ranks 0..world-1 (fn must be importable: module-level)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, free_port(), out, fn, args, deepspeed_comm),
                           nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
