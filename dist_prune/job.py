"""The driver of one job: prepare on the driver, prune on Ray workers, register the result.

Everything that can be checked without the workers (config, checkpoint files,
tokenization, the export destination) is checked here first, so a user mistake
costs seconds, not a cluster start.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dist_prune import __version__, git_commit
from dist_prune.io.checkpoint import configure_jit_builds, open_checkpoint, resolve_model
from dist_prune.config import (JobConfig, calibration_split, config_sha256, reads_calibration_data,
                               reads_training_text, sampled_windows_of, scope_of, to_dict)
from dist_prune.data import (calibration_windows, eval_windows, read_text, read_training_text,
                             tokenize, training_windows)
from dist_prune.errors import UserError
from dist_prune.generated import sampled_inputs, with_samples
from dist_prune.io.destination import check_destination, check_not_an_input, exclusive
from dist_prune.io.model_files import check_contained, read_side_file
from dist_prune.io.formats import format_of
from dist_prune.io.verify import verify_export
from dist_prune.masking import find_targets
from dist_prune.methods import METHODS
from dist_prune.preflight import check_architecture, load_tokenizer, meta_model, read_config
from dist_prune.ray_driver import (find_user_error, interruptible_trainer, out_of_memory, ray_address,
                                   tracebacks_held)
from dist_prune.report import (StageTimer, bars_wanted, layer_sparsity_plot, library_bars_off, plan_table,
                               summary_table)
from dist_prune.structural import check_model
from dist_prune.structures import check_shape, parse_structure
from dist_prune.redact import redact_uri
from dist_prune.registry import check_registry, end_run, register_export, resolved_tracking_uri, start_run
from dist_prune.worker import WorkerJob, ray_train_loop


@dataclass
class JobResult:
    metrics: dict
    export_dir: Path
    model_uri: str | None


def prepare(cfg: JobConfig, *, sample: bool = True) -> WorkerJob:
    """Resolve the model, tokenize the data and fix the export directory. `sample=False` (a dry
    run) leaves out the windows that data.calibration.generated and finetune.data.generated_windows
    would sample from the dense model."""
    if not bars_wanted():
        library_bars_off()
    source = None if cfg.model.path is None else Path(cfg.model.path)
    if source is not None and source.is_dir():
        check_contained(source)  # before any file in it is read
    if source is not None and (source / "sparsity.json").is_file():  # a dist-prune export: its manifest must hold
        fmt = format_of(verify_export(source))
        if not fmt.loadable:  # its pruned weights are stored as bitmask + values, not as tensors
            raise UserError(f"model.path {source} is a {fmt.name} export; decompress it first "
                            f"(dist-prune decompress {source} DIR)")
    model_dir = resolve_model(cfg.model.path, allow_pickle=cfg.model.allow_pickle,
                              trust_remote_code=cfg.model.trust_remote_code)
    check_remote_code(model_dir, cfg.model.trust_remote_code)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    export_dir = Path(cfg.export.dir or f"exports/{cfg.registry.model_name}-{stamp}").resolve()
    check_not_an_input(export_dir, {"model.path": source, "the converted model": model_dir,
                                    "data.calibration.path": cfg.data.calibration.path, "eval.path": cfg.eval.path,
                                    **{f"eval.extra_paths[{i}]": p for i, p in enumerate(cfg.eval.extra_paths)},
                                    "finetune.data.path": cfg.finetune.data.path, **registry_files(cfg)})
    check_destination(export_dir, cfg.export.overwrite)
    checkpoint = open_checkpoint(model_dir)
    for path in checkpoint.tokenizer_files().values():
        read_side_file(path)  # parsed here, before a worker copies it into the export
    check_architecture(checkpoint, cfg.model.trust_remote_code)
    checkpoint.check_finite()  # seconds here, not a cluster start, for a NaN in the weights
    check_targets(cfg, model_dir)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    calibration, evaluation, more_evaluation = None, None, {}
    check_target_shapes(cfg, checkpoint)
    to_sample = sampled_windows_of(cfg)  # windows sampled from the dense model instead of read from a text
    cal = cfg.data.calibration
    from_text = calibration_split(cfg)[0]  # the rest, if any, sampled from the dense model
    if reads_calibration_data(cfg) and from_text:
        ids = tokenize(read_text(cal.path, role="calibration"), tokenizer)
        calibration = calibration_windows(ids, from_text, cal.seq_len, cal.seed,
                                          source=cal.path or "(built-in corpus)")
    if cfg.eval.num_windows > 0:
        ids = tokenize(read_text(cfg.eval.path, role="eval"), tokenizer)
        evaluation = eval_windows(ids, cfg.eval.num_windows, cfg.eval.seq_len,
                                  source=cfg.eval.path or "(built-in corpus)")
        for path in cfg.eval.extra_paths:
            ids = tokenize(read_text(path, role="eval"), tokenizer)
            more_evaluation[Path(path).stem] = eval_windows(ids, cfg.eval.num_windows, cfg.eval.seq_len,
                                                            source=path)
    training = None
    data = cfg.finetune.data
    if reads_training_text(cfg):
        ids = tokenize(read_training_text(data.path, text_column=data.text_column, split=data.split),
                       tokenizer)
        training = training_windows(ids, data.seq_len, source=data.path or "(built-in corpus)")
    source_sha256 = checkpoint.shard_sha256()
    if to_sample and sample:  # minutes: after every text above has been read and checked
        sampled = sampled_inputs(cfg, model_dir, tokenizer.all_special_ids, source_sha256, show=True)
        calibration, training = with_samples(cfg, calibration, training, sampled)
    report = {"method": cfg.prune.method, "structure": cfg.prune.structure,
              "scope": scope_of(cfg.prune), "target_sparsity": cfg.prune.sparsity,
              "config_sha256": config_sha256(cfg), "source_model": str(cfg.model.path or model_dir),
              "source_sha256": source_sha256, "dist_prune_commit": git_commit(),
              "tensors_in_checkpoint": len(checkpoint.weight_map)}
    # absolute: Ray Train workers run in a directory of their own
    return WorkerJob(to_dict(cfg), str(model_dir.resolve()), calibration, evaluation, str(export_dir), report,
                     training=training, more_evaluation=more_evaluation)


def registry_files(cfg: JobConfig) -> dict[str, Path]:
    """The local files of the MLflow store a job registers into (a sqlite database or file store,
    its artifact folder): the only copy of every registered version's files, which replacing an
    export.dir around them would delete."""
    if not cfg.registry.enabled:
        return {}
    from dist_prune.registry import artifacts_next_to, resolved_tracking_uri  # lazy: imports mlflow

    uri = resolved_tracking_uri(cfg.registry.tracking_uri)
    files = {}
    if uri.startswith("sqlite:///"):
        files["registry.tracking_uri"] = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    elif uri.startswith("file:") or "://" not in uri:  # a file store: runs and artifacts inside
        files["registry.tracking_uri"] = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
    artifacts = cfg.registry.artifact_location or artifacts_next_to(uri)
    if artifacts and artifacts.startswith("file:"):
        files["registry.artifact_location"] = Path(urlsplit(artifacts).path)
    return files


def check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """A checkpoint whose config.json maps to its own Python code runs that code on load."""
    config = read_config(model_dir)
    if "auto_map" in config and not trust_remote_code:
        raise UserError(f"model.path {model_dir} ships its own model code (auto_map in config.json); "
                        "review it, then set model.trust_remote_code=true")


def check_targets(cfg: JobConfig, model_dir: Path) -> None:
    """The workers' targets (masking.find_targets), found on the model built on the meta device
    (no memory, no weights read): prune.exclude matching every one is refused before Ray starts."""
    find_targets(meta_model(model_dir, cfg.model.trust_remote_code), cfg.prune.exclude)


def check_target_shapes(cfg: JobConfig, checkpoint) -> None:
    """Refuse a structure that does not tile a weight, before any worker starts."""
    structure = parse_structure(cfg.prune.structure)
    if structure.removes_parameters:  # whole groups of every layer: checked on the model
        config = read_config(checkpoint.directory)
        check_model(structure.kind, cfg.prune.sparsity, config, list(checkpoint.weight_map),
                    lambda name: any(fnmatch.fnmatchcase(name, p) for p in cfg.prune.exclude))
        return
    for name in checkpoint.weight_map:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.prune.exclude):
            continue
        shape = checkpoint.shape(name)
        if len(shape) == 2:
            try:
                check_shape(structure, shape, name)
            except ValueError as e:
                raise UserError(f"prune.structure {cfg.prune.structure}: {e}") from None


def init_ray(cfg: JobConfig, *, extra_cpus: int = 0) -> None:
    """Connect to the job's Ray cluster (ray_driver.ray_address), or start a local Ray sized for the job
    (plus `extra_cpus` for the drivers of sweep trials)."""
    import ray  # lazy: Ray (about 1 s, and its log handlers) only once a job really starts

    if ray.is_initialized():
        return
    configure_jit_builds()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address, where = ray_address()
    if address is not None:
        if "RAY_ADDRESS" not in where:
            print(f"dist-prune: running on the Ray cluster at {where} (RAY_ADDRESS=local: a Ray of this "
                  "job's own)", flush=True)
        try:  # no address=: Ray reads the same one itself, and only then takes the token that
            # `ray start` left in ~/.ray/auth_token (with address= it sends none: refused, Ray 2.60)
            ray.init(log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at {where} ({str(e).splitlines()[0]})") from None
        return
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    # Ray Train's PreemptionWatcher follows spot nodes being drained; a local Ray has none, and the
    # watcher's start logged a core_worker.cc error line in every job. The actors inherit this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # A local run may oversubscribe the laptop's cores (workers are processes);
    # the object store only carries small token tensors. The dashboard (about 2 s more to start)
    # serves the State API that Ray Train's placement-group cleaner asks every second: without it
    # each question logged a warning (14 of a 40-s job's 58 log lines, tests/test_end_to_end.py).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed) + extra_cpus, include_dashboard=True,
             object_store_memory=256 * 1024**2, log_to_driver=True)


def _probe(address: str, where: str, timeout: float = 5.0) -> None:
    """Ray retries an unreachable cluster for minutes; a TCP connect answers in seconds."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {where} "
                        f"({getattr(e, 'strerror', None) or e})") from None


def placeable_workers(nodes: list[dict], cpus: float, gpus: float, wanted: int) -> int:
    """How many of `wanted` workers of `cpus` CPUs and `gpus` GPUs the nodes' total resources
    hold; one worker's resources come from one node."""
    placed = 0
    for resources in nodes:
        fits = [resources.get(key, 0) // need for key, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
        placed += int(min(fits)) if fits else wanted
    return min(placed, wanted)


def check_placement(cfg: JobConfig) -> None:
    """Ray Train waits forever for workers the cluster cannot place: refuse them in one line.
    (Against the nodes there now: an autoscaling cluster is judged by its current size.)"""
    import ray  # lazy, as in init_ray

    c = cfg.cluster
    gpus = 1 if c.use_gpu else 0
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if placeable_workers(nodes, c.cpus_per_worker, gpus, c.num_workers) < c.num_workers:
        total = {key: sum(n.get(key, 0) for n in nodes) for key in ("CPU", "GPU")}
        raise UserError(f"cluster.num_workers={c.num_workers} workers of {c.cpus_per_worker} CPU"
                        f"{' and 1 GPU' if gpus else ''} each cannot be placed: the Ray cluster has "
                        f"{len(nodes)} node{'s' * (len(nodes) != 1)} with {total['CPU']:g} CPUs and "
                        f"{total['GPU']:g} GPUs in all")


def fit(job: WorkerJob, cfg: JobConfig) -> dict:
    """Run the workers; return rank 0's metrics. Worker UserErrors come back as UserErrors."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # lazy, as in init_ray
    from ray.train.torch import TorchTrainer

    # Ray's own default (~/ray_results) unless the config names one: not the working directory
    storage = None if cfg.cluster.storage_path is None else str(Path(cfg.cluster.storage_path).resolve())
    trainer = interruptible_trainer(TorchTrainer)(
        ray_train_loop,
        train_loop_config=vars(job),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        # A name of its own: Ray Train loads the run snapshot it finds under a reused name and
        # hands the last job's checkpoints to this one (same export name, same storage path).
        run_config=RunConfig(name=f"dist-prune-{Path(job.export_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"
                                  f"-{uuid.uuid4().hex[:6]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.finetune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    with tracebacks_held() as worker_tracebacks:  # a worker's UserError is one line, not 60 (ray_driver.py)
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - re-raised unless it wraps a user mistake
            user_error = find_user_error(e) or out_of_memory(e)
            if user_error is not None:
                worker_tracebacks.drop()
                raise UserError(user_error) from None
            raise
        except KeyboardInterrupt:  # the workers' reports of being stopped are no news to the user
            worker_tracebacks.drop()
            raise
    metrics = dict(result.metrics)
    if result.checkpoint is not None:  # rank 0's whole metrics, fine-tuning history included
        with result.checkpoint.as_directory() as directory:
            path = Path(directory) / "metrics.json"
            if path.is_file():
                metrics = json.loads(path.read_text())
    return metrics


@contextlib.contextmanager
def _keep_export_on_failure(export_dir: Path, cfg: JobConfig):
    """A registry failure after the job must not lose the model: say where it is and how to
    register it later."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{e}; the verified export is kept at {export_dir}: register it later with "
                        f"`dist-prune register {export_dir} --model-name {cfg.registry.model_name}`") from None


def check(cfg: JobConfig, *, dry_run: bool = False) -> WorkerJob:
    """Everything the driver checks before Ray starts (`dist-prune run --dry-run` stops here):
    the cluster address answers, the model and data (`prepare`), the registry. A dry run
    creates no MLflow database: for a new sqlite file it checks that its directory is writable."""
    address, where = ray_address()
    if address is not None:
        _probe(address, where)
    job = prepare(cfg, sample=not dry_run)
    if not cfg.registry.enabled:
        return job
    # before the workers: a finished model needs somewhere to go
    database = new_sqlite_database(resolved_tracking_uri(cfg.registry.tracking_uri))
    if dry_run and database is not None:
        if not os.access(database.parent, os.W_OK):
            raise UserError(f"registry: cannot create the MLflow database {database}: its directory "
                            "does not exist or is not writable")
    else:
        check_registry(cfg.registry.tracking_uri)
    return job


def dry_run(cfg: JobConfig) -> str:
    """`dist-prune run --dry-run`: every check of `check`, then what the job would run."""
    job = check(cfg, dry_run=True)
    registry = redact_uri(resolved_tracking_uri(cfg.registry.tracking_uri)) if cfg.registry.enabled else None
    return ("dry run: config, model, data, export directory and registry check out; nothing was started. "
            "The job would run:\n" + plan_table(cfg, job, cluster=os.environ.get("RAY_ADDRESS"), registry_uri=registry))


def new_sqlite_database(tracking_uri: str) -> Path | None:
    """The file of a sqlite tracking URI that does not exist yet (MLflow creates it)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = Path(tracking_uri[len(prefix):])
    return None if path.exists() else path


def run(cfg: JobConfig, *, parent_run_id: str | None = None) -> JobResult:
    """`dist-prune run`: the whole job, end to end. `parent_run_id`: the MLflow run of the
    sweep this job is a trial of."""
    timer = StageTimer()
    with timer("prepare"):
        job = check(cfg)
    with exclusive(Path(job.export_dir)):  # a second job into the same export.dir stops here
        return _run_prepared(cfg, job, timer, parent_run_id)


def _run_prepared(cfg: JobConfig, job: WorkerJob, timer: StageTimer, parent_run_id: str | None) -> JobResult:
    init_ray(cfg)
    check_placement(cfg)  # before the MLflow run: an impossible job leaves no trace there
    run_id = None
    if cfg.registry.enabled:  # opened now, so the workers can log training steps into it

        tracking_uri = resolved_tracking_uri(cfg.registry.tracking_uri)
        run_id = start_run(tracking_uri, cfg.registry.experiment, run_name=Path(job.export_dir).name,
                           parent_run_id=parent_run_id, artifact_location=cfg.registry.artifact_location)
        job.mlflow = {"tracking_uri": tracking_uri, "run_id": run_id}
    try:
        metrics = fit(job, cfg)
    except BaseException:
        if run_id is not None:
            end_run(job.mlflow["tracking_uri"], run_id, "FAILED")
        raise
    metrics["seconds_prepare"] = timer.seconds["prepare"]
    export_dir = Path(job.export_dir)
    manifest = verify_export(export_dir)  # nothing unverified is registered
    plot = layer_sparsity_plot(manifest["tensors"], export_dir.parent / f"{export_dir.name}-layers.png")
    model_uri = None
    if cfg.registry.enabled:

        with timer("register"), _keep_export_on_failure(export_dir, cfg):
            registered = register_export(
                export_dir, tracking_uri=job.mlflow["tracking_uri"], experiment=cfg.registry.experiment,
                model_name=cfg.registry.model_name, alias=cfg.registry.alias, params=to_dict(cfg),
                metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                artifacts=[plot, export_dir / "sparsity.json"],
                tags={"dist_prune.version": __version__, "dist_prune.method": cfg.prune.method},
                run_id=run_id)
        metrics["seconds_register"] = timer.seconds["register"]
        model_uri = registered.alias_uri
    print(summary_table(metrics, model_uri, str(export_dir)), flush=True)
    return JobResult(metrics, export_dir, model_uri)
