"""Cluster job submission: `dist-prune submit / status / logs / stop / jobs` on the Ray Jobs API.

    dist-prune submit CONFIG [key.sub=value ...] [--address URL] [--wait] [--working-dir DIR]
    dist-prune status JOB          dist-prune logs JOB [--follow]
    dist-prune stop JOB            dist-prune jobs

`submit` validates the config here first (one line and exit 2 on a mistake, nothing is
submitted), then submits `dist-prune run CONFIG OVERRIDES` as the job's entrypoint. Inside a
Ray job Ray sets `RAY_ADDRESS`, so that `dist-prune run` joins the cluster instead of starting
a local Ray. The cluster's nodes need dist-prune installed (the Dockerfile image);
`--working-dir` (default: the current directory) is uploaded as the job's working directory
and put first on its PYTHONPATH, so the code in it is what runs. Ray leaves out what
`.gitignore` / `.rayignore` list there and refuses uploads over ~500 MiB.

Paths in the config (model.path, data.calibration.path, eval.path, export.dir,
cluster.storage_path) are paths on the cluster; relative ones are relative to the job's
working directory there. They are therefore not checked for existence here. A config file
outside the working directory is shipped in a temporary working directory that holds only a
copy of it (an error when `--working-dir` was given explicitly, since that directory would
then not be shipped).

Address: `--address`, else `$RAY_API_SERVER_ADDRESS`, else `$RAY_ADDRESS` when it is an
http(s) URL (the same variables, in the same order, as `ray job submit`). It is the head's
dashboard URL, e.g. http://HEAD:8265; `host:port` means http://host:port. `--address` always
wins (Ray's own client would let the environment override it).

Environment forwarded to the job (`runtime_env["env_vars"]`), when set here:
MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN,
HF_TOKEN, DIST_PRUNE_DATA, and any `--env NAME`. Only their names are printed. Their values are
stored with the job by Ray: anyone who can query the cluster's job API can read them.

Ray token authentication (Ray 2.60, read from ray/_private/authentication and
ray/dashboard/modules/dashboard_sdk.py):
- The mode is the environment variable RAY_AUTH_MODE (`token` or `disabled`); it cannot be
  set in `--system-config`. `ray start --head` with RAY_AUTH_MODE unset turns token auth on by
  itself when it finds a token, and off otherwise; a local `ray.init()` turns it on and writes
  ~/.ray/auth_token if missing. RAY_AUTH_MODE=token with no token makes `ray start` fail.
- The token, highest precedence first: RAY_AUTH_TOKEN (the value), RAY_AUTH_TOKEN_PATH (a
  file; unreadable is fatal), ~/.ray/auth_token. `ray get-auth-token [--generate]` prints (or
  creates) it. Every node needs the same mode and token, e.g. on each node:
      export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/secure/ray_token   # same file content
      ray start --head --dashboard-host=0.0.0.0 ...     /    ray start --address=HEAD:6379
- The dashboard (and so the Jobs API, logs websocket included) wants `Authorization: Bearer
  TOKEN`; 401 means no token was sent, 403 a wrong one. Ray's JobSubmissionClient adds that
  header only when RAY_AUTH_MODE=token in the *client's* environment.
- Here the header is built explicitly and passed to JobSubmissionClient: the token comes from
  RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else (only when RAY_AUTH_MODE=token)
  ~/.ray/auth_token. RAY_AUTH_MODE=disabled sends nothing. So a client needs either
      RAY_AUTH_TOKEN=<token>            or   RAY_AUTH_TOKEN_PATH=<file>
  or RAY_AUTH_MODE=token with the token in ~/.ray/auth_token. The token is never printed.
- The job itself needs nothing from the client: its entrypoint is started by the cluster's
  processes and inherits their RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH). The client's RAY_AUTH_*
  variables are therefore NOT forwarded: a client-side RAY_AUTH_TOKEN_PATH names a file that
  need not exist on the cluster (Ray aborts on an unreadable one), and a forwarded
  RAY_AUTH_TOKEN would be stored in clear in the job's runtime_env, shown by the job API.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dist_prune.errors import UserError

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "DIST_PRUNE_DATA")
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Config keys that name files on the cluster, not here.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------- arguments

def add_parsers(commands) -> None:
    """Add submit / status / logs / stop / jobs to the `dist-prune` subparsers."""
    def address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="the Ray head's dashboard URL, e.g. http://HEAD:8265 (default: "
                                         "$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS if an http URL)")

    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    submit.add_argument("config", help="YAML job file (paths in it are paths on the cluster)")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    address(submit)
    submit.add_argument("--wait", action="store_true",
                        help="follow the logs until the job ends; exit 0 only if it SUCCEEDED")
    submit.add_argument("--working-dir", help="directory uploaded as the job's working directory "
                                              "(default: the current directory)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also forward this environment variable (repeatable)")

    for name, help in (("status", "show a job's status"), ("logs", "print a job's logs"),
                       ("stop", "stop a job and wait until it has ended")):
        p = commands.add_parser(name, help=help)
        p.add_argument("job", help="submission id, as printed by `dist-prune submit`")
        address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    address(commands.add_parser("jobs", help="list the jobs of a Ray cluster"))


def main(args: argparse.Namespace) -> int:
    """Run one of the job commands; returns the exit code. Mistakes raise UserError."""
    handler = {"submit": submit, "status": status, "logs": logs, "stop": stop, "jobs": jobs}
    return handler[args.command](args)


# ----------------------------------------------------------------------------- address, auth

def resolve_address(address: str | None) -> str:
    """The dashboard URL: --address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS."""
    source = "--address"
    if not address:
        for name in ADDRESS_ENV:
            value = os.environ.get(name, "").strip()
            if value:
                if name == "RAY_ADDRESS" and not value.startswith(("http://", "https://")):
                    raise UserError(f"RAY_ADDRESS={value} is not the dashboard's URL; pass --address "
                                    "http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
                address, source = value, f"${name}"
                break
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set "
                        "RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"{source} {address}: expected the dashboard's http(s) URL, e.g. "
                        "http://HEAD:8265")
    return address.rstrip("/")


def auth_token() -> str | None:
    """The Ray auth token this client sends (see the module docstring); None: no header."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file "
                            f"({e.strerror})") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    if mode == "token":
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
        if not token:
            raise UserError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or "
                            f"RAY_AUTH_TOKEN_PATH, or write it to {default} (`ray get-auth-token` "
                            "on the head prints it)")
        return token
    return None


_AUTH_HINT = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, or "
              "RAY_AUTH_MODE=token to send ~/.ray/auth_token; `ray get-auth-token` on the head "
              "prints it")


def _check_reachable(address: str, headers: dict) -> None:
    """One quick request with a timeout, so a wrong address fails fast and in one line."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        kind = type(e).__name__
        raise UserError(f"cannot reach the Ray dashboard at {address} ({kind}); is the cluster up "
                        "and is this its dashboard URL (e.g. http://HEAD:8265)?") from None
    if r.status_code == 401:
        raise UserError(f"the Ray cluster at {address} requires token authentication and no "
                        f"token was sent: {_AUTH_HINT}")
    if r.status_code == 403:
        raise UserError(f"the Ray cluster at {address} rejected the auth token: {_AUTH_HINT}")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise UserError(f"{address} does not answer like a Ray dashboard (HTTP {r.status_code} on "
                        "/api/version); give the head's dashboard URL, e.g. http://HEAD:8265")


@contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None):
    """A JobSubmissionClient for the resolved address, with the auth header when needed."""
    address = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    _check_reachable(address, headers)
    from ray.job_submission import JobSubmissionClient

    # JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its argument.
    with _without_env(ADDRESS_ENV):
        try:
            return JobSubmissionClient(address, headers=headers)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(f"cannot use the Ray Jobs API at {address}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def _api(address: str, job: str | None = None) -> Iterator[None]:
    """Turn the Jobs API's exceptions into one-line UserErrors."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {address} refused the auth token: {_AUTH_HINT}") from None
    except RuntimeError as e:
        text = str(e)
        if job is not None and "status code 404" in text:
            raise UserError(f"no job {job} on the Ray cluster at {address}") from None
        raise UserError(f"Ray Jobs API at {address}: {_first_line(e)}") from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientError) as e:
        raise UserError(f"lost the connection to the Ray dashboard at {address} "
                        f"({type(e).__name__})") from None


# ----------------------------------------------------------------------------- submit

def validate_config(path: str, overrides: list[str]):
    """load_config without checking that the cluster-side paths exist here."""
    from dist_prune.config import load_config

    return load_config(path, overrides, check_paths=False)


def _stage(config: Path, working_dir: Path | None) -> tuple[Path, str, Path | None]:
    """(directory to upload, config path relative to it, temporary directory to remove)."""
    base = (working_dir or Path.cwd()).resolve()
    if working_dir is not None and not base.is_dir():
        raise UserError(f"--working-dir {working_dir} is not a directory")
    config = config.resolve()
    if config.is_relative_to(base):
        return base, config.relative_to(base).as_posix(), None
    if working_dir is not None:
        raise UserError(f"config {config} is outside --working-dir {working_dir}; put it inside, "
                        "or leave out --working-dir to ship only the config")
    staged = Path(tempfile.mkdtemp(prefix="dist-prune-submit-"))
    shutil.copy2(config, staged / config.name)
    print(f"dist-prune: {config} is outside {base}: shipping a temporary working directory "
          "with only a copy of it", file=sys.stderr)
    return staged, config.name, staged


def forwarded_env(extra: list[str]) -> dict[str, str]:
    names = list(dict.fromkeys([*FORWARDED_ENV, *extra]))
    for name in extra:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"--env {name}: expected an environment variable name")
        if name not in os.environ:
            raise UserError(f"--env {name}: not set in this environment")
        if name.startswith("RAY_AUTH"):
            raise UserError(f"--env {name}: the job inherits Ray auth from the cluster; "
                            "do not forward it")
    return {name: os.environ[name] for name in names if name in os.environ}


def _ephemeral_outputs(cfg, env: dict[str, str]) -> list[str]:
    """Outputs that would land in the job's working directory, which Ray deletes later."""
    out = []
    if cfg.registry.enabled and not cfg.registry.tracking_uri and "MLFLOW_TRACKING_URI" not in env:
        out.append("no registry.tracking_uri or MLFLOW_TRACKING_URI: the model is registered in "
                   "sqlite:///mlflow.db inside the job's temporary working directory on the cluster")
    if not (cfg.export.dir and Path(cfg.export.dir).is_absolute()):
        out.append("export.dir is not an absolute path: the export is written inside the job's "
                   "temporary working directory on the cluster")
    return out


def submission_id(model_name: str) -> str:
    import secrets

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-.")[:40] or "job"
    return f"dist-prune-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(args: argparse.Namespace) -> int:
    cfg = validate_config(args.config, args.overrides)
    env = forwarded_env(args.env)
    working_dir = Path(args.working_dir) if args.working_dir else None
    upload, config_rel, staged = _stage(Path(args.config), working_dir)
    entrypoint = shlex.join(["dist-prune", "run", config_rel, *args.overrides])
    runtime_env = {"working_dir": str(upload)}
    if env:
        runtime_env["env_vars"] = env
    job_id = submission_id(cfg.registry.model_name)
    try:
        client = connect(args.address)
        address = client.get_address()
        try:
            with _api(address):
                job_id = client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                    metadata={"dist_prune.config": config_rel,
                              "dist_prune.model_name": cfg.registry.model_name})
        except (ValueError, OSError) as e:  # working_dir too large or unreadable
            raise UserError(f"cannot package the working directory {upload}: "
                            f"{_first_line(e)}") from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    print(f"dist-prune: submitted to {address}: {entrypoint}", file=sys.stderr)
    for warning in _ephemeral_outputs(cfg, env):
        print(f"dist-prune: warning: {warning}", file=sys.stderr)
    print(f"dist-prune: working dir {upload}; forwarded env: "
          f"{', '.join(sorted(env)) or '(none)'}", file=sys.stderr)
    print(job_id, flush=True)
    if not args.wait:
        print(f"dist-prune: follow with `dist-prune logs {job_id} --follow`, stop with "
              f"`dist-prune stop {job_id}`", file=sys.stderr)
        return 0
    try:
        final = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"dist-prune: stopped following; job {job_id} keeps running "
              f"(`dist-prune stop {job_id}` ends it)", file=sys.stderr)
        raise
    return _report_end(client, job_id, final)


# ----------------------------------------------------------------------------- follow, status

def follow(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns the final status."""
    import asyncio

    address = client.get_address()

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with _api(address, job_id):
        client.get_job_status(job_id)  # a missing job: one line, not a websocket error
        try:
            asyncio.run(tail())
        except RuntimeError as e:  # websocket closed abnormally: fall back to polling
            if "404" in str(e):
                raise
            print(f"dist-prune: log stream interrupted ({_first_line(e)}); polling status",
                  file=sys.stderr)
        return wait_terminal(client, job_id)


def wait_terminal(client, job_id: str, timeout_s: float | None = None) -> str:
    start = time.monotonic()
    while True:
        state = str(client.get_job_status(job_id))
        if state in TERMINAL or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return state
        time.sleep(1.0)


def _report_end(client, job_id: str, state: str) -> int:
    if state == "SUCCEEDED":
        print(f"dist-prune: job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    with _api(client.get_address(), job_id):
        message = _one_line(client.get_job_info(job_id).message)
    print(f"dist-prune: job {job_id} ended {state}" + (f": {message}" if message else ""),
          file=sys.stderr)
    return 1


def _one_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api(client.get_address(), args.job):
        info = client.get_job_info(args.job)
    message = _one_line(info.message)
    print(f"{args.job}  {info.status}" + (f"  {message}" if message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        follow(client, args.job)
        return 0
    with _api(client.get_address(), args.job):
        text = client.get_job_logs(args.job)
    sys.stdout.write(text)
    return 0


def stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api(client.get_address(), args.job):
        requested = client.stop_job(args.job)
        state = wait_terminal(client, args.job, timeout_s=60)
    if not requested and state in TERMINAL:
        print(f"{args.job}  {state}  (had already ended)")
    else:
        print(f"{args.job}  {state}")
    return 0 if state in TERMINAL else 1


def jobs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api(client.get_address()):
        found = client.list_jobs()
    found.sort(key=lambda j: j.start_time or 0)
    rows = [("JOB", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in found:
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000))
                   if j.start_time else "-")
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        rows.append((j.submission_id or j.job_id or "-", str(j.status), started, entry))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
