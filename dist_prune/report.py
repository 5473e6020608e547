"""What the user sees: stage timings, progress bars, the summary table and the plot."""

from __future__ import annotations

import contextlib
import re
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


def progress(total: int, desc: str, *, enabled: bool):
    """A progress bar on rank 0 only. Inside Ray workers, Ray's tqdm shows it on the driver."""
    if not enabled or total <= 0:
        return _NoBar()
    try:
        import ray  # lazy, and optional here: the bar is Ray's only inside a Ray job

        if ray.is_initialized():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            return ray_tqdm(total=total, desc=desc)
    except ImportError:
        pass
    from tqdm import tqdm  # lazy, as ray above

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
