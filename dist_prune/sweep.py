"""`dist-prune sweep`: every combination of a few config values, as Ray Tune trials.

    dist-prune sweep CONFIG prune.sparsity=0.3,0.5 prune.method=wanda,magnitude [a.b=c ...]
    dist-prune sweep configs/sweeps/ablation_ratio.yaml      (a sweep file: base + grid)

Each trial is a whole job (prepare, Ray Train workers, export, register) run from a Ray
Tune function trial; as many trials run side by side as the cluster's CPUs (and GPUs) hold
when the sweep starts, the others queue in Ray Tune. All trial configs are validated before the first trial starts. In
MLflow, the sweep is one parent run; every trial is a child run of it (with its own
step metrics and model version, alias `<alias>-<trial>`), and the parent run gets the
comparison table and plot.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dist_prune.config import (JobConfig, apply_overrides, config_from_dict, input_paths, load_config, read_yaml,
                               set_input_path, to_dict)
from dist_prune.errors import UserError
from dist_prune.job import init_ray, run
from dist_prune.ray_driver import find_user_error
from dist_prune.registry import check_alias, end_run, resolved_tracking_uri, set_terminated, start_run

TRIAL_CPU = 0.01
# what the comparison table shows, in this order, when the trials report it; each perplexity is
# followed by the same perplexity on every eval.extra_paths text (perplexity_sparse.<stem>)
COLUMNS = ("perplexity_dense", "perplexity_pruned", "perplexity_sparse", "sparsity", "seconds_finetune")
# the grid axis of a sweep over job files (a sweep file's `base: [a.yaml, b.yaml]`): each trial
# starts from its own file, as the experiment design's four arms (configs/sweeps/experiment_design.yaml)
CONFIG_AXIS = "config"


@dataclass(frozen=True)
class Trial:
    name: str
    grid_values: dict  # key -> value of this trial
    overrides: list[str]
    config: Path | None = None  # its own job file, on the config axis


def split_axes(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """`key=a,b` -> an axis of the grid; `key=a` (or a YAML list `key=[a,b]`) -> a plain override."""
    axes, plain = {}, []
    for item in items:
        if item.startswith("~"):  # a key reset to its default: never an axis
            plain.append(item)
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"sweep argument {item!r}: expected key.sub=value or key.sub=v1,v2")
        if "," in raw and not raw.lstrip().startswith(("[", "{")):
            axes[key] = [v.strip() for v in raw.split(",")]
        else:
            plain.append(item)
    return axes, plain


def read_sweep_file(path: Path) -> tuple[Path | None, dict[str, list], list[str]]:
    """A sweep file: `base` (a job config, relative to the file, or a list of them: the config
    axis), `grid` (key -> values; optional with several bases), optional `overrides` (list of
    key=value)."""
    raw = read_yaml(path, "sweep file") or {}
    unknown = set(raw) - {"base", "grid", "overrides"}
    if unknown:
        raise UserError(f"sweep file {path}: unknown keys {sorted(unknown)} (allowed: base, grid, overrides)")
    bases = raw.get("base")
    if isinstance(bases, list):
        if not bases or not all(isinstance(b, str) for b in bases):
            raise UserError(f"sweep file {path}: base must be a job file or a non-empty list of job files")
        files = [(path.parent / b).resolve() for b in bases]
        for f in files:
            if not f.is_file():
                raise UserError(f"sweep file {path}: base {f} is not a file")
        base, config_axis = None, {CONFIG_AXIS: [str(f) for f in files]}
    else:
        base, config_axis = ((path.parent / bases).resolve() if bases else None), {}
    grid = raw.get("grid", {} if config_axis else None)
    if not isinstance(grid, dict) or not (grid or config_axis) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep file {path}: grid must map config keys to non-empty lists of values")
    if CONFIG_AXIS in grid:
        raise UserError(f"sweep file {path}: list the job files under base, not grid.{CONFIG_AXIS}")
    axes = {**config_axis, **{k: [_text(v) for v in vs] for k, vs in grid.items()}}
    return base, axes, list(raw.get("overrides") or [])


def is_sweep_file(raw) -> bool:
    """A grid, or a list of job files to compare, rather than a job config."""
    return isinstance(raw, dict) and ("grid" in raw or isinstance(raw.get("base"), list))


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def trials_of(axes: dict[str, list[str]], plain: list[str]) -> list[Trial]:
    """Every combination of the axes, in order; on the config axis a trial gets its job file
    (shown by its stem) instead of an override."""
    keys = list(axes)
    trials = []
    for index, values in enumerate(itertools.product(*(axes[k] for k in keys))):
        chosen = dict(zip(keys, values))
        config = chosen.pop(CONFIG_AXIS, None)
        shown = {CONFIG_AXIS: Path(config).stem, **chosen} if config is not None else chosen
        trials.append(Trial(f"trial{index}", shown, [*plain, *(f"{k}={v}" for k, v in chosen.items())],
                            Path(config) if config is not None else None))
    return trials


def configure(config_path: Path | None, trial: Trial, stamp: str) -> JobConfig:
    """The job config of one trial: its own export directory and alias, and every path made
    absolute (Ray Tune runs each trial in a directory of its own)."""

    cfg = load_config(trial.config or config_path, trial.overrides)
    base_dir = cfg.export.dir or f"exports/{cfg.registry.model_name}-sweep-{stamp}"
    cfg.export.dir = str(Path(base_dir).resolve() / trial.name)
    cfg.registry.alias = f"{cfg.registry.alias}-{trial.name}"
    check_alias(cfg.registry.alias, f"registry.alias of {trial.name}")  # now, not after the trial
    cfg.cluster.storage_path = str(Path(cfg.cluster.storage_path or "ray_results").resolve())
    for item in input_paths(cfg):
        set_input_path(cfg, item.key, str(Path(item.path).resolve()))
    if cfg.registry.enabled:
        cfg.registry.tracking_uri = resolved_tracking_uri(cfg.registry.tracking_uri)
    return cfg


def run_sweep(config: str | None, items: list[str]) -> list[dict]:
    """Validate every trial, run them as Ray Tune trials, log the comparison. Returns one row
    per trial (its grid values and metrics)."""
    path = Path(config) if config else None
    if path is not None and not path.is_file():
        raise UserError(f"config file {path} does not exist")
    axes, plain = split_axes(items)
    raw = read_yaml(path) if path is not None and path.suffix in (".yaml", ".yml") else None
    if is_sweep_file(raw):
        path, file_axes, file_plain = read_sweep_file(path)
        axes, plain = {**file_axes, **axes}, [*file_plain, *plain]
    if not axes:
        raise UserError("sweep: give at least one key with several values, e.g. prune.sparsity=0.3,0.5")
    apply_overrides({}, plain)  # syntax errors before anything starts
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trials = trials_of(axes, plain)
    configs = [configure(path, t, stamp) for t in trials]  # every mistake, before any trial runs
    first = configs[0]

    parent, tracking_uri = None, None
    if first.registry.enabled:

        tracking_uri = first.registry.tracking_uri
        parent = start_run(tracking_uri, first.registry.experiment, run_name=f"sweep-{stamp}",
                           artifact_location=first.registry.artifact_location)

    init_ray(first, extra_cpus=1)
    try:
        rows = _tune(trials, configs, parent, stamp, first)
    except BaseException:
        if parent is not None:

            end_run(tracking_uri, parent, "FAILED")
        raise
    if parent is not None:
        _log_comparison(rows, list(axes), tracking_uri, parent, Path(first.export.dir).parent)
    print(comparison_table(rows, list(axes)), flush=True)
    return rows


def _trial(config: dict) -> None:
    """One Ray Tune trial: a whole job."""
    from ray import tune  # lazy: Ray loads only where a sweep runs (seconds, and its logging)

    result = run(config_from_dict(config["job"]), parent_run_id=config["parent"])
    tune.report({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})


def _tune(trials: list[Trial], configs: list[JobConfig], parent: str | None, stamp: str,
          first: JobConfig) -> list[dict]:
    from ray import tune  # lazy, as in _trial

    import ray

    space = {"job": tune.grid_search([to_dict(c) for c in configs]), "parent": parent}
    storage = Path(first.cluster.storage_path)
    tuner = tune.Tuner(
        # a trial only drives its job (its Ray Train workers hold the CPUs): a token share
        tune.with_resources(_trial, {"cpu": TRIAL_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=trials_at_once(configs, ray.cluster_resources())),
        run_config=tune.RunConfig(name=f"dist-prune-sweep-{stamp}", storage_path=str(storage),
                                  verbose=0),
    )
    grid = tuner.fit()
    by_dir = {json.dumps(r.config["job"], sort_keys=True): r for r in grid}
    rows = []
    for trial, cfg in zip(trials, configs):
        result = by_dir.get(json.dumps(to_dict(cfg), sort_keys=True))
        error = None if result is None else result.error
        if result is None or error is not None:

            message = find_user_error(error) if error is not None else None
            raise UserError(f"sweep {trial.name} ({trial.grid_values}) failed: "
                            f"{message or (str(error).splitlines() or ['no result'])[0]}")
        # Ray Tune adds its own keys to what a trial reports, "config" among them (the whole
        # param space): the grid values go last so the config axis shows the job file's stem
        rows.append({**result.metrics, "trial": trial.name, **trial.grid_values})
    return rows


def trials_at_once(configs: list[JobConfig], resources: dict[str, float]) -> int:
    """How many trials' Ray Train workers the cluster (`ray.cluster_resources()`) holds at once.
    Ray Tune would start every trial, and the controller of each trial whose workers do not fit
    would fail its 60-second worker-group start and retry, a traceback a minute per waiting
    trial (Ray 2.60), until a running trial ends: on 2 local cores, the queued arms of the 4-arm
    experiment design logged 22 of them, 1,100 lines, in its first 12 minutes."""
    cpus = resources.get("CPU", 0.0) - TRIAL_CPU * len(configs)  # the trials' own token shares
    fits = cpus // max(c.cluster.num_workers * c.cluster.cpus_per_worker for c in configs)
    on_gpus = [c.cluster.num_workers for c in configs if c.cluster.use_gpu]
    if on_gpus:
        fits = min(fits, resources.get("GPU", 0.0) // max(on_gpus))
    return max(1, int(fits))


def comparison_table(rows: list[dict], keys: list[str]) -> str:
    """Markdown table: one row per trial, its grid values and the headline metrics."""
    present = {k for r in rows for k in r}
    texts = sorted({k.split(".", 1)[1] for k in present if k.startswith("perplexity_") and "." in k})
    wanted = [c for base in COLUMNS for c in [base, *(f"{base}.{t}" for t in texts if base.startswith("perplexity_"))]]
    columns = ["trial", *keys, *[c for c in wanted if c in present]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_comparison(rows: list[dict], keys: list[str], tracking_uri: str, parent: str,
                    out_dir: Path) -> None:
    import matplotlib  # lazy: only a sweep's comparison plot needs it (about 0.5 s)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "sweep.md"
    table.write_text(comparison_table(rows, keys) + "\n")
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(max(5, len(rows) * 0.9), 3.5))
    labels = [", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in keys) for r in rows]
    ax.bar(range(len(rows)), [r.get("perplexity_sparse", float("nan")) for r in rows], color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("sparse perplexity")
    ax.set_title("Sweep")
    fig.tight_layout()
    plot = out_dir / "sweep.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    client = MlflowClient(tracking_uri, tracking_uri)
    for artifact in (table, out_dir / "sweep.json", plot):
        client.log_artifact(parent, str(artifact))
    set_terminated(client, tracking_uri, parent, "FINISHED")
