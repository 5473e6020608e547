"""The files and directories a job reads, by config key: one list for the checks of
`validate`, for the driver (which reads only what the job uses) and for `dist-prune submit`
(which ships the local ones with the job). A path the job will not read is not listed, so a
method that needs no calibration (magnitude) never requires `data.calibration.path` to exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dist_prune.config._schema import JobConfig


@dataclass(frozen=True)
class InputPath:
    key: str              # config key, e.g. data.calibration.path or eval.extra_paths[1]
    path: str
    directory_ok: bool    # a directory is valid here (a model, a `datasets` directory)


def reads_calibration_data(cfg: JobConfig) -> bool:
    """The job tokenizes calibration text: a method that calibrates, pruning once up front."""
    from dist_prune.methods import METHODS  # lazy: imports torch (config/_validate.py's docstring)

    return METHODS[cfg.prune.method].needs_calibration_data and cfg.prune.schedule == "oneshot"


def calibration_split(cfg: JobConfig) -> tuple[int, int]:
    """(windows read from the calibration text, windows sampled from the dense model) of the
    job's data.calibration.num_samples: the text's come first."""
    cal = cfg.data.calibration
    sampled = round(cal.num_samples * cal.generated_share) if cal.generated else 0
    return cal.num_samples - sampled, sampled


def sampled_windows_of(cfg: JobConfig) -> dict[str, tuple[int, int, int]]:
    """What the job samples from the dense model instead of reading a text, by role:
    {"calibration" | "training": (windows, tokens each, seed)}."""
    cal, data = cfg.data.calibration, cfg.finetune.data
    wanted = {}
    if cal.generated and reads_calibration_data(cfg):
        wanted["calibration"] = (calibration_split(cfg)[1], cal.seq_len, cal.seed)
    if data.generated_windows > 0 and cfg.finetune.steps > 0:
        wanted["training"] = (data.generated_windows, data.seq_len, cfg.seed)
    return wanted


def reads_training_text(cfg: JobConfig) -> bool:
    """The job tunes on finetune.data.path (or the built-in corpus): alone, or with windows
    sampled from the dense model mixed in (finetune.data.generated_share < 1)."""
    data = cfg.finetune.data
    return cfg.finetune.steps > 0 and (data.generated_windows == 0 or data.generated_share < 1)


def input_paths(cfg: JobConfig) -> list[InputPath]:
    """Every path this job reads; None (a built-in default) is not a path."""
    listed = [InputPath("model.path", cfg.model.path, True)]
    if reads_calibration_data(cfg):
        listed.append(InputPath("data.calibration.path", cfg.data.calibration.path, False))
    if cfg.eval.num_windows > 0:
        listed.append(InputPath("eval.path", cfg.eval.path, False))
        listed += [InputPath(f"eval.extra_paths[{i}]", path, False) for i, path in enumerate(cfg.eval.extra_paths)]
    if reads_training_text(cfg):
        listed.append(InputPath("finetune.data.path", cfg.finetune.data.path, True))
    return [item for item in listed if item.path is not None]


def set_input_path(cfg: JobConfig, key: str, path: str) -> None:
    """Point the config key an `InputPath` names at another path."""
    index = re.fullmatch(r"eval\.extra_paths\[(\d+)\]", key)
    if index:
        cfg.eval.extra_paths[int(index.group(1))] = path
        return
    *sections, leaf = key.split(".")
    holder = cfg
    for section in sections:
        holder = getattr(holder, section)
    setattr(holder, leaf, path)
