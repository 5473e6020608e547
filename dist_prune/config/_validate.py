"""Validation of a job config: ranges, choices and combinations that types alone do not
express. Everything is checked on the driver, before a single worker starts; a mistake
costs the user one line (`config: ...`, naming the key and what is allowed) and exit 2.

The plug-in registries (methods, structures, scopes, formats) are imported inside the functions
that ask them: they import torch (about 1.5 s), and `dist_prune.config` must import without it
(`dist-prune keys`, `--help`, the driver's parse).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from dist_prune.config._inputs import calibration_split, input_paths
from dist_prune.config._schema import JobConfig, scope_of
from dist_prune.errors import UserError

# Allowed values of enumerated keys. What a method allows comes from its `Method` object
# (dist_prune/methods/), imported in `validate` so this module stays importable without torch.
DTYPES = ("auto", "float32", "bfloat16", "float16")
NORMS = ("l1", "l2")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"config: {message}")


INT64 = (-(2**63), 2**63 - 1)  # what torch, numpy and the MLflow store hold


def _range_problem(value: int | float, valid: str | None) -> str | None:
    """What is wrong with number `value` for the interval `valid` ("[0, 1)", "(0, inf)") of the
    schema, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number" + (f" in {valid}" if valid else "")
    if valid is not None:
        m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", valid)
        low, high = float(m.group(2)), float(m.group(3))
        above = low < value or (m.group(1) == "[" and value == low)
        below = value < high or (m.group(4) == "]" and value == high)
        if not (above and below):
            return f"{'>=' if m.group(1) == '[' else '>'} {m.group(2)}" if math.isinf(high) else f"in {valid}"
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        return f"a 64-bit integer, in [{INT64[0]}, {INT64[1]}]"
    return None


def check_ranges(section, prefix: str = "") -> None:
    """Every number of the config against its schema interval (`doc(valid=...)`): floats finite,
    ints within 64 bits. One walk over the schema, so a key added later is checked too."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        for i, number in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            problem = _range_problem(number, f.metadata.get("valid"))
            where = key if not isinstance(value, list) else f"{key}[{i}]"
            _require(problem is None, f"{where} must be {problem}, got {number}")


def validate(cfg: JobConfig, *, check_paths: bool = True) -> None:
    """Range and choice checks that types alone do not express."""
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)

    check_ranges(cfg)
    cal = cfg.data.calibration
    _require(not cal.generated or cal.path is None or cal.generated_share < 1,
             f"data.calibration.generated=true calibrates on text sampled from the dense model instead of "
             f"data.calibration.path={cal.path}: set one of them, or data.calibration.generated_share below 1 "
             f"to mix the two")
    _require(cal.generated or cal.generated_share == 1,
             f"data.calibration.generated_share={cal.generated_share} mixes windows sampled from the dense model "
             f"into the calibration set: set data.calibration.generated=true")
    _require(cal.generated_share == 1 or 0 not in calibration_split(cfg),
             f"data.calibration.generated_share={cal.generated_share} of data.calibration.num_samples="
             f"{cal.num_samples} leaves no window to one of the two sources: raise num_samples or move the share "
             f"towards 0.5")
    p = cfg.prune
    _require(p.method in METHODS, f"prune.method '{p.method}' is unknown (allowed: {', '.join(METHODS)})")
    method = METHODS[p.method]
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
    _require(method.calibration != "gradients" or cal.batch_size % cfg.cluster.num_workers == 0,
             f"data.calibration.batch_size={cal.batch_size} must be a multiple of "
             f"cluster.num_workers={cfg.cluster.num_workers} for prune.method {p.method}")
    stems = [Path(path).stem for path in cfg.eval.extra_paths]
    _require(len(set(stems)) == len(stems), f"eval.extra_paths names two files with the same stem "
             f"({', '.join(stems)}): their metrics would collide")
    _require(all(re.fullmatch(r"[A-Za-z0-9_\-]+", stem) for stem in stems),
             f"eval.extra_paths: a file stem names its metrics, so it may hold only letters, digits, "
             f"_ and - (got {', '.join(stems)})")
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
        for item in input_paths(cfg):
            if item.directory_ok:
                _require(Path(item.path).exists(), f"{item.key} {item.path} does not exist")
            else:
                _require(Path(item.path).is_file(), f"{item.key} {item.path} is not a file")
    _validate_registry_names(cfg)
    _validate_block_tuning(cfg, method, structure)
    validate_layer_choices(cfg)
    validate_finetune(cfg)


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


def _validate_block_tuning(cfg: JobConfig, method, structure) -> None:
    """Block tuning runs inside sequential layer-by-layer pruning, on a mask chosen once."""
    p = cfg.prune
    if p.block_tuning.epochs == 0:
        return
    from dist_prune.methods import METHODS  # lazy: imports torch (module docstring)

    layered = [name for name, m in METHODS.items() if m.calibration == "layerwise"]
    _require(method.calibration == "layerwise", f"prune.block_tuning tunes each layer as it is pruned, layer by "
             f"layer: use prune.method {', '.join(layered)}, not {p.method}")
    _require(method.always_sequential or (cfg.data.calibration.sequential and scope_of(p) != "global"),
             "prune.block_tuning needs sequential pruning: data.calibration.sequential true and "
             "prune.scope layer or row")
    _require(p.schedule == "oneshot", "prune.block_tuning needs prune.schedule oneshot (the mask is chosen once)")
    _require(not structure.removes_parameters, f"prune.block_tuning keeps masks inside tensors; prune.structure "
             f"{p.structure} removes whole parameters")
    _require(cfg.data.calibration.batch_size % cfg.cluster.num_workers == 0,
             f"data.calibration.batch_size={cfg.data.calibration.batch_size} (windows per block tuning step) "
             f"must be a multiple of cluster.num_workers={cfg.cluster.num_workers}")


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
    _require(0 <= p.owl_lambda <= min(p.sparsity, 1 - p.sparsity),
             f"prune.owl_lambda must be in [0, {min(p.sparsity, 1 - p.sparsity):g}] (= min(sparsity, "
             f"1 - sparsity), so every layer's sparsity stays in [0, 1]), got {p.owl_lambda}")


SCHEDULES = ("oneshot", "cubic")
LR_SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = ("auto", "0", "2", "3")
DISTILLED_WINDOWS = ("all", "sampled")


def validate_finetune(cfg: JobConfig) -> None:
    """The fine-tuning section and the gradual-pruning keys of the prune section."""
    ft, p = cfg.finetune, cfg.prune
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
    _require(len(ft.betas) == 2, f"finetune.betas must be two numbers in [0, 1), got {ft.betas}")
    _require(ft.max_failures == 0 or ft.checkpoint_interval > 0,
             "finetune.max_failures > 0 restarts from checkpoints: set finetune.checkpoint_interval > 0")
    _require(ft.data.generated_windows == 0 or ft.data.path is None or ft.data.generated_share < 1,
             f"finetune.data.generated_windows={ft.data.generated_windows} tunes on text sampled from the dense "
             f"model instead of finetune.data.path={ft.data.path}: set one of them, or "
             f"finetune.data.generated_share below 1 to mix the two")
    _require(ft.data.generated_share == 1 or ft.data.generated_windows > 0,
             f"finetune.data.generated_share={ft.data.generated_share} mixes windows sampled from the dense "
             f"model into each step: set finetune.data.generated_windows > 0")
    _require(ft.distill.windows in DISTILLED_WINDOWS, f"finetune.distill.windows '{ft.distill.windows}' is "
             f"unknown (allowed: {', '.join(DISTILLED_WINDOWS)})")
    _require(ft.distill.windows == "all" or (ft.distill.teaches and ft.data.generated_windows > 0),
             "finetune.distill.windows=sampled distils on windows sampled from the dense model: set "
             f"finetune.distill.beta > 0 (got {ft.distill.beta}) or finetune.distill.hidden > 0 (got "
             f"{ft.distill.hidden}), and finetune.data.generated_windows > 0 (got {ft.data.generated_windows})")
