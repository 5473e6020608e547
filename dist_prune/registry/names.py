"""Registered model names, aliases and model URIs, by MLflow's rules, checked before anything is
created: config validation checks `registry.model_name` and `registry.alias` before a worker
starts, and registration checks them again before it opens a run.

The rules are MLflow 3's (mlflow/utils/validation.py: _validate_model_name,
_validate_model_alias_name, _validate_model_alias_name_reserved), written here so that a config
check needs no mlflow import (about 2 s); tests/test_registry_trust.py runs MLflow's own validators on
the same names. One difference: MLflow matches an alias with `re.match("^[\\w\\-]*$")`, which lets
a trailing newline through; it is refused here.
"""

from __future__ import annotations

import posixpath
import re

from dist_prune.errors import UserError

_ALIAS = re.compile(r"[\w\-]+")
_VERSION_ALIAS = re.compile(r"[vV]\d+")  # what models:/NAME@v3 would mean: version 3
MAX_ALIAS = 255  # MAX_REGISTERED_MODEL_ALIAS_LENGTH
URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or models:/MODEL_ID"


def check_model_name(name: str, key: str = "registry.model_name") -> None:
    """UserError unless MLflow accepts `name` as a registered model name."""
    why = None
    if not isinstance(name, str) or not name.strip():
        why = "must not be empty"
    elif "/" in name or ":" in name:
        why = "must not contain '/' or ':'"
    else:
        norm = posixpath.normpath(name)
        if norm != name or norm == "." or norm.startswith(".."):
            why = "must not read as a relative path ('.', '..')"
    if why:
        raise UserError(f"{key} {name!r} {why} (MLflow's rule for registered model names)")


def check_alias(alias: str, key: str = "registry.alias") -> None:
    """UserError unless MLflow accepts `alias` as a model version alias."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        why = "may only hold letters, digits, '_' and '-', at least one"
    elif len(alias) > MAX_ALIAS:
        why = f"is {len(alias)} characters long, at most {MAX_ALIAS} are allowed"
    elif alias.lower() == "latest":
        why = "is reserved: models:/NAME/latest is the newest version"
    elif _VERSION_ALIAS.fullmatch(alias):
        why = f"is reserved: MLflow keeps v<N> for version N"
    else:
        return
    raise UserError(f"{key} {alias!r} {why} (MLflow's rule for aliases)")


def parse_model_uri(model_uri: str):
    """MLflow's own parse of a models:/ URI (mlflow.store.artifact.utils.models): a ParsedModelUri
    with model_id, or name and one of version, alias, stage, or neither (the latest version)."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes about 2 s to import
    from mlflow.store.artifact.utils.models import _parse_model_uri

    try:
        parsed = _parse_model_uri(str(model_uri).strip())
    except MlflowException:
        raise UserError(f"invalid model URI {model_uri!r}: use {URI_FORMS}") from None
    if parsed.name is not None:
        check_model_name(parsed.name, key=f"model URI {model_uri!r}: the name")
    return parsed
