"""The connection to MLflow: one explicit `MlflowClient(tracking_uri, registry_uri)` per call (the
global MLflow state, tracking URI and active run, is never touched), MLflow's errors as one line
without credentials, and the job's run from its start to its end.

Retries are MLflow's own: every REST call and artifact transfer goes through its HTTP session,
which retries refused connections, timeouts and 429/5xx answers MLFLOW_HTTP_REQUEST_MAX_RETRIES
times (default 7) with a back-off of MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (default 2) x 2^n seconds,
about 4 minutes in all; MLFLOW_HTTP_REQUEST_TIMEOUT (default 120 s) bounds each request.

mlflow (and requests) are imported inside the functions that talk to a server: importing mlflow
takes about 2 s, and the driver imports this module for every job, with or without a registry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from dist_prune.errors import UserError
from dist_prune.redact import env_secrets, redact_uri, scrub

MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH


def entity_key(key: str) -> str:
    """A param, tag or metric key MLflow accepts."""
    key = re.sub(r"[^\w.\- /:]", "_", key).strip("/ ")
    key = re.sub(r"/+", "/", key).replace("..", "._")
    return key[:MAX_KEY] or "_"


def _retry_settings() -> str:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    return (f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()}, "
            f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()}")


def _unreachable(e: BaseException) -> str | None:
    """The name of the connection failure behind an MLflow error, or None for any other error."""
    from requests.exceptions import ConnectionError, Timeout  # lazy: module docstring

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, Timeout)):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def mlflow_errors(uri: str, action: str) -> Iterator[None]:
    """MLflow's and requests' exceptions as one-line UserErrors naming the server (without
    credentials) and what was being done."""
    from mlflow.exceptions import MlflowException  # lazy: module docstring
    from requests.exceptions import RequestException

    try:
        yield
    except UserError:
        raise
    except (MlflowException, RequestException, OSError) as e:
        denied = _auth_failure(e, action)
        if denied:
            raise UserError(f"MLflow at {redact_uri(uri)} {denied}") from None
        failure = _unreachable(e)
        if failure:
            raise UserError(f"cannot reach MLflow tracking server at {redact_uri(uri)} ({failure} after MLflow's "
                            f"retries: {_retry_settings()})") from None
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"MLflow at {redact_uri(uri)}: {action} failed: {scrub(msg, env_secrets())}") from e


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


def is_code(e: Exception, *codes: str) -> bool:
    return getattr(e, "error_code", None) in codes


def connect(tracking_uri: str | None):
    """(client, tracking URI, registry URI); None: MLflow's default (MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db), with a relative sqlite path made absolute."""
    from mlflow import MlflowClient  # lazy: module docstring

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial database tables..."
    tracking_uri = resolved_tracking_uri(tracking_uri)
    with mlflow_errors(tracking_uri, "connecting"):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), tracking_uri, tracking_uri


def resolved_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI the driver uses, with a relative sqlite path made absolute, so
    workers started in another directory write to the same database."""
    import mlflow  # lazy: module docstring

    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        urlsplit(uri)
    except ValueError as e:  # MLflow's own parse raised it, a traceback from deep in its store registry
        raise UserError(f"MLflow tracking URI {redact_uri(uri)} is not a valid URI ({e})") from None
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def check_registry(tracking_uri: str | None) -> None:
    """Fail fast, before a job starts: the tracking server answers and accepts our credentials.
    Where nothing accepts a connection at all (a server not started, a mistyped host or port), a
    TCP connect says so in seconds; MLflow's own retries would first wait about 4 minutes."""
    client, uri, _ = connect(tracking_uri)
    refused = _refuses_connections(uri)
    if refused is not None:
        raise UserError(f"cannot reach MLflow tracking server at {redact_uri(uri)} ({refused}): "
                        "start it, or point registry.tracking_uri at one that runs")
    with mlflow_errors(uri, "listing experiments"):
        client.search_experiments(max_results=1)


def _refuses_connections(uri: str, timeout: float = 5.0) -> str | None:
    """Why nothing accepts a TCP connection at an http(s) tracking URI's host and port, or None."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e) or type(e).__name__
    return None


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


def start_run(tracking_uri: str | None, experiment: str, *, artifact_location: str | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> str:
    """Open a run in `experiment` (created if missing, its artifacts under `artifact_location`,
    else beside a sqlite store) and return its id; the job's workers log step metrics into it
    while they train, and `register_export` finishes it."""
    client, uri, _ = connect(tracking_uri)
    artifact_location = artifact_location or artifacts_next_to(uri)
    with mlflow_errors(uri, f"experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp = client.get_experiment(client.create_experiment(experiment, artifact_location=artifact_location))
            except Exception as e:  # MlflowException; two jobs starting at once both found none
                if not is_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
                exp = client.get_experiment_by_name(experiment)
        if exp.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {experiment!r} at {redact_uri(uri)} is deleted; restore it or pick another name")
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        return client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id


def end_run(tracking_uri: str | None, run_id: str, status: str = "FAILED") -> None:
    """Mark a run opened by `start_run` as ended (a job that failed before registering)."""
    with contextlib.suppress(Exception):
        client, uri, _ = connect(tracking_uri)
        set_terminated(client, uri, run_id, status)


def set_terminated(client, uri: str, run_id: str, status: str) -> None:
    """`client.set_terminated(run_id, status)`. On an HTTP server MLflow then writes links to the run
    and its experiment on stdout ("View run NAME at: URL"), built from the tracking URI as given:
    they are printed with its user:password@ left out (they were printed with the password)."""
    shown = io.StringIO()
    try:
        with contextlib.redirect_stdout(shown):
            client.set_terminated(run_id, status)
    finally:
        if text := shown.getvalue():
            if uri.rstrip("/"):
                text = text.replace(uri.rstrip("/"), redact_uri(uri).rstrip("/"))
            sys.stdout.write(scrub(text, env_secrets()))
            sys.stdout.flush()


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
        rows = [Metric(entity_key(k), float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            self.client.log_batch(self.run_id, metrics=rows)
        except Exception as e:  # noqa: BLE001 - the server may be briefly unreachable
            if not self.warned:
                print(f"warning: MLflow step metrics not logged ({type(e).__name__}: "
                      f"{scrub(str(e), env_secrets())[:200]})", flush=True)
                self.warned = True
