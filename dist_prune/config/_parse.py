"""Reading a job config: YAML (1.2-style numbers), `${VAR:-default}` expansion, `a.b=c` overrides,
the chosen method's own defaults, and typed construction of the schema's dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dist_prune.config._schema import JobConfig, PruneConfig
from dist_prune.config._yaml import parse as _yaml
from dist_prune.config._yaml import read_file
from dist_prune.errors import UserError

_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in strings, as in a shell."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is None:
                raise UserError(f"config: environment variable {m.group(1)} is not set (write "
                                f"${{{m.group(1)}:-default}} to give a default)")
            return m.group(2)
        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["prune.sparsity=0.6", "model.path=x"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r}: expected key.sub=value")
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return tree


def apply_overrides(raw: dict, items: list[str]) -> dict:
    """`raw` with the overrides applied in order, as Hydra / OmegaConf users type them:
    `a.b=v` sets a key (`a.b=null`: None), `~a.b` removes it so that it takes its default (the
    method's, else the schema's; `~a` resets a whole section), `++a.b=v` is `a.b=v`. `+a.b=v`
    is refused: the schema is closed, every key exists already."""
    for item in items:
        if item.startswith("~"):
            raw = _without(raw, item)
        elif item.startswith("+") and not item.startswith("++"):
            raise UserError(_plus_error(item))
        else:
            raw = _merge(raw, parse_overrides([item.removeprefix("++")]))
    return raw


def _without(raw: dict, item: str) -> dict:
    """`~a.b`: `raw` without a.b (nothing to do when it is not set)."""
    key = item[1:]
    if "=" in key:
        raise UserError(f"override {item!r}: write ~{key.partition('=')[0]} (it resets the key to its "
                        "default, whatever its value)")
    _schema_field(key, item)
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return out
    node.pop(leaf, None)
    return out


def _plus_error(item: str) -> str:
    key = item[1:].partition("=")[0]
    try:
        _schema_field(key, item)
    except UserError:
        return (f"override {item!r}: '{key}' is not a config key, and the schema is closed, so '+' "
                "cannot add it (dist-prune keys lists every key)")
    return (f"override {item!r}: '{key}' already exists (the schema is closed, '+' adds nothing): "
            f"write {item[1:]}")


def _schema_field(key: str, item: str) -> None:
    """Refuse a dotted key the schema does not have, naming it and what is allowed there."""
    cls: Any = JobConfig
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"override {item!r}: expected ~key.sub")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        if part not in names:
            where = ".".join(parts[:depth + 1])
            allowed = f" (allowed: {', '.join(names)})" if names else ""
            raise UserError(f"config: unknown key '{where}'{allowed}")
        cls = typing.get_type_hints(cls)[part]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's type annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _coerce(value, inner, key)
    if value is None and not dataclasses.is_dataclass(annotation):  # `a.b=null` on a key that needs a value
        raise UserError(f"config: {key} cannot be null (only keys whose default is empty can); "
                        f"~{key} resets it to its default")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. max_shard_size: 1000
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise UserError(f"config: {key} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config: {prefix or 'the file'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise UserError(f"config: unknown key '{where}' (allowed: {', '.join(names)})")
    values = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in raw}
    return cls(**values)


def read_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The YAML file (or nothing) merged with the overrides and the method's defaults."""
    raw: dict = {}
    if path is not None:
        raw = read_file(Path(path)) or {}
        if not isinstance(raw, dict):
            raise UserError(f"config file {path}: the top level must be a mapping of sections")
    return _expand_env(_with_method_defaults(apply_overrides(raw, overrides or [])))


def _with_method_defaults(raw: dict) -> dict:
    """`raw` with the chosen method's own defaults (`Method.defaults`) for the keys it leaves
    unset: `prune.method=movement` on any config means gradual pruning during fine-tuning."""
    from dist_prune.methods import METHODS  # torch: only once a config is read, not on import

    prune = raw.get("prune") if isinstance(raw.get("prune"), dict) else {}
    method = METHODS.get(prune.get("method", PruneConfig.method))
    if method is None:  # an unknown method: validation names the allowed ones
        return raw
    for dotted, value in method.defaults.items():
        *sections, leaf = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):  # a malformed section: _build reports it
                break
        else:
            node.setdefault(leaf, value)
    return raw


def config_from_dict(raw: dict) -> JobConfig:
    """Rebuild a JobConfig from `to_dict` output (workers receive configs this way)."""
    return _build(JobConfig, raw, "")
