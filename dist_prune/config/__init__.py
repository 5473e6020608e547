"""Typed job configuration: one YAML file plus `key.sub=value` overrides, as torchtune splits it:
the schema (_schema.py) <- reading and building (_parse.py), validation (_validate.py) <- this
module's `load_config`. Everything is validated on the driver, before a single worker starts: a
mistake costs the user one line (`config: ...`, naming the key and what is allowed) and exit 2.
"""

from __future__ import annotations

from pathlib import Path

from dist_prune.config._inputs import (InputPath, calibration_split, input_paths, reads_calibration_data,
                                      reads_training_text, sampled_windows_of, set_input_path)
from dist_prune.config._parse import apply_overrides, config_from_dict, parse_overrides, read_raw
from dist_prune.config._schema import (
    CalibrationConfig, ClusterConfig, DataConfig, DistillConfig, EvalConfig, ExportConfig, FinetuneConfig,
    FinetuneDataConfig, JobConfig, ModelConfig, NeftuneConfig, PruneConfig, RegistryConfig, config_sha256, config_yaml,
    describe_keys, doc, scope_of, to_dict,
)
from dist_prune.config._validate import validate
from dist_prune.config._yaml import read_file as read_yaml

__all__ = [
    "CalibrationConfig", "ClusterConfig", "DataConfig", "DistillConfig", "EvalConfig", "ExportConfig",
    "FinetuneConfig", "FinetuneDataConfig", "InputPath", "JobConfig", "ModelConfig", "NeftuneConfig", "PruneConfig",
    "RegistryConfig", "apply_overrides", "config_from_dict", "config_sha256", "config_yaml", "describe_keys", "doc",
    "calibration_split", "input_paths", "load_config", "parse_overrides", "read_yaml", "reads_calibration_data", "reads_training_text",
    "sampled_windows_of", "scope_of", "set_input_path", "to_dict", "validate",
]


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> JobConfig:
    """Read a YAML job file (or only defaults when `path` is None), apply overrides, validate.
    `check_paths=False` (for `dist-prune submit`): paths name files on the cluster."""
    cfg = config_from_dict(read_raw(path, overrides))
    validate(cfg, check_paths=check_paths)
    return cfg
