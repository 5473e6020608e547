"""Real `mlflow server` processes on loopback for the tests (sqlite backend, artifacts served by
the server), each in its own process group; started once per session by conftest's fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ADMIN, PASSWORD = "admin", "Adm1n-pa55word-x7"
START_TIMEOUT_S = 240  # imports and schema migration: 15-90 s here on a busy 2-core box


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's MLflow/Ray settings: nothing leaks in from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start(root: Path, *, auth: bool) -> Server:
    root.mkdir()
    port = free_port()
    # no background job runner: it is not needed here and costs a process and CPU
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    if auth:
        ini = root / "auth.ini"
        # auth_cache_ttl_seconds: without it every request re-hashes the password (PBKDF2), seconds
        # per request on a loaded machine
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{root}/auth.db\n"
                       f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 300\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex)
        args += ["--app-name", "basic-auth"]
    log = root / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_healthy(server: Server) -> Server:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"mlflow server exited {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{server.log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """TERM, then KILL, the server's whole process group (uvicorn workers included)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # a test server needs no grace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
