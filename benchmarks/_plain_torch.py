"""What a user would otherwise run: the same fine-tuning step in plain PyTorch, for
benchmarks/finetune.py speed to compare against, side by side in one run.

A step is what dist-prune's step is: forward over the step's windows, next-token cross-entropy
in fp32, backward, gradient clipping at 1.0 (finetune.max_grad_norm's default), AdamW, zero_grad.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    return model


def _step(model, optimizer, ids: torch.Tensor) -> None:
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_steps(model_dir: str, windows: torch.Tensor, steps: int, per_step: int, threads: int) -> list[float]:
    """Seconds of each of `steps` steps of one process with `threads` threads, `per_step`
    windows per step (in one forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(model_dir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seconds = []
        for step in range(steps):
            started = time.perf_counter()
            _step(model, optimizer, windows[step * per_step:(step + 1) * per_step])
            seconds.append(time.perf_counter() - started)
        return seconds
    finally:
        torch.set_num_threads(before)


def ddp_steps(rank: int, model_dir: str, windows: torch.Tensor, steps: int) -> list[float]:
    """The same on gloo ranks with DistributedDataParallel: one window per rank per step (run by
    benchmarks/_ranks.run_ranks, one thread per rank)."""
    from torch.nn.parallel import DistributedDataParallel

    world = torch.distributed.get_world_size()
    model = DistributedDataParallel(_model(model_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for step in range(steps):
        torch.distributed.barrier()
        started = time.perf_counter()
        index = step * world + rank
        _step(model, optimizer, windows[index:index + 1])
        seconds.append(time.perf_counter() - started)
    return seconds


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 n x n matmul throughput with `threads` threads (median of `repeats`): the FLOP floor's
    denominator on this machine, measured in the same run."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        times.sort()
        return 2 * n**3 / times[len(times) // 2] / 1e9
    finally:
        torch.set_num_threads(before)
