"""The pruning recipe, as every Ray worker runs it: load -> calibrate -> score -> select
-> mask -> evaluate -> export. Read it top to bottom.

Every function here is collective: all ranks call it in the same order, each with
its own slice of every weight and its own share of the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_prune.io.checkpoint import configure_jit_builds, open_checkpoint
from dist_prune.collectives import all_reduce_, any_rank, rank_and_world
from dist_prune.config import JobConfig, config_from_dict
from dist_prune.data import shard
from dist_prune.sharding.engine import init_distributed, release_process_groups
from dist_prune.errors import UserError
from dist_prune.evaluate import perplexity
from dist_prune.io.export import StreamingExport
from dist_prune.io.formats import FORMATS, compressed_names, stored_nonzero
from dist_prune.io.shards import TensorSpec, parse_size
from dist_prune.train.loop import finetune
from dist_prune.train.state import Hooks
from dist_prune.masking import find_targets, pruned_counts
from dist_prune.methods import METHODS
from dist_prune.sharding.partition import (DTYPES, build_partitioned_model, compute_dtype, full_shape, gathered,
                                           held_bytes, local_range, local_weight, model_device)
from dist_prune.pruning import Pruned, prune
from dist_prune.registry import StepLogger
from dist_prune.report import StageTimer, progress, show_bars
from dist_prune.train.resume import read_meta, save_train_state
from dist_prune.structural import Geometry, ShrinkPlan, member_targets, shrink_plan
from dist_prune.structures import parse_structure


@dataclass
class WorkerJob:
    """Everything a worker needs; built and validated by the driver, small to pickle."""

    config: dict  # JobConfig as a dict
    model_dir: str  # Hugging Face safetensors directory
    calibration: torch.Tensor | None  # [num_samples, seq_len] token ids, or None
    evaluation: torch.Tensor | None  # [num_windows, seq_len] token ids, or None
    export_dir: str
    report: dict  # extra keys for sparsity.json (method, config hash, source, ...)
    training: torch.Tensor | None = None  # [num_windows, seq_len] fine-tuning windows, or None
    mlflow: dict | None = None  # {"tracking_uri", "run_id"}: rank 0 logs step metrics there
    more_evaluation: dict[str, torch.Tensor] = field(default_factory=dict)  # eval.extra_paths by stem

    def evaluation_sets(self) -> dict[str, torch.Tensor]:
        """Every evaluation text's windows by metric suffix: "" for eval.path, ".<stem>" for the
        others (perplexity_sparse, perplexity_sparse.<stem>)."""
        main = {} if self.evaluation is None else {"": self.evaluation}
        return {**main, **{f".{stem}": ids for stem, ids in self.more_evaluation.items()}}


def run_worker(job: WorkerJob, hooks: Hooks | None = None) -> dict:
    """Prune, fine-tune, evaluate and export; returns the job's metrics (identical on every
    rank). `hooks.resume`: a fine-tuning checkpoint to continue from (pruning is skipped:
    the masks and weights come from the checkpoint)."""
    return_large_frees_to_the_os()
    show_bars(False)  # one line per stage: report.py says why
    cfg = config_from_dict(job.config)
    rank, world = rank_and_world()
    timer, metrics = StageTimer(), {}
    method = METHODS[cfg.prune.method]
    hooks = hooks or Hooks()
    if hooks.resume is not None:
        meta = read_meta(hooks.resume)
        metrics.update(meta.get("metrics", {}), resumed_at_step=meta["step"])

    with timer("load"):
        checkpoint = open_checkpoint(Path(job.model_dir))
        dtype = compute_dtype(cfg.model.dtype, cfg.cluster.use_gpu)
        bar = progress(len(checkpoint.weight_map), "load (this rank's slices)", enabled=rank == 0)
        model = build_partitioned_model(Path(job.model_dir), checkpoint, dtype,
                                        trust_remote_code=cfg.model.trust_remote_code, progress=bar)
        bar.close()
        targets = find_targets(model, cfg.prune.exclude)
        # the largest share any rank holds: ZeRO-3 gives each about 1/W of every weight
        held = all_reduce_(torch.tensor([float(held_bytes(model))]), op=torch.distributed.ReduceOp.MAX)
        metrics["model_bytes_per_worker"] = int(held.item())
        structure = parse_structure(cfg.prune.structure)
        if structure.removes_parameters:  # whole heads, channels or layers: their projections
            targets = member_targets(targets, structure.kind, Geometry.of(model.config))

    layers = len(model.get_decoder().layers)
    eval_sets = {suffix: shard(ids, rank, world) for suffix, ids in job.evaluation_sets().items()}

    def evaluate(stage: str, what: str) -> None:
        if not eval_sets:
            return
        with timer("evaluate"):
            for suffix, windows in eval_sets.items():
                bar = progress(layers, f"perplexity{suffix} ({what})", enabled=rank == 0)
                metrics[f"perplexity_{stage}{suffix}"] = perplexity(model, windows, bar)
                bar.close()

    if cfg.eval.dense and hooks.resume is None:
        evaluate("dense", "dense")

    calibration = None if job.calibration is None else shard(job.calibration, rank, world)
    # Fine-tuning keeps the masks, a structural export cuts out what they removed; a plain
    # export needs only the counts (the masks would be half a bf16 model again).
    keep_masks = cfg.finetune.steps > 0 or structure.removes_parameters
    if hooks.resume is not None or cfg.prune.schedule == "cubic":  # masks come from the tuning
        pruned = Pruned(keep_masks)
        pruned.add({t.name: torch.zeros(local_weight(t.param).numel(), dtype=torch.bool,
                                        device=model_device(model)) for t in targets})
    else:
        pruned = prune(model, targets, method, cfg, calibration, timer, show=rank == 0, keep_masks=keep_masks)
    masks = pruned.masks
    if pruned.block_errors:  # prune.block_tuning: each layer's output error, one step per layer
        tuned_layers = sorted(pruned.block_errors)
        metrics["block_error_before"] = [pruned.block_errors[i][0] for i in tuned_layers]
        metrics["block_error_after"] = [pruned.block_errors[i][1] for i in tuned_layers]
    if cfg.finetune.steps > 0:
        if hooks.resume is None and cfg.prune.schedule == "oneshot":
            evaluate("pruned", "pruned, before tuning")  # the starting point of the fine-tuning
        hooks.metrics = metrics  # saved with every checkpoint
        teacher = None
        if cfg.finetune.distill.teaches:  # the dense model, in its own ZeRO-3 partitions
            with timer("load"):
                teacher = build_partitioned_model(Path(job.model_dir), checkpoint, dtype,
                                                  trust_remote_code=cfg.model.trust_remote_code)
        with timer("finetune"):
            state = finetune(model, targets, masks, cfg, job.training, job.evaluation_sets(), hooks, teacher)
        del teacher
        masks = state.masks
        metrics["finetune_history"] = state.history
        metrics["finetune_zero_stage"] = state.zero_stage
        metrics["finetune_sharding"] = state.sharding
    plan, report = None, {}
    if structure.removes_parameters:  # what the masks removed, to be cut out in the export
        plan = shrink_plan(structure.kind, Geometry.of(model.config), targets, masks)
        report = plan.report(targets, {n: full_shape(p) for n, p in model.named_parameters()})
        metrics.update({k: report["structural"][k] for k in ("parameters_before", "parameters_after",
                                                             "removed_fraction")})
    counts = (report.get("pruned_counts") or (pruned_counts(targets, masks) if cfg.finetune.steps > 0
                                              else pruned.counts(targets)))

    evaluate("sparse", "sparse")

    with timer("export"):
        export_model(model, checkpoint, cfg, Path(job.export_dir),
                     {**job.report, "pruned_tensors": sorted(counts), "pruned_counts": counts, **report}, plan)

    prunable = sum(t.numel for t in targets)
    metrics.update(pruned=sum(counts.values()), prunable=prunable,
                   sparsity=sum(counts.values()) / max(prunable, 1), world_size=world)
    metrics.update({f"seconds_{k}": v for k, v in timer.seconds.items()})
    return metrics


def export_model(model: torch.nn.Module, checkpoint, cfg: JobConfig, export_dir: Path,
                 report: dict, plan: ShrinkPlan | None = None) -> None:
    """Gather one full tensor at a time; rank 0 streams it into safetensors shards.

    The export format sizes the stored tensors of each tensor it compresses by its non-zero count:
    every rank counts its slices, and one all-reduce (which also carries "this rank failed") gives
    rank 0 every shard header before the first gather. A failure on rank 0 (disk full, ...) must not
    leave the other ranks waiting in a gather forever: rank 0 keeps taking part in the gathers and
    the outcome is agreed by one all-reduce at the end. A structural `plan` renames, shrinks or drops
    tensors and rewrites config.json (dist_prune/structural.py).
    """
    rank, _ = rank_and_world()
    fmt = FORMATS[cfg.export.format]
    exported = [(name, p, plan.exported(name, full_shape(p)) if plan else (name, full_shape(p)))
                for name, p in model.named_parameters()]
    params = [(name, p) for name, p, out in exported if out is not None]  # None: a removed layer's
    specs = [TensorSpec(*out, _export_dtype(cfg, checkpoint, name)) for name, _, out in exported if out]
    pruned = report.get("pruned_tensors", ())
    nonzero = _stored_nonzero(fmt, params, specs, pruned, plan)
    writer, failure = None, None
    bar = progress(len(params), "export", enabled=rank == 0)
    if rank == 0:
        try:
            writer = StreamingExport(export_dir, specs, parse_size(cfg.export.max_shard_size), fmt, pruned, nonzero,
                                     overwrite=cfg.export.overwrite)
        except Exception as e:  # noqa: BLE001 - reported collectively below
            failure = e
    for (name, param), spec in zip(params, specs):
        with gathered([param]):
            if writer is not None and failure is None:
                try:
                    tensor = plan.shrink(name, param.data) if plan else param.data
                    writer.write(spec.name, tensor.detach().to("cpu", spec.dtype))
                except Exception as e:  # noqa: BLE001
                    failure = e
        bar.update(1)
    bar.close()
    if writer is not None and failure is None:
        try:
            config = _json(checkpoint.directory / "config.json")
            config["dtype"] = str(specs[0].dtype).removeprefix("torch.") if specs else "float32"
            config.pop("torch_dtype", None)
            if plan is not None:
                config = plan.config(config)
            writer.finish(config, checkpoint.tokenizer_files(), report)
        except Exception as e:  # noqa: BLE001
            failure = e
    if failure is not None and writer is not None:
        writer.abort()
    if isinstance(failure, OSError):  # disk full, permissions: the user's to fix
        failure = UserError(f"export to {export_dir} failed: {failure.strerror or failure}")
    _raise_if_any_failed(failure, rank)


def _stored_nonzero(fmt, params: list, specs: list[TensorSpec], pruned,
                    plan: ShrinkPlan | None) -> dict[str, int]:
    """{exported name: its non-zero bit patterns} for every tensor `fmt` compresses, from the
    slices: each in the export dtype (a value may round to zero in it) and, for a tensor the plan
    shrinks, only the elements the export keeps. Collective: one all-reduce of all the counts and
    a failure flag; when any rank failed, every rank raises here."""
    names = set(compressed_names(fmt, [(s.name, s.shape) for s in specs], pruned))
    todo = [(name, param, spec) for (name, param), spec in zip(params, specs) if spec.name in names]
    if not todo:  # every rank knows the format and the tensors: none of them reduces
        return {}
    counts, failure = torch.zeros(len(todo) + 1, dtype=torch.int64), None
    try:
        for i, (name, param, spec) in enumerate(todo):
            local = local_weight(param).to(spec.dtype)
            keep = plan.kept_elements(name, full_shape(param), *local_range(param)) if plan else None
            counts[i] = stored_nonzero(local if keep is None else local[keep.to(local.device)])
    except Exception as e:  # noqa: BLE001 - agreed in the all-reduce below
        failure = e
    counts[-1] = failure is not None
    all_reduce_(counts)
    if counts[-1]:
        _raise(failure, rank_and_world()[0])
    return {spec.name: int(c) for (_, _, spec), c in zip(todo, counts.tolist())}


def _export_dtype(cfg: JobConfig, checkpoint, name: str) -> torch.dtype:
    return checkpoint.dtype(name) if cfg.export.dtype == "auto" else DTYPES[cfg.export.dtype]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _raise_if_any_failed(failure: Exception | None, rank: int) -> None:
    if any_rank(failure is not None):
        _raise(failure, rank)


def _raise(failure: Exception | None, rank: int) -> None:
    """Some rank failed: this rank's own error, or that another rank failed."""
    if failure is not None:
        raise failure
    raise RuntimeError(f"rank {rank}: another rank failed (see its error)")


def ray_train_loop(payload: dict) -> None:
    """Entry point of each Ray Train worker (TorchTrainer has set up the process group).
    After a worker failure Ray restarts the group; fine-tuning then resumes from the last
    checkpoint the workers reported."""
    configure_jit_builds()
    use_gpu = payload["config"]["cluster"]["use_gpu"]
    # DeepSpeed picks its accelerator once, at import, from what it finds: a CPU job on a GPU
    # machine must say so, or zero.Init would put the partitions on a GPU next to gloo
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if use_gpu:
        use_assigned_gpu()
    import ray.train  # lazy: Ray only where Ray runs the worker (run_worker runs without it)

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    init_distributed("nccl" if use_gpu else "gloo")
    job = WorkerJob(**payload)
    rank = rank_and_world()[0]
    hooks = Hooks(checkpoint=_report_checkpoint)
    if job.mlflow and rank == 0:
        hooks.log = StepLogger(job.mlflow["tracking_uri"], job.mlflow["run_id"])
    resume = ray.train.get_checkpoint()
    if resume is not None and not (Path(resume.path) / "rank0.json").exists():
        resume = None  # the final metrics-only checkpoint of a finished attempt
    with contextlib.ExitStack() as stack:
        if resume is not None:
            hooks.resume = Path(stack.enter_context(resume.as_directory()))
        metrics = run_worker(job, hooks)
    # Ray Train V2 keeps only metrics that come with a checkpoint: rank 0 attaches one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(_scalars(metrics), checkpoint=checkpoint)
    # what DeepSpeed keeps of its engines' groups, so that Ray's teardown of the groups ends them
    release_process_groups(destroy=False)


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> None:
    """Have glibc serve every block of `threshold` bytes or more with its own mapping, returned
    to the OS when freed (mallopt M_MMAP_THRESHOLD). By default the threshold rises to the largest
    block freed so far (up to 32 MiB); then the per-layer temporaries of a job (gathered layers,
    scores, read buffers) come from the heap, which keeps what they freed: a 0.5B bf16 model on
    2 workers peaked at 1,866 MiB per worker, and at 1,203 MiB with this (benchmarks/scale.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def use_assigned_gpu() -> torch.device:
    """Make the GPU Ray assigned to this worker the current device, and DeepSpeed's: zero.Init and
    the engine use cuda:$LOCAL_RANK, which is another GPU (or none) when Ray shows each worker
    only its own (CUDA_VISIBLE_DEVICES) or numbers them differently."""
    import ray.train.torch  # lazy, as in ray_train_loop

    if not torch.cuda.is_available():
        raise UserError("cluster.use_gpu is true but a Ray worker sees no CUDA device (torch "
                        f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    os.environ["LOCAL_RANK"] = str(device.index)
    return device


def _report_checkpoint(state, training, metrics: dict) -> None:
    """Every rank writes its part of a fine-tuning checkpoint; Ray merges them."""
    import ray.train  # lazy, as in ray_train_loop

    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(Path(tmp), state, training, {"metrics": _scalars(metrics)})
        ray.train.report({"step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
