"""How fast is the exact distributed threshold? `select_pruned` against `torch.kthvalue`.

For each size N: N float32 scores |normal|, sparsity 0.5, scope global. Timed (medians of repeats):
  x.sum()                    one read pass, the floor
  select_pruned, 1 process   masks included
  x.sum(), 2 processes       each rank sums its half at the same time: the machine's single-pass
                             bandwidth when both cores read
  select_pruned, 2 processes gloo, each rank holds half (its ZeRO-3 slice) with 1 torch thread;
                             time per repeat is the slower rank's
  torch.kthvalue             on the whole tensor (what single-process pruning code does)
  torch.kthvalue + mask      plus the `x <= v` pass, to compare like with like
Above --single-max (3e8) only the 2-process rows run: each rank generates just its own half, so
N = 1e9 needs 2 x 2 GB, not a whole 4 GB copy per process. GB/s is 4N bytes over the median time;
"÷ bandwidth" divides it by the single-pass bandwidth of the same row kind (1 or 2 processes).

    .venv/bin/python benchmarks/threshold.py [--sizes 1e7 1e8 1e9] [--repeats 5]
    .venv/bin/python benchmarks/threshold.py --scope row --sizes 1e7 1e8   # Wanda's per-row groups

Writes benchmarks/results/threshold.json and threshold.md (threshold_row.* with --scope row). With
--scope row, N is rounded down to whole rows of 4096 elements, each row prunes its
own half, the 2-process slices cut a row as ZeRO-3 does, and torch.kthvalue runs along the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_prune.selection import Segment, group_sizes, prune_counts, select_pruned

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITY = 0.5
ROW_LENGTH = 4096  # elements per row with --scope row: a 7B model's attention rows


def problem(n: int, scope: str) -> dict:
    """select_pruned's arguments besides the segments, for N scores in one group or in rows."""
    rows = [ROW_LENGTH] if scope == "row" else None
    return {"counts": prune_counts(SPARSITY, group_sizes([n], scope, rows)), "scope": scope, "row_lengths": rows}


CHUNK = 1 << 24  # scores are generated chunk by chunk, so any slice can be made on its own


def scores(n: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Elements [start, stop) of the N scores (chunk c drawn from seed c)."""
    stop = n if stop is None else min(stop, n)
    parts = []
    for c in range(start // CHUNK, -(-stop // CHUNK)):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        chunk = torch.randn(hi - lo, generator=torch.Generator().manual_seed(c)).abs_()
        parts.append(chunk[max(start, lo) - lo : stop - lo])
    return torch.cat(parts) if parts else torch.empty(0)


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def rank_worker(rank: int, world: int, n: int, repeats: int, scope: str, init_file: str, out: str) -> None:
    """One of `world` gloo ranks: select on this rank's slice, time each repeat between barriers."""
    torch.set_num_threads(1)  # one core per rank, as Ray sets OMP_NUM_THREADS=1 per worker
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ps = -(-n // world)
    segment = Segment(scores(n, rank * ps, (rank + 1) * ps), 0, rank * ps)
    args = problem(n, scope)
    pruned = torch.tensor([int(select_pruned([segment], [n], **args)[0].sum())])  # also the warm-up
    dist.all_reduce(pruned)
    assert int(pruned) == int(args["counts"].sum()), "ranks together must prune exactly k"
    times = {"sum": [], "select": []}
    for _ in range(repeats):
        for op, fn in (("sum", segment.scores.sum), ("select", lambda: select_pruned([segment], [n], **args))):
            dist.barrier()  # start together; the clock runs on each rank from here
            start = time.perf_counter()
            fn()
            times[op].append(time.perf_counter() - start)
    torch.save(times, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def distributed_times(n: int, repeats: int, scope: str, world: int = 2) -> dict[str, list[float]]:
    """Per repeat, the slowest rank's time of its x.sum() and of select_pruned."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_worker, args=(world, n, repeats, scope, str(Path(tmp) / "init"), tmp),
                           nprocs=world, join=True, start_method="spawn")
        per_rank = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    return {f"{'x.sum()' if op == 'sum' else 'select_pruned'}, {world} processes":
            [max(ts) for ts in zip(*(r[op] for r in per_rank))] for op in ("sum", "select")}


def measure(n: int, repeats: int, single: bool, scope: str) -> dict[str, list[float]]:
    if not single:
        return distributed_times(n, repeats, scope)
    x = scores(n)
    args = problem(n, scope)
    k = int(args["counts"][0])  # the same in every group
    groups = x.view(-1, ROW_LENGTH) if scope == "row" else x.view(1, -1)
    [mask] = select_pruned([Segment(x, 0, 0)], [n], **args)
    kth = torch.kthvalue(groups, k, dim=1, keepdim=True).values
    assert torch.equal(mask.view_as(groups).sum(1), args["counts"]), "select_pruned must prune k per group"
    assert torch.equal(groups.where(mask.view_as(groups), -math.inf).amax(1, keepdim=True), kth), \
        "select_pruned disagrees with kthvalue"
    return {
        "x.sum()": timed(lambda: x.sum(), repeats),
        "select_pruned, 1 process": timed(lambda: select_pruned([Segment(x, 0, 0)], [n], **args), repeats),
        **distributed_times(n, repeats, scope),
        "torch.kthvalue": timed(lambda: torch.kthvalue(groups, k, dim=1), repeats),
        "torch.kthvalue + mask": timed(lambda: groups <= torch.kthvalue(groups, k, dim=1, keepdim=True).values,
                                       repeats),
    }


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes spent busy, CPU seconds this process and its joined children
    spent): their difference over a run is what other processes took from the machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return busy, sum(r.ru_utime + r.ru_stime for r in own)


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_1_process": torch.get_num_threads(),
        "torch_threads_per_rank": 1,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def rows_of(n: int, times: dict[str, list[float]]) -> list[dict]:
    medians = {op: statistics.median(ts) for op, ts in times.items()}
    rows = []
    for op, ts in times.items():
        procs = "2 processes" if "2 processes" in op else "1 process"
        floor = medians["x.sum(), 2 processes" if procs == "2 processes" else "x.sum()"]
        rows.append({"n": n, "operation": op, "median_s": medians[op], "times_s": ts,
                     "gb_per_s": 4 * n / medians[op] / 1e9, "x_sum": medians[op] / floor,
                     "kthvalue_over": medians.get("torch.kthvalue", math.nan) / medians[op],
                     "kthvalue_mask_over": medians.get("torch.kthvalue + mask", math.nan) / medians[op]})
    return rows


def _ratio(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| N | operation | median s | min s | GB/s | ÷ bandwidth | × sum | kthvalue ÷ this | kthvalue+mask ÷ this |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['operation']} | {r['median_s']:.3f} | {min(r['times_s']):.3f} | "
                     f"{r['gb_per_s']:.2f} | {1 / r['x_sum']:.3f} | {r['x_sum']:.1f} | "
                     f"{_ratio(r['kthvalue_over'])} | {_ratio(r['kthvalue_mask_over'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8, 1e9])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single-max", type=float, default=3e8, help="largest N also run in 1 process")
    parser.add_argument("--scope", choices=("global", "row"), default="global")
    args = parser.parse_args()
    sizes = [int(n) - int(n) % ROW_LENGTH if args.scope == "row" else int(n) for n in args.sizes]
    scope_text = f"scope row ({ROW_LENGTH} per row)" if args.scope == "row" else "scope global"
    name = "threshold_row" if args.scope == "row" else "threshold"

    info, rows, others = machine(), [], {}
    for n in sizes:
        (busy0, own0), start = cpu_seconds(), time.perf_counter()
        times = measure(n, args.repeats, n <= args.single_max, args.scope)
        (busy1, own1), wall = cpu_seconds(), time.perf_counter() - start
        others[n] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
        rows += rows_of(n, times)
        print(table([r for r in rows if r["n"] == n]), flush=True)
        print(f"other processes used {others[n]:.0%} of the CPUs meanwhile", flush=True)
    info["load_average_at_end"] = os.getloadavg()
    info["cpu_share_of_other_processes"] = others

    text = table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": info, "sparsity": SPARSITY, "scope": args.scope,
         "row_length": ROW_LENGTH if args.scope == "row" else None, "repeats": args.repeats, "rows": rows},
        indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(
        "# Exact threshold: `select_pruned` vs `torch.kthvalue`\n\n"
        f"float32 scores |normal|, sparsity {SPARSITY}, {scope_text}, median of {args.repeats} repeats "
        "after one warm-up. 2-process times: the slower rank per repeat; each rank holds half the "
        "scores and runs 1 torch thread. Masks are included in `select_pruned`. GB/s is 4N bytes over "
        "the median; ÷ bandwidth divides it by the single-pass (`x.sum()`) bandwidth with as many "
        f"processes. N above {args.single_max:,.0f}: 2-process rows only (each rank makes its own half).\n\n"
        f"{text}\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"{info['torch_threads_1_process']} torch threads in the 1-process runs, "
        f"OMP_NUM_THREADS={info['OMP_NUM_THREADS']}. The machine is shared: other processes used "
        + ", ".join(f"{share:.0%} of the CPUs during N = {n:,}" for n, share in others.items()) + ".\n")


if __name__ == "__main__":
    main()
