"""What the user sees: stage timings, progress bars, the summary table and the plot."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator


class StageTimer:
    """Seconds per stage; a stage entered several times (per layer) accumulates."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


class _StageLine(_NoBar):
    """A stage where no terminal watches (a file, a Ray job's log): one line when it ends,
    timed here, where the work runs."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.closed = total, desc, 0, False
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:  # where tqdm writes; not print(), which Ray Train tees into two log lines
            sys.stderr.write(f"{self.desc}: {self.done}/{self.total} in {time.perf_counter() - self.start:.1f} s\n")
            sys.stderr.flush()
            self.closed = True


# Bars or one line per stage; None: bars when this process's stderr is a terminal. Ray workers
# always write lines (worker.py): their output is a file the driver relays line by line, and
# Ray's own distributed tqdm does not work under Ray Train 2.60, which routes a worker's print()
# through its logger: each bar update became an empty log line, and no bar was drawn on the
# driver's terminal (tried under `script`); tqdm's frames in a file pile up in one line.
_BARS: bool | None = None


def show_bars(enabled: bool | None) -> None:
    global _BARS
    _BARS = enabled


def bars_wanted() -> bool:
    return sys.stderr.isatty() if _BARS is None else _BARS


def library_bars_off() -> None:
    """transformers' and huggingface_hub's own bars (a GGUF conversion, weight loading): off as
    ours are where no terminal watches, or each redraw is one more line of the log."""
    from transformers.utils import logging  # lazy: only the driver's preparation loads models

    logging.disable_progress_bar()


def progress(total: int, desc: str, *, enabled: bool):
    """A progress bar on a terminal, one line per stage elsewhere; nothing where not `enabled`
    (ranks other than 0)."""
    if not enabled or total <= 0:
        return _NoBar()
    if not bars_wanted():
        return _StageLine(total, desc)
    from tqdm import tqdm  # lazy: only on a terminal

    return tqdm(total=total, desc=desc)


def summary_table(metrics: dict, model_uri: str | None, export_dir: str) -> str:
    """The final table printed by `dist-prune run`."""
    rows = [("dense perplexity", _fmt(metrics.get("perplexity_dense"))),
            *([("pruned perplexity (before tuning)", _fmt(metrics["perplexity_pruned"]))]
              if "perplexity_pruned" in metrics else []),
            ("sparse perplexity" + (" (tuned)" if metrics.get("finetune_history") else ""),
             _fmt(metrics.get("perplexity_sparse"))),
            *[(f"perplexity on {key.split('.', 1)[1]} ({key.split('.', 1)[0].removeprefix('perplexity_')})",
               _fmt(value)) for key, value in metrics.items() if key.startswith("perplexity_") and "." in key],
            ("achieved sparsity", f"{metrics['sparsity']:.4f} "
                                  f"({metrics['pruned']:,} of {metrics['prunable']:,} weights)")]
    if metrics.get("block_error_after"):  # prune.block_tuning: the layers' output errors, summed
        before, after = sum(metrics["block_error_before"]), sum(metrics["block_error_after"])
        rows.append(("block tuning: layer output error", f"{before:.4g} -> {after:.4g} "
                                                           f"(x{after / before if before else 1:.3f})"))
    if "removed_fraction" in metrics:  # whole heads, channels or layers: the model got smaller
        before, after = metrics["parameters_before"], metrics["parameters_after"]
        rows.append(("parameters removed", f"{metrics['removed_fraction']:.4f} ({before - after:,} of {before:,})"))
    if "model_bytes_per_worker" in metrics:  # ZeRO-3: each worker holds about 1/W of the model
        rows.append(("model bytes per worker", f"{metrics['model_bytes_per_worker'] / 2**20:,.1f} MiB "
                                               f"({metrics['world_size']} workers)"))
    if metrics.get("finetune_sharding"):  # finetune.zero_stage auto, resolved
        rows.append(("fine-tuning sharding", metrics["finetune_sharding"]))
    if "resumed_at_step" in metrics:  # a worker failed; Ray restarted the group from a checkpoint
        rows.append(("fine-tuning resumed at step", str(metrics["resumed_at_step"])))
    rows += [(f"seconds: {k.removeprefix('seconds_')}", f"{v:.1f}")
             for k, v in metrics.items() if k.startswith("seconds_")]
    rows += [("export", export_dir), ("model", model_uri or "(not registered)")]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def plan_table(cfg, job, *, cluster: str | None, registry_uri: str | None) -> str:
    """What `dist-prune run --dry-run` would run (`cfg`: the JobConfig, `job`: the WorkerJob
    that `job.check` prepared); `cluster`: RAY_ADDRESS or None for a local Ray."""
    from dist_prune.config import sampled_windows_of  # lazy: imports the methods, and torch

    sampled = sampled_windows_of(cfg)  # a dry run samples nothing: say what would be sampled

    def windows(ids, source, role=None) -> str:
        read = "-" if ids is None else \
            f"{ids.shape[0]} windows x {ids.shape[1]} tokens from {source or 'the built-in corpus'}"
        if role not in sampled:
            return read
        made = f"{sampled[role][0]} windows x {sampled[role][1]} tokens sampled from the dense model"
        if ids is None:
            return made
        share = cfg.finetune.data.generated_share if role == "training" else None
        return f"{read} + {made}" + (f" ({share:.0%} of each step)" if share else "")

    p, c = cfg.prune, cfg.cluster
    rows = [("model", f"{job.model_dir} ({job.report['tensors_in_checkpoint']} tensors)"),
            ("prune", f"{p.method}, sparsity {p.sparsity}, {p.structure}, scope {job.report['scope']}, "
                      f"schedule {p.schedule}" + (f", each layer then tuned {p.block_tuning.epochs} epochs (lr "
                                                    f"{p.block_tuning.lr:g})" if p.block_tuning.epochs else "")),
            ("calibration", windows(job.calibration, cfg.data.calibration.path, "calibration")),
            ("evaluation", windows(job.evaluation, cfg.eval.path)),
            *[(f"evaluation {stem}", windows(ids, path)) for (stem, ids), path
              in zip(job.more_evaluation.items(), cfg.eval.extra_paths)],
            ("fine-tuning", "-" if cfg.finetune.steps == 0 else
             f"{cfg.finetune.steps} steps, " + windows(job.training, cfg.finetune.data.path, "training")
             + _distillation(cfg.finetune.distill)),
            ("workers", f"{c.num_workers} x {c.cpus_per_worker} CPU{' + 1 GPU' if c.use_gpu else ''} on "
                        + (f"the Ray cluster at {cluster}" if cluster else "a local Ray")),
            ("export", f"{job.export_dir} ({cfg.export.format}, shards up to {cfg.export.max_shard_size})"),
            ("registry", f"models:/{cfg.registry.model_name}@{cfg.registry.alias} in experiment "
                         f"{cfg.registry.experiment!r} at {registry_uri}" if registry_uri else "-")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _distillation(distill) -> str:
    if not distill.teaches:
        return ""
    on = "the sampled windows" if distill.windows == "sampled" else "every window"
    terms = [f"beta {distill.beta:g}, T {distill.temperature:g}"] if distill.beta > 0 else []
    terms += [f"layer outputs {distill.hidden:g}"] if distill.hidden > 0 else []
    return f"; distilled from the dense model on {on} ({', '.join(terms)})"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def layer_sparsity_plot(tensors: dict[str, dict], path: Path) -> Path:
    """Bar chart of the sparsity of each decoder layer's pruned weights (PNG)."""
    import matplotlib  # lazy: only the plot needs it (about 0.5 s to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for name, info in tensors.items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if info.get("pruned") and match:  # elements that whole heads/channels took away count too
            per_layer[int(match.group(1))][0] += info["zeros"] + info.get("removed", 0)
            per_layer[int(match.group(1))][1] += info["numel"] + info.get("removed", 0)
    layers = sorted(per_layer)
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3.5))
    ax.bar(layers, [per_layer[i][0] / per_layer[i][1] for i in layers], color="#4c72b0")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (zeros / weights)")
    ax.set_ylim(0, 1)
    ax.set_title("Sparsity per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
