"""Validation of a job config: ranges, choices and combinations that types alone do not
express. Everything is checked on the driver, before a single worker starts; a mistake
costs the user one line (`config: ...`, naming the key and what is allowed) and exit 2.

The plug-in registries (methods, structures, scopes, formats) are imported inside the functions
that ask them: they import torch (about 1.5 s), and `dist_prune.config` must import without it
(`dist-prune keys`, `--help`, the driver's parse).
"""

from __future__ import annotations

import re
from pathlib import Path

from dist_prune.config._schema import JobConfig, scope_of
from dist_prune.errors import UserError

# Allowed values of enumerated keys. What a method allows comes from its `Method` object
# (dist_prune/methods/), imported in `validate` so this module stays importable without torch.
DTYPES = ("auto", "float32", "bfloat16", "float16")
NORMS = ("l1", "l2")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"config: {message}")


def validate(cfg: JobConfig, *, check_paths: bool = True) -> None:
    """Range and choice checks that types alone do not express."""
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)

    p = cfg.prune
    _require(p.method in METHODS, f"prune.method '{p.method}' is unknown (allowed: {', '.join(METHODS)})")
    method = METHODS[p.method]
    _require(0.0 <= p.sparsity < 1.0, f"prune.sparsity must be in [0, 1), got {p.sparsity}")
    from dist_prune.selection import SCOPES  # lazy, as METHODS
    from dist_prune.structures import parse_structure

    _require(p.scope is None or p.scope in SCOPES,
             f"prune.scope '{p.scope}' is unknown (allowed: {', '.join(SCOPES)})")
    try:
        structure = parse_structure(p.structure)
    except ValueError as e:
        raise UserError(f"config: prune.structure '{p.structure}': {e}") from None
    _require(p.norm in NORMS, f"prune.norm '{p.norm}' is unknown (allowed: {', '.join(NORMS)})")
    _require(not (structure.kind == "block" and p.scope == "row"),
             "prune.scope row does not apply to block structures (allowed: global, layer)")
    _require(structure.kind != "n:m" or p.scope is None,
             "prune.scope does not apply to N:M structures (every group of M is its own scope)")
    _validate_method(method, p, structure)
    cal = cfg.data.calibration
    _require(cal.num_samples >= 1, f"data.calibration.num_samples must be >= 1, got {cal.num_samples}")
    _require(cal.seq_len >= 2, f"data.calibration.seq_len must be >= 2, got {cal.seq_len}")
    _require(method.calibration != "gradients" or cal.batch_size % cfg.cluster.num_workers == 0,
             f"data.calibration.batch_size={cal.batch_size} must be a multiple of "
             f"cluster.num_workers={cfg.cluster.num_workers} for prune.method {p.method}")
    _require(cal.batch_size >= 1, f"data.calibration.batch_size must be >= 1, got {cal.batch_size}")
    _require(cfg.eval.seq_len >= 2, f"eval.seq_len must be >= 2, got {cfg.eval.seq_len}")
    _require(cfg.eval.num_windows >= 0, f"eval.num_windows must be >= 0, got {cfg.eval.num_windows}")
    stems = [Path(path).stem for path in cfg.eval.extra_paths]
    _require(len(set(stems)) == len(stems), f"eval.extra_paths names two files with the same stem "
             f"({', '.join(stems)}): their metrics would collide")
    _require(all(re.fullmatch(r"[A-Za-z0-9_\-]+", stem) for stem in stems),
             f"eval.extra_paths: a file stem names its metrics, so it may hold only letters, digits, "
             f"_ and - (got {', '.join(stems)})")
    _require(cfg.cluster.num_workers >= 1,
             f"cluster.num_workers must be >= 1, got {cfg.cluster.num_workers}")
    _require(cfg.cluster.cpus_per_worker >= 1,
             f"cluster.cpus_per_worker must be >= 1, got {cfg.cluster.cpus_per_worker}")
    for key, value in (("model.dtype", cfg.model.dtype), ("export.dtype", cfg.export.dtype)):
        _require(value in DTYPES, f"{key} '{value}' is unknown (allowed: {', '.join(DTYPES)})")
    from dist_prune.io.formats import FORMATS  # lazy, as METHODS
    from dist_prune.io.shards import parse_size

    parse_size(cfg.export.max_shard_size)
    _require(cfg.export.format in FORMATS, f"export.format '{cfg.export.format}' is unknown (allowed: "
             f"{', '.join(FORMATS)})")
    problem = FORMATS[cfg.export.format].check(structure)
    _require(problem is None, f"export.format {cfg.export.format} {problem}")
    if check_paths:
        if cfg.model.path is not None:
            _require(Path(cfg.model.path).exists(), f"model.path {cfg.model.path} does not exist")
        for key, value in (("data.calibration.path", cal.path), ("eval.path", cfg.eval.path),
                           *(("eval.extra_paths", path) for path in cfg.eval.extra_paths)):
            _require(value is None or Path(value).is_file(), f"{key} {value} is not a file")
    _validate_registry_names(cfg)
    validate_layer_choices(cfg)
    validate_finetune(cfg, check_paths=check_paths)


LAYER_SPARSITIES = ("uniform", "owl")


def _validate_registry_names(cfg: JobConfig) -> None:
    """MLflow's rules for the model name and the alias, here and not after pruning (the
    registration checks them again, before it creates anything)."""
    from dist_prune.registry.names import check_alias, check_model_name  # lazy: the registry imports torch

    try:
        check_model_name(cfg.registry.model_name)
        check_alias(cfg.registry.alias)
    except UserError as e:
        raise UserError(f"config: {e}") from None


def _validate_method(method, p, structure) -> None:
    """What the chosen method supports: structures, scopes, its own checks."""
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)
    from dist_prune.methods.base import GROUP_STRUCTURES

    kind = structure.kind
    if kind not in method.structures:
        if set(method.structures) <= set(GROUP_STRUCTURES):
            _require(False, f"prune.method {method.name} scores whole groups: use prune.structure "
                     f"{', '.join(method.structures[:-1])} or {method.structures[-1]}")
        if kind in GROUP_STRUCTURES:
            ranking = [name for name, m in METHODS.items() if kind in m.structures]
            _require(False, f"prune.method {method.name} cannot rank whole {kind} (allowed: {', '.join(ranking)})")
        _require(False, f"prune.method {method.name} prunes {' or '.join(method.structures)} patterns, "
                 f"not prune.structure {p.structure}")
    problem = method.check(p, structure) if method.check else None
    _require(problem is None, problem or "")
    _require(p.scope is None or p.scope in method.scopes or not method.scopes,
             f"prune.scope {p.scope} does not apply to prune.method {method.name} "
             f"(allowed: {', '.join(method.scopes)}, or leave it empty)")


def validate_layer_choices(cfg: JobConfig) -> None:
    """Whole heads / channels / layers and layer sparsities (OWL)."""
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)
    from dist_prune.structural import UNITS

    p = cfg.prune
    kind = p.structure.strip().lower()
    if kind in UNITS:
        scope = UNITS[kind].scope
        _require(p.scope in (None, scope), f"prune.scope {p.scope} does not apply to prune.structure "
                 f"{kind} (allowed: {scope}, or leave it empty)")
    _require(p.layer_sparsity in LAYER_SPARSITIES, f"prune.layer_sparsity '{p.layer_sparsity}' is "
             f"unknown (allowed: {', '.join(LAYER_SPARSITIES)})")
    if p.layer_sparsity == "uniform":
        return
    able = [name for name, m in METHODS.items() if p.layer_sparsity in m.layer_sparsities]
    _require(p.layer_sparsity in METHODS[p.method].layer_sparsities, f"prune.layer_sparsity "
             f"{p.layer_sparsity} ranks layers by their outlier wanda scores: use prune.method "
             f"{' or '.join(able)}, not {p.method}")
    _require(kind == "unstructured", "prune.layer_sparsity owl needs prune.structure unstructured")
    _require(scope_of(p) in ("layer", "row"), "prune.layer_sparsity owl sets one target per layer: "
             "prune.scope must be layer or row, not global")
    _require(p.owl_threshold > 0, f"prune.owl_threshold must be > 0, got {p.owl_threshold}")
    _require(0 <= p.owl_lambda <= min(p.sparsity, 1 - p.sparsity),
             f"prune.owl_lambda must be in [0, {min(p.sparsity, 1 - p.sparsity):g}] (= min(sparsity, "
             f"1 - sparsity), so every layer's sparsity stays in [0, 1]), got {p.owl_lambda}")


SCHEDULES = ("oneshot", "cubic")
LR_SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = ("auto", "0", "2", "3")


def validate_finetune(cfg: JobConfig, *, check_paths: bool = True) -> None:
    """The fine-tuning section and the gradual-pruning keys of the prune section."""
    ft, p = cfg.finetune, cfg.prune
    _require(ft.steps >= 0, f"finetune.steps must be >= 0, got {ft.steps}")
    _require(p.schedule in SCHEDULES, f"prune.schedule '{p.schedule}' is unknown (allowed: "
             f"{', '.join(SCHEDULES)})")
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)

    method = METHODS[p.method]
    if method.calibration == "training":
        _require(p.schedule == "cubic", f"prune.method {p.method} scores weights while they train: "
                 "use prune.schedule cubic (with finetune.steps > 0)")
    if p.schedule == "cubic":
        _require(ft.steps > 0, "prune.schedule cubic prunes during fine-tuning: set finetune.steps > 0")
        rescoring = [name for name, m in METHODS.items() if "cubic" in m.schedules]
        _require("cubic" in method.schedules, f"prune.schedule cubic re-scores during training with "
                 f"{', '.join(rescoring)}; prune.method is {p.method}")
        _require(p.structure == "unstructured", "prune.schedule cubic needs prune.structure unstructured")
        _require(0.0 <= p.initial_sparsity <= p.sparsity, f"prune.initial_sparsity must be in [0, "
                 f"prune.sparsity={p.sparsity}], got {p.initial_sparsity}")
        end = ft.steps if p.end_step is None else p.end_step
        _require(0 <= p.start_step <= end <= ft.steps, f"prune.start_step={p.start_step} <= "
                 f"prune.end_step={end} <= finetune.steps={ft.steps} must hold")
        _require(p.interval >= 1, f"prune.interval must be >= 1, got {p.interval}")
        _require(ft.zero_stage != "2" or not method.reads_gradient_partitions,
                 f"prune.method {p.method} reads gradient partitions during training: use "
                 "finetune.zero_stage 3 or 0")
    if ft.steps == 0:
        return
    _require(ft.zero_stage in ZERO_STAGES, f"finetune.zero_stage must be one of {', '.join(ZERO_STAGES)}, "
             f"got {ft.zero_stage}")
    low_precision = cfg.model.dtype in ("bfloat16", "float16") or (cfg.model.dtype == "auto" and cfg.cluster.use_gpu)
    _require(ft.zero_stage != "0" or not low_precision,
             f"finetune.zero_stage 0 trains the weights in their own dtype, with no fp32 master copy: it needs "
             f"model.dtype float32 (this job computes in {cfg.model.dtype}); use stage 2 or 3")
    _require(ft.lr_schedule in LR_SCHEDULES, f"finetune.lr_schedule '{ft.lr_schedule}' is unknown "
             f"(allowed: {', '.join(LR_SCHEDULES)})")
    _require(ft.lr > 0, f"finetune.lr must be > 0, got {ft.lr}")
    _require(len(ft.betas) == 2 and all(0 <= b < 1 for b in ft.betas),
             f"finetune.betas must be two numbers in [0, 1), got {ft.betas}")
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        _require(getattr(ft, key) >= 1, f"finetune.{key} must be >= 1, got {getattr(ft, key)}")
    for key in ("warmup_steps", "eval_interval", "log_interval", "checkpoint_interval", "max_failures"):
        _require(getattr(ft, key) >= 0, f"finetune.{key} must be >= 0, got {getattr(ft, key)}")
    _require(ft.max_grad_norm >= 0, f"finetune.max_grad_norm must be >= 0, got {ft.max_grad_norm}")
    _require(ft.data.seq_len >= 2, f"finetune.data.seq_len must be >= 2, got {ft.data.seq_len}")
    _require(ft.neftune.alpha >= 0, f"finetune.neftune.alpha must be >= 0, got {ft.neftune.alpha}")
    _require(0 <= ft.distill.beta <= 1, f"finetune.distill.beta must be in [0, 1], got {ft.distill.beta}")
    _require(ft.distill.temperature > 0,
             f"finetune.distill.temperature must be > 0, got {ft.distill.temperature}")
    _require(ft.max_failures == 0 or ft.checkpoint_interval > 0,
             "finetune.max_failures > 0 restarts from checkpoints: set finetune.checkpoint_interval > 0")
    if check_paths and ft.data.path is not None:
        _require(Path(ft.data.path).exists(), f"finetune.data.path {ft.data.path} does not exist")
