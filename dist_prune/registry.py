"""Register a verified export in the MLflow model registry, and pull a registered version back.

Everything goes through an explicit `MlflowClient(tracking_uri, registry_uri)`; the global MLflow
state (tracking URI, active run) is never touched. In MLflow 3, `register_model("runs:/..")` on
plain artifacts fails, so the export directory is logged as run artifacts under "model/" and
registered with `MlflowClient.create_model_version(name, source=<artifact URI of model/>)`.

mlflow (and requests) are imported inside the functions that talk to a server: importing mlflow
takes about 2 s, and the driver imports this module for every job, with or without a registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

from dist_prune import __version__
from dist_prune.errors import UserError
from dist_prune.io.decompress import decompress_export
from dist_prune.io.destination import check_new_directory
from dist_prune.io.formats import format_of
from dist_prune.io.verify import verify_export
from dist_prune.redact import env_secrets as _env_secrets, redact_uri as _redact_uri, scrub as _scrub

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000      # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250               # MAX_ENTITY_KEY_LENGTH
MAX_TAG_VALUE = 5000        # model-registry tag value limit (run tags allow more)
BATCH = 100                 # MAX_PARAMS_TAGS_PER_BATCH
READY_TIMEOUT_S = 300
RETRY_PAUSES_S = tuple(float(x) for x in os.environ.get("DIST_PRUNE_MLFLOW_RETRY_PAUSES", "1,2,4").split(",") if x)
# A param/tag key is dropped when its last dotted part names a credential (hf_token, db.password,
# api_key; not max_tokens or pad_token); env vars whose names say so have their values masked
# (dist_prune/redact.py).
_SECRET_KEY = re.compile(r"(?:.*[_\-])?(?:password|passwd|secret|secret_key|api_?key|access_?key|credentials?"
                         r"|private_?key|(?<!bos_)(?<!eos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)token)", re.I)
_MODEL_URI = (re.compile(r"models:/([^/@]+)@([\w\-]+)"), re.compile(r"models:/([^/@]+)/(\d+)"))


@dataclass(frozen=True)
class RegisteredModel:
    run_id: str
    version: int
    uri: str        # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@ALIAS


# -- helpers -------------------------------------------------------------------------------------

def _is_secret(key: str) -> bool:
    return _SECRET_KEY.fullmatch(key.rsplit(".", 1)[-1]) is not None


def _key(key: str) -> str:
    key = re.sub(r"[^\w.\- /:]", "_", key).strip("/ ")
    key = re.sub(r"/+", "/", key).replace("..", "._")
    return key[:MAX_KEY] or "_"


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
    secrets = _env_secrets()
    out: dict[str, str] = {}
    for name, v in _flatten(params):
        if _is_secret(name):
            continue
        if isinstance(v, (list, tuple)):
            text = json.dumps(v, default=str)
        else:
            text = "None" if v is None else str(v)
        text = _scrub(text, secrets)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[_key(name)] = text
    return out


@contextlib.contextmanager
def _mlflow_errors(uri: str, action: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException  # lazy: module docstring
    from requests.exceptions import RequestException

    try:
        yield
    except UserError:
        raise
    except (MlflowException, RequestException, OSError) as e:
        denied = _auth_failure(e, action)
        if denied:
            raise UserError(f"MLflow at {_redact_uri(uri)} {denied}") from None
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"MLflow at {_redact_uri(uri)}: {action} failed: {_scrub(msg, _env_secrets())}") from e


def _auth_failure(e: Exception, action: str) -> str | None:
    """What a 401/403 from the server (REST call or artifact upload) means for the user, naming
    the credential variables but never their values; None for any other error."""
    status = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(getattr(e, "error_code", None))
    status = status or getattr(getattr(e, "response", None), "status_code", None)  # requests.HTTPError
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and user:
        return (f"rejected the credentials of MLFLOW_TRACKING_USERNAME={user} (HTTP 401): "
                f"check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if status == 401:
        what = "MLFLOW_TRACKING_TOKEN" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "no credentials"
        return (f"rejected the request (HTTP 401, {what} given): set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD")
    if status == 403:
        return (f"denied MLFLOW_TRACKING_USERNAME={user} permission for {action} (HTTP 403): ask the "
                f"server's admin for EDIT on the experiment and the registered model")
    return None


def _client(tracking_uri: str | None):  # mlflow imported lazily: module docstring
    import mlflow  # lazy: module docstring
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial database tables..."

    if tracking_uri is None:
        tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    else:
        registry_uri = tracking_uri
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        import requests

        # a server restarting or a blip in the network: retry with back-off before giving up
        for attempt, pause in enumerate((*RETRY_PAUSES_S, None)):
            try:
                requests.get(tracking_uri.rstrip("/") + "/health", timeout=10)
                break
            except requests.RequestException as e:
                if pause is None:
                    raise UserError(f"cannot reach MLflow tracking server at {_redact_uri(tracking_uri)} "
                                    f"({attempt + 1} attempts): {type(e).__name__}") from e
                time.sleep(pause)
    with _mlflow_errors(tracking_uri, "connecting"):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri), tracking_uri, registry_uri


def check_registry(tracking_uri: str | None) -> None:
    """Fail fast, before a job starts: the tracking server answers and accepts our credentials."""
    client, uri, _ = _client(tracking_uri)
    with _mlflow_errors(uri, "listing experiments"):
        client.search_experiments(max_results=1)


def _lineage(meta: dict) -> dict[str, str]:
    """Where a model version came from, as tags: the source model and the sha256 of its shards,
    the config hash, the dist-prune commit (the parent run, for sweeps, is MLflow's own
    mlflow.parentRunId tag). The full record is the version's sparsity.json."""
    keys = ("source_model", "source_sha256", "config_sha256", "dist_prune_commit")
    return {f"lineage.{k}": json.dumps(meta[k], sort_keys=True) if isinstance(meta[k], dict) else str(meta[k])
            for k in keys if meta.get(k) is not None}


def register_directory(export_dir: Path, *, tracking_uri: str | None, experiment: str, model_name: str,
                       alias: str) -> RegisteredModel:
    """`dist-prune register DIR`: register an export made earlier (e.g. by a job whose MLflow
    server was unreachable at the end). Its manifest is verified first; its scalar fields
    become the run's params."""
    meta = verify_export(Path(export_dir))
    params = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k != "producer"}
    return register_export(Path(export_dir), tracking_uri=tracking_uri, experiment=experiment,
                           model_name=model_name, alias=alias, params={"export": params}, metrics={},
                           artifacts=[Path(export_dir) / "sparsity.json"])


def start_run(tracking_uri: str | None, experiment: str, *, artifact_location: str | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> str:
    """Open a run in `experiment` (created if missing) and return its id; the job's workers log
    step metrics into it while they train, and `register_export` finishes it."""
    client, uri, _ = _client(tracking_uri)
    artifact_location = artifact_location or artifacts_next_to(uri)
    with _mlflow_errors(uri, f"experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp = client.get_experiment(client.create_experiment(experiment, artifact_location=artifact_location))
            except Exception as e:  # MlflowException; two jobs starting at once both found none
                if not _is_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
                exp = client.get_experiment_by_name(experiment)
        if exp.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {experiment!r} at {_redact_uri(uri)} is deleted; restore it or pick another name")
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        return client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id


def artifacts_next_to(tracking_uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: `mlruns/` beside the
    database file. MLflow's own default is `./mlruns` of the working directory at the time,
    wherever the database is: a job run from a repository left its artifacts there. A file
    store keeps artifacts inside itself and a server decides for itself: None."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    if str(database) in ("", ":memory:"):
        return None
    return (database.resolve().parent / "mlruns").as_uri()


def end_run(tracking_uri: str | None, run_id: str, status: str = "FAILED") -> None:
    """Mark a run opened by `start_run` as ended (a job that failed before registering)."""
    with contextlib.suppress(Exception):
        _client(tracking_uri)[0].set_terminated(run_id, status)


class StepLogger:
    """Step metrics from a worker into the job's run (loss, lr, sparsity, alpha, perplexity),
    so the MLflow UI shows training live. Logging never stops training: a failure is
    reported once and logging goes on at the next step."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient  # lazy: module docstring

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.client, self.run_id, self.warned = MlflowClient(tracking_uri, tracking_uri), run_id, False

    def __call__(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric  # lazy: module docstring

        now = int(time.time() * 1000)
        rows = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            self.client.log_batch(self.run_id, metrics=rows)
        except Exception as e:  # noqa: BLE001 - the server may be briefly unreachable
            if not self.warned:
                print(f"warning: MLflow step metrics not logged ({type(e).__name__}: "
                      f"{_scrub(str(e), _env_secrets())[:200]})", flush=True)
                self.warned = True


def resolved_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI the driver uses, with a relative sqlite path made absolute, so
    workers started in another directory write to the same database."""
    import mlflow  # lazy: module docstring

    uri = tracking_uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _is_code(e: Exception, *codes: str) -> bool:
    return getattr(e, "error_code", None) in codes


# -- register ------------------------------------------------------------------------------------

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

def register_export(export_dir: Path, *, tracking_uri: str | None, experiment: str, model_name: str,
                    alias: str, params: dict, metrics: dict, artifacts: Sequence[Path] = (),
                    tags: dict | None = None, artifact_location: str | None = None,
                    run_id: str | None = None) -> RegisteredModel:
    """Log one MLflow run (params, metrics, artifacts, the export under "model/"), create model
    version N of `model_name` from it, wait for READY and point `alias` at it.

    `run_id`: a run opened by `start_run` before the job (the workers logged step metrics
    into it); otherwise a new run. `artifact_location` is used only when the experiment
    does not exist yet."""
    from mlflow.entities import Metric, Param, RunTag  # lazy: module docstring

    export_dir = Path(export_dir)
    meta = verify_export(export_dir)  # nothing unverified is registered
    for a in artifacts:
        if not Path(a).exists():
            raise UserError(f"artifact {a} does not exist")
    client, uri, _ = _client(tracking_uri)
    secrets = _env_secrets()
    all_tags = {"dist_prune.version": __version__, "dist_prune.producer": str(meta.get("producer")),
                "dist_prune.overall_sparsity": f"{meta.get('overall_sparsity', 0.0):.6f}",
                **{k: meta[k] for k in ("method", "structure", "scope") if k in meta and not isinstance(meta[k], dict)},
                **_lineage(meta), **(tags or {})}
    all_tags = {_key(k): _scrub(str(v), secrets)[:MAX_TAG_VALUE] for k, v in all_tags.items()
                if not _is_secret(k)}
    flat_params = flatten_params(params)
    now = int(time.time() * 1000)
    metric_list = [Metric(_key(k), float(v), now, 0) for k, v in _flatten(metrics)
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
    metric_list += [Metric(_key(k), float(x), now, step) for k, v in _flatten(metrics)
                    if isinstance(v, (list, tuple)) for step, x in enumerate(v) if isinstance(x, (int, float))]
    metric_list.append(Metric("overall_sparsity", float(meta.get("overall_sparsity", 0.0)), now, 0))

    if run_id is None:
        run_id = start_run(tracking_uri, experiment, artifact_location=artifact_location)
    with _mlflow_errors(uri, f"run {run_id}"):
        run = client.get_run(run_id)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
    status = "FAILED"
    try:
        with _mlflow_errors(uri, f"logging run {run_id}"):
            plist = [Param(k, v) for k, v in flat_params.items()]
            for i in range(0, max(len(plist), len(metric_list)), BATCH):
                client.log_batch(run_id, metrics=metric_list[i:i + BATCH], params=plist[i:i + BATCH])
            for a in map(Path, artifacts):
                if a.is_dir():
                    client.log_artifacts(run_id, str(a), a.name)
                else:
                    client.log_artifact(run_id, str(a))
            client.log_artifacts(run_id, str(export_dir), "model")
        source = run.info.artifact_uri.rstrip("/") + "/model"
        with _mlflow_errors(uri, f"registering model {model_name!r}"):
            try:
                client.create_registered_model(model_name)
            except Exception as e:  # MlflowException; an existing model is fine
                if not _is_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
            mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=all_tags)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
                time.sleep(1)
                mv = client.get_model_version(model_name, mv.version)
            if mv.status != "READY":
                raise UserError(f"MLflow at {_redact_uri(uri)}: model {model_name!r} version {mv.version} "
                                f"is {mv.status}: {mv.status_message or 'no message'}")
            set_alias(client, model_name, alias, str(mv.version))
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)
    version = int(mv.version)
    return RegisteredModel(run_id=run_id, version=version, uri=f"models:/{model_name}/{version}",
                           alias_uri=f"models:/{model_name}@{alias}")


# -- pull ------------------------------------------------------------------------------------------

def parse_model_uri(model_uri: str) -> tuple[str, str | None, int | None]:
    """models:/NAME@ALIAS -> (NAME, ALIAS, None); models:/NAME/VERSION -> (NAME, None, VERSION)."""
    for i, pattern in enumerate(_MODEL_URI):
        m = pattern.fullmatch(model_uri.strip())
        if m:
            return (m.group(1), m.group(2), None) if i == 0 else (m.group(1), None, int(m.group(2)))
    raise UserError(f"invalid model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")


def pull(model_uri: str, dst: Path, *, tracking_uri: str | None = None, keep_compressed: bool = False) -> Path:
    """Download a registered dist-prune export into `dst` (must not exist or be empty), verified.
    An export in a format no loader reads (export.format sparse-*) is decompressed into the dense
    HF layout, unless `keep_compressed`."""
    import mlflow.artifacts  # lazy: module docstring

    name, alias, version = parse_model_uri(model_uri)
    dst = check_new_directory(dst, empty_dir_ok=True)
    client, uri, registry_uri = _client(tracking_uri)
    where = _redact_uri(uri)
    with _mlflow_errors(uri, f"resolving {model_uri}"):
        try:
            client.get_registered_model(name)
        except Exception as e:
            if _is_code(e, "RESOURCE_DOES_NOT_EXIST"):
                raise UserError(f"no registered model named {name!r} at {where}") from None
            raise
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias is not None
                  else client.get_model_version(name, str(version)))
        except Exception as e:
            if _is_code(e, "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                what = f"alias {alias!r}" if alias is not None else f"version {version}"
                raise UserError(f"registered model {name!r} at {where} has no {what}") from None
            raise
        if mv.status != "READY":
            raise UserError(f"{model_uri} (version {mv.version}) is {mv.status}, not READY")
        source = client.get_model_version_download_uri(name, str(mv.version))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.pull-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        with _mlflow_errors(uri, f"downloading {model_uri} from {_redact_uri(source)}"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                             tracking_uri=uri, registry_uri=registry_uri))
        if not local.is_dir():
            raise UserError(f"{model_uri} does not point at a directory of artifacts")
        try:
            meta = verify_export(local)
        except UserError as e:
            raise UserError(f"{model_uri} failed verification after download: {e}") from None
        if not (keep_compressed or format_of(meta).loadable):
            local = decompress_export(local, tmp / "dense", meta)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.rename(local, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
