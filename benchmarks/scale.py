"""Memory scaling: what each Ray worker holds when `dist-prune run` prunes a model with W workers.

    .venv/bin/python benchmarks/scale.py                      # 0.5B and 1B, magnitude and Wanda, W = 1, 2
    .venv/bin/python benchmarks/scale.py --sizes 3e9 --methods magnitude --append
    .venv/bin/python benchmarks/scale.py --sizes 5e8 --methods magnitude@global --append  # one selection, all layers

For each synthetic bf16 Llama checkpoint (benchmarks/make_checkpoint.py, written once into
--cache) and each method and worker count, the real CLI runs as a user runs it (local Ray,
no registry, no evaluation) while this script samples every process of the job: the driver
(the CLI process) and the Ray Train workers (`ray::RayTrainWorker`). Peak RSS is the
kernel's high-water mark (VmHWM), so short peaks between samples are not missed. Each run
also reports the bytes of model state every worker holds (`model bytes per worker`, its
ZeRO-3 partitions) and the seconds of each stage.

The bound each worker is checked against: model/W + one decoder layer (gathered whole for a
forward pass) + the runtime (Python, torch, DeepSpeed, Ray, the communication buffers of W
ranks), the runtime being what a worker of a job with the same W peaks at on a tiny model,
less its share of it. Results: benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _ranks import RESULTS, ROOT, machine

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoint import llama_config, tensor_specs  # noqa: E402

MiB = 2**20


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def run_job(model: Path, method: str, workers: int, scratch: Path) -> dict:
    """One `dist-prune run`, sampled every 0.2 s; peak RSS per process in bytes."""
    export = scratch / "export"
    scorer, _, scope = method.partition("@")  # magnitude@global: one selection over every layer
    args = [sys.executable, "-m", "dist_prune.cli", "run", f"model.path={model}", f"prune.method={scorer}",
            *([f"prune.scope={scope}"] if scope else []), "prune.sparsity=0.5", f"cluster.num_workers={workers}", "model.dtype=bfloat16",
            "data.calibration.num_samples=8", "data.calibration.seq_len=128", "eval.num_windows=0",
            "eval.dense=false", "registry.enabled=false", f"export.dir={export}",
            f"cluster.storage_path={scratch / 'ray'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    # Output goes to a file: a pipe read only at the end fills (64 KiB of progress bars) and the
    # job then blocks writing to it, forever.
    log = open(scratch / "job.log", "w+")
    proc = subprocess.Popen(args, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    driver_peak = 0
    while proc.poll() is None:
        driver_peak = max(driver_peak, (_status_kib(proc.pid, "VmHWM") or 0) * 1024)
        for pid in _worker_pids():
            peaks[pid] = max(peaks.get(pid, 0), (_status_kib(pid, "VmHWM") or 0) * 1024)
        time.sleep(0.2)
    log.seek(0)
    output = log.read()
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"dist-prune run failed ({proc.returncode}):\n{output[-3000:]}")
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"^seconds: (\S+)\s+([\d.]+)$", output, re.M)}
    held = re.search(r"^model bytes per worker\s+([\d,.]+) MiB", output, re.M)
    shutil.rmtree(export, ignore_errors=True)
    return {"method": method, "workers": workers, "wall_s": time.perf_counter() - started,
            "worker_peak_rss": sorted(peaks.values(), reverse=True), "driver_peak_rss": driver_peak,
            "model_bytes_per_worker": float(held.group(1).replace(",", "")) * MiB if held else None,
            "seconds": seconds}


def checkpoint(cache: Path, params: float) -> tuple[Path, dict]:
    """The synthetic checkpoint of ~`params` parameters (written once), and its size facts."""
    directory = cache / f"llama-{params:.1e}"
    if not (directory / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoint.py"), str(directory),
                        "--params", str(params)], check=True)
    cfg = json.loads((directory / "config.json").read_text())
    specs = tensor_specs(cfg, __import__("torch").bfloat16)
    layer = sum(s.nbytes for s in specs if s.name.startswith("model.layers.0."))
    return directory, {"parameters": sum(s.numel for s in specs), "model_bytes": sum(s.nbytes for s in specs),
                       "layer_bytes": layer, "layers": cfg["num_hidden_layers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5e8, 1e9])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda"],
                        help="scorers, each with its default scope, or scorer@scope (magnitude@global)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dist-prune" / "bench")
    parser.add_argument("--append", action="store_true",
                        help="add to the existing results (replacing runs of the same model, method and W)")
    args = parser.parse_args()

    out = RESULTS / "scale.json"
    report = json.loads(out.read_text()) if args.append and out.exists() else {"runs": []}
    report["machine"] = machine(1).removesuffix(", 1 gloo ranks x 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = report.setdefault("runtimes", {})
        if "runtime" in report:  # results of an earlier version: measured with one worker
            runtimes.setdefault("1", report.pop("runtime"))
        for workers in args.workers:  # what a worker peaks at with (almost) no model, per W: the
            if str(workers) in runtimes:  # communication buffers of W ranks belong to the runtime
                continue
            tiny, facts = checkpoint(args.cache, 2e7)
            run = run_job(tiny, "magnitude", workers, Path(tmp))
            overhead = max(run["worker_peak_rss"]) - facts["model_bytes"] / workers - facts["layer_bytes"]
            runtimes[str(workers)] = {**facts, **run, "overhead": overhead}
            print(f"runtime, {workers} worker(s): worker peak {max(run['worker_peak_rss']) / MiB:.0f} MiB with a "
                  f"{facts['model_bytes'] / MiB:.0f} MiB model", flush=True)
        for params in args.sizes:
            directory, facts = checkpoint(args.cache, params)
            for method in args.methods:
                for workers in args.workers:
                    run = {**facts, **run_job(directory, method, workers, Path(tmp)), "commit": _commit()}
                    _replace_or_add(report["runs"], run)
                    print(json.dumps(run), flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(report, indent=2))  # after every run: a long benchmark
    (RESULTS / "scale.md").write_text(markdown(report))
    print(markdown(report))


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def _replace_or_add(runs: list[dict], run: dict) -> None:
    """A new measurement of the same model, method and W supersedes the old one, in its place."""
    same = [i for i, r in enumerate(runs) if (r["parameters"], r["method"], r["workers"]) ==
            (run["parameters"], run["method"], run["workers"])]
    if same:
        runs[same[0]] = run
    else:
        runs.append(run)


def markdown(report: dict) -> str:
    runtimes = report["runtimes"]
    tiny = next(iter(runtimes.values()))["model_bytes"]
    lines = [f"Machine: {report['machine']}. bf16 synthetic Llama checkpoints, 50% unstructured, "
             f"calibration 8 x 128 tokens, no evaluation. Runtime overhead of a worker (its peak RSS in the "
             f"same job on a {tiny / MiB:.0f} MiB model, minus its share of that model and one layer): "
             + ", ".join(f"{r['overhead'] / MiB:.0f} MiB with W = {w}" for w, r in sorted(runtimes.items())) + ".",
             "", "| model | method | W | model state / worker | ÷ (model/W) | worker peak RSS | bound: model/W + layer "
             "+ runtime | peak ÷ bound | driver peak RSS | load s | calibrate s | select+mask s | export s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        share = r["model_bytes"] / r["workers"]
        bound = share + r["layer_bytes"] + runtimes[str(r["workers"])]["overhead"]
        peak = max(r["worker_peak_rss"]) if r["worker_peak_rss"] else math.nan
        held = r["model_bytes_per_worker"] or math.nan
        s = r["seconds"]
        lines.append(f"| {r['parameters'] / 1e9:.2f}B ({r['model_bytes'] / 2**30:.2f} GiB) | {r['method']} | "
                     f"{r['workers']} | {held / MiB:,.0f} MiB | {held / share:.3f} | {peak / MiB:,.0f} MiB | "
                     f"{bound / MiB:,.0f} MiB | {peak / bound:.2f} | {r['driver_peak_rss'] / MiB:,.0f} MiB | "
                     f"{s.get('load', 0):.0f} | {s.get('calibrate', 0):.0f} | {s.get('score+select+mask', 0):.0f} | "
                     f"{s.get('export', 0):.0f} | {r['wall_s']:.0f} |")
    lines += ["", "Command: `.venv/bin/python benchmarks/scale.py` (plus `--sizes 3e9 --append` where it fits)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
