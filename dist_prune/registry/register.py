"""Register a verified export in the MLflow model registry, as an MLflow model.

The rule, for the job's own registration and `dist-prune register` alike: nothing is created in
the registry until everything that can be checked has been checked. The name and the alias are
MLflow's to judge (names.py), the export's every claim is recounted on its tensors (recount.py),
the artifacts exist; only then is a run opened or used. What is created then is undone if a later
step fails: no model version without its alias, no logged model of a failed registration.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dist_prune.errors import UserError
from dist_prune.registry.client import connect, is_code, mlflow_errors, set_terminated, start_run
from dist_prune.registry.lineage import flatten_params, metric_rows, version_tags
from dist_prune.registry.names import check_alias, check_model_name
from dist_prune.registry.pyfunc import log_pyfunc
from dist_prune.registry.recount import verify_claims

log = logging.getLogger(__name__)

BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
READY_TIMEOUT_S = 300  # MLflow's own wait for a version's READY (create_model_version's default)


@dataclass(frozen=True)
class RegisteredModel:
    run_id: str
    version: int
    uri: str        # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@ALIAS
    model_id: str   # the LoggedModel: models:/MODEL_ID


# What a SQL store says when two inserts of the same key race (sqlite, PostgreSQL, MySQL)
_UNIQUE_RACE = re.compile(r"IntegrityError|UniqueViolation|UNIQUE constraint|Duplicate entry", re.I)


def set_alias(client, model_name: str, alias: str, version: str, attempts: int = 3) -> None:
    """Point `alias` at `version`. MLflow's SQL store sets an alias by a select-then-insert merge, so
    two jobs that set a new alias at the same moment both insert it and the later one fails with a
    unique-key error; trying again updates the row the other inserted (the last job to set it wins)."""
    for attempt in range(attempts):
        try:
            return client.set_registered_model_alias(model_name, alias, version)
        except Exception as e:  # MlflowException(BAD_REQUEST) wrapping the store's IntegrityError
            if attempt + 1 == attempts or not _UNIQUE_RACE.search(str(e)):
                raise
            log.info("alias %s of %s was created concurrently; setting it again", alias, model_name)


def register_directory(export_dir: Path, *, tracking_uri: str | None, experiment: str, model_name: str,
                       alias: str) -> RegisteredModel:
    """`dist-prune register DIR`: register an export made earlier (e.g. by a job whose MLflow
    server was unreachable at the end). Its scalar manifest fields become the run's params."""
    check_model_name(model_name, "--model-name")
    check_alias(alias, "--alias")
    meta = verify_claims(Path(export_dir))
    params = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k != "producer"}
    return register_export(Path(export_dir), tracking_uri=tracking_uri, experiment=experiment,
                           model_name=model_name, alias=alias, params={"export": params}, metrics={},
                           artifacts=[Path(export_dir) / "sparsity.json"], meta=meta)


def register_export(export_dir: Path, *, tracking_uri: str | None, experiment: str, model_name: str,
                    alias: str, params: dict, metrics: dict, artifacts: Sequence[Path] = (),
                    tags: dict | None = None, artifact_location: str | None = None,
                    run_id: str | None = None, meta: dict | None = None) -> RegisteredModel:
    """Log one MLflow run (params, metrics, artifacts) whose LoggedModel is the export as a pyfunc
    model, create model version N of `model_name` from it and point `alias` at it.

    `run_id`: a run opened by `start_run` before the job (the workers logged step metrics into
    it), FAILED if registration fails; otherwise a new run, FAILED and deleted then.
    `artifact_location` is used only when the experiment does not exist yet. `meta`:
    `verify_claims(export_dir)`, if the caller has it."""
    from mlflow.entities import Param, RunTag  # lazy: mlflow takes about 2 s to import

    check_model_name(model_name)
    check_alias(alias)
    export_dir = Path(export_dir)
    meta = verify_claims(export_dir) if meta is None else meta
    for a in artifacts:
        if not Path(a).exists():
            raise UserError(f"artifact {a} does not exist")
    client, uri, _ = connect(tracking_uri)
    all_tags = version_tags(meta, tags)
    flat_params = flatten_params(params)

    own_run = run_id is None
    if own_run:
        run_id = start_run(uri, experiment, artifact_location=artifact_location)
    status, model_id = "FAILED", None
    try:
        with mlflow_errors(uri, f"logging run {run_id}"):
            run = client.get_run(run_id)
            plist = [Param(k, v) for k, v in flat_params.items()]
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
            for i in range(0, len(plist), BATCH):
                client.log_batch(run_id, params=plist[i:i + BATCH])
            for a in map(Path, artifacts):
                if a.is_dir():
                    client.log_artifacts(run_id, str(a), a.name)
                else:
                    client.log_artifact(run_id, str(a))
        with mlflow_errors(uri, f"logging the model of run {run_id}"):
            logged = log_pyfunc(client, run, export_dir, params=flat_params, tags=all_tags)
            model_id = logged.model_id
            rows = metric_rows(metrics, meta, run_id=run_id, model_id=model_id)
            for i in range(0, len(rows), BATCH):
                client.log_batch(run_id, metrics=rows[i:i + BATCH])
        with mlflow_errors(uri, f"registering model {model_name!r}"):
            try:
                client.create_registered_model(model_name)
            except Exception as e:  # MlflowException; an existing model is fine
                if not is_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
            # source: the logged model's artifacts, not MLflow's models:/MODEL_ID, which a SQL
            # registry resolves through the global tracking URI (sqlalchemy_store.py's TODO)
            version = client.create_model_version(model_name, source=logged.artifact_location, run_id=run_id,
                                                  tags=all_tags, model_id=model_id,
                                                  await_creation_for=READY_TIMEOUT_S).version
            set_alias(client, model_name, alias, str(version))
        status = "FINISHED"
    except BaseException:
        _undo(client, model_name, run_id, model_id)
        raise
    finally:
        with contextlib.suppress(Exception):
            set_terminated(client, uri, run_id, status)
            if status == "FAILED" and own_run:  # a run of this registration alone: nothing to keep
                client.delete_run(run_id)
    return RegisteredModel(run_id=run_id, version=int(version), uri=f"models:/{model_name}/{version}",
                           alias_uri=f"models:/{model_name}@{alias}", model_id=model_id)


def _undo(client, model_name: str, run_id: str, model_id: str | None) -> None:
    """Remove what a failed registration made: the versions of `model_name` from this run (with
    or without their alias) and its logged model. Best effort: the error that got here is the
    one to report."""
    with contextlib.suppress(Exception):
        for mv in client.search_model_versions(f"run_id = '{run_id}'"):  # a hex id: no quoting
            if mv.name == model_name:
                client.delete_model_version(model_name, mv.version)
    if model_id is not None:
        with contextlib.suppress(Exception):
            client.delete_logged_model(model_id)
