"""What the benchmarks that run the worker recipe without Ray share: spawned gloo ranks,
one job of the recipe on them, the machine description and WikiText-2 token windows."""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIST_PRUNE_DATA", ROOT.parent / "shared" / "data")) / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
SECOND_TEXT = ROOT / "benchmarks" / "data" / "fortunes.txt"  # benchmarks/second_text.py


def run_ranks(fn, *args, world: int = 2, threads: int = 1):
    """fn(rank, *args) on `world` spawned gloo ranks of `threads` torch threads each; returns what
    rank 0's fn returned (as JSON). `fn` must be a module-level function (spawn pickles it by name)."""
    from dist_prune.io.checkpoint import configure_jit_builds

    configure_jit_builds()  # DeepSpeed compiles once, with one ninja
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/results.json"
        mp.start_processes(_rank_entry, args=(world, threads, _free_port(), out, fn, args),
                           nprocs=world, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def _rank_entry(rank: int, world: int, threads: int, port: int, out: str, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)  # as a Ray worker with cpus_per_worker=threads
    from dist_prune.sharding.engine import init_distributed

    init_distributed("gloo")
    result = fn(rank, *args)
    torch.distributed.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(overrides: list[str], data: dict, hooks=None, inspect=None) -> dict:
    """One job of the worker recipe on the current ranks, exported to a temporary directory;
    its metrics plus `seconds_total` (the whole recipe: load to export). `inspect(export_dir)`
    runs on rank 0 before the export is deleted."""
    from dist_prune.config import load_config, to_dict
    from dist_prune.worker import WorkerJob, run_worker

    cfg = load_config(None, [f"model.path={data['model']}", *overrides])
    data = with_sampled_windows(data, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        job = WorkerJob(to_dict(cfg), data["model"], data["calibration"], data["evaluation"],
                        f"{tmp}/export", {}, training=data.get("training"),
                        more_evaluation=data.get("more_evaluation", {}))
        started = time.perf_counter()
        metrics = run_worker(job, hooks)
        metrics["seconds_total"] = time.perf_counter() - started
        if inspect is not None and int(os.environ.get("RANK", "0")) == 0:
            inspect(Path(tmp) / "export")
    return metrics


def with_sampled_windows(data: dict, overrides: list[str]) -> dict:
    """`data` with the windows a job's data.calibration.generated and finetune.data.generated_windows
    ask for, sampled from the dense model as `dist-prune run` samples them (job.prepare) and cached:
    a parent that calls this before its ranks start samples once, and the ranks read the cache."""
    from transformers import AutoTokenizer

    from dist_prune.config import calibration_split, load_config, sampled_windows_of
    from dist_prune.generated import sampled_inputs, with_samples
    from dist_prune.io.checkpoint import open_checkpoint

    cfg = load_config(None, [f"model.path={data['model']}", *overrides])
    if not sampled_windows_of(cfg):
        return data
    model = Path(data["model"])
    sampled = sampled_inputs(cfg, model, AutoTokenizer.from_pretrained(model).all_special_ids,
                             open_checkpoint(model).shard_sha256(), show=False)
    text = data.get("calibration")
    if "calibration" in sampled and text is not None:  # the first of its seeded offsets, as job.prepare reads
        text = text[:calibration_split(cfg)[0]]
    calibration, training = with_samples(cfg, text, data.get("training"), sampled)
    return {**data, "calibration": calibration, "training": training}


class LoadSampler:
    """What else ran while a benchmark ran, every `every` seconds: `samples`, the 1-minute load
    average (it counts the benchmark's own runnable threads too: 2 ranks measured 2.2-2.9 on the
    quiet 2-core machine), and `other_cpu`, the share of all cores' time over each interval spent
    by processes outside this one and its children: 0 on a quiet machine, 0.25 = half a core."""

    def __init__(self, every: float = 60.0):
        self.every, self.samples, self.other_cpu = every, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        before = (*_cpu_ticks(), _own_ticks(os.getpid()))
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(self.every):
                return
            now = (*_cpu_ticks(), _own_ticks(os.getpid()))
            busy, total, own = (b - a for a, b in zip(before, now))
            self.other_cpu.append(round(max(busy - own, 0) / max(total, 1), 3))
            before = now

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot (/proc/stat's first line)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own_ticks(root: int) -> int:
    """CPU ticks of `root` and every process below it. A reaped child's ticks move into its
    parent's cutime/cstime, so they are counted once, before and after it exits."""
    parent, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name in () may hold spaces
        except OSError:  # exited while listed
            continue
        parent[int(stat.parent.name)] = int(fields[1])
        ticks[int(stat.parent.name)] = sum(map(int, fields[11:15]))  # utime stime cutime cstime
    own = 0
    for pid, n in ticks.items():
        while pid not in (root, 0, None):
            pid = parent.get(pid)
        own += n if pid == root else 0
    return own


def machine(world: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {world} gloo ranks x 1 thread"


def tokens(model_dir: Path, *, calibration: tuple[int, int] = (32, 512), evaluation: tuple[int, int] = (16, 512),
           training_seq_len: int | None = None) -> dict:
    """Token windows of WikiText-2: `calibration` (windows, tokens) at seeded random offsets of
    valid, `evaluation` (windows, tokens) from the start of test, and with `training_seq_len`
    every consecutive window of valid for fine-tuning. `more_evaluation`: the same windows from
    the start of the second, out-of-domain text (benchmarks/second_text.py), reported as
    perplexity_<stage>.fortunes."""
    from transformers import AutoTokenizer

    from dist_prune.data import calibration_windows, eval_windows, tokenize, training_windows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    valid = tokenize((DATA / "valid.txt").read_text(), tokenizer)
    test = tokenize((DATA / "test.txt").read_text(), tokenizer)
    data = {"model": str(model_dir), "calibration": calibration_windows(valid, *calibration, 0, source="valid"),
            "evaluation": eval_windows(test, *evaluation, source="test"),
            "more_evaluation": {SECOND_TEXT.stem: eval_windows(tokenize(SECOND_TEXT.read_text(), tokenizer),
                                                               *evaluation, source=SECOND_TEXT.name)}}
    if training_seq_len is not None:
        data["training"] = training_windows(valid, training_seq_len, source="valid")
    return data
