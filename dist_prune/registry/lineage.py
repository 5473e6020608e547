"""What a registered model records about itself: the job's config as params, its metrics, and its
lineage (the source model and the sha256 of its shards, the config hash, the dist-prune commit)
as tags, in the shapes and sizes MLflow accepts, with secrets left out."""

from __future__ import annotations

import json
import re
import time
from typing import Iterator

from dist_prune import __version__
from dist_prune.redact import env_secrets, scrub
from dist_prune.registry.client import entity_key

MAX_PARAM_VALUE = 6000      # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 5000        # model-registry tag value limit (run tags allow more)
# A param/tag key is dropped when its last dotted part names a credential (hf_token, db.password,
# api_key; not max_tokens or pad_token); env vars whose names say so have their values masked.
_SECRET_KEY = re.compile(r"(?:.*[_\-])?(?:password|passwd|secret|secret_key|api_?key|access_?key|credentials?"
                         r"|private_?key|(?<!bos_)(?<!eos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)token)", re.I)
LINEAGE_KEYS = ("source_model", "source_sha256", "config_sha256", "dist_prune_commit")


def _is_secret(key: str) -> bool:
    return _SECRET_KEY.fullmatch(key.rsplit(".", 1)[-1]) is not None


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, name + ".")
        else:
            yield name, v


def flatten_params(params: dict) -> dict[str, str]:
    """Nested dicts become a.b.c keys; lists are JSON; values are cut to MLflow's 6000 chars;
    keys that look like secrets are dropped and secret env values are masked."""
    secrets = env_secrets()
    out: dict[str, str] = {}
    for name, v in _flatten(params):
        if _is_secret(name):
            continue
        if isinstance(v, (list, tuple)):
            text = json.dumps(v, default=str)
        else:
            text = "None" if v is None else str(v)
        text = scrub(text, secrets)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[entity_key(name)] = text
    return out


def lineage(meta: dict) -> dict[str, str]:
    """Where a model came from, from its sparsity.json: the source model and the sha256 of its
    shards, the config hash, the dist-prune commit (the parent run, for sweeps, is MLflow's own
    mlflow.parentRunId tag). The full record is the export's sparsity.json."""
    return {f"lineage.{k}": json.dumps(meta[k], sort_keys=True) if isinstance(meta[k], dict) else str(meta[k])
            for k in LINEAGE_KEYS if meta.get(k) is not None}


def version_tags(meta: dict, extra: dict | None = None) -> dict[str, str]:
    """The tags of the run, the logged model and the model version: what the export is (method,
    structure, sparsity), its lineage, and the caller's `extra`; no secrets, cut to size."""
    tags = {"dist_prune.version": __version__, "dist_prune.producer": str(meta.get("producer")),
            "dist_prune.overall_sparsity": f"{meta.get('overall_sparsity', 0.0):.6f}",
            **{k: meta[k] for k in ("method", "structure", "scope") if k in meta and not isinstance(meta[k], dict)},
            **lineage(meta), **(extra or {})}
    secrets = env_secrets()
    return {entity_key(k): scrub(str(v), secrets)[:MAX_TAG_VALUE] for k, v in tags.items() if not _is_secret(k)}


def metric_rows(metrics: dict, meta: dict, *, run_id: str, model_id: str | None) -> list:
    """mlflow Metric rows of the job's scalar metrics (step 0), its list-valued ones (one step per
    element) and the export's overall sparsity, each attached to the logged model `model_id` too."""
    from mlflow.entities import Metric  # lazy: mlflow takes about 2 s to import

    now = int(time.time() * 1000)
    points = [(k, v, 0) for k, v in _flatten(metrics) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    points += [(k, x, step) for k, v in _flatten(metrics) if isinstance(v, (list, tuple))
               for step, x in enumerate(v) if isinstance(x, (int, float)) and not isinstance(x, bool)]
    points.append(("overall_sparsity", meta.get("overall_sparsity", 0.0), 0))
    return [Metric(entity_key(k), float(v), now, step, run_id=run_id, model_id=model_id) for k, v, step in points]
