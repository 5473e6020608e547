"""Cluster job submission: `dist-prune submit / status / logs / stop / jobs` on the Ray Jobs API.

    dist-prune submit CONFIG [key.sub=value ...] [--address URL] [--no-wait] [--working-dir DIR]
                      [--runtime-env-json JSON] [--entrypoint-num-cpus N] [--entrypoint-num-gpus N]
    dist-prune status JOB          dist-prune logs JOB [--follow]
    dist-prune stop JOB            dist-prune jobs

`submit` validates the config here first (one line and exit 2 on a mistake, nothing is
submitted), ships it resolved with the local files it names (launch/ship.py) and runs
`dist-prune run dist-prune-job/CONFIG` as the job's entrypoint; then, like `ray job submit`,
it follows the job's logs until it ends (exit 0 only if it SUCCEEDED); `--no-wait` detaches.
Inside a Ray job Ray sets `RAY_ADDRESS`, so that `dist-prune run` joins the cluster instead of
starting a local Ray. The cluster's nodes need dist-prune installed (the Dockerfile image);
`--working-dir` (default: the current directory) is uploaded as the job's working directory
and put first on its PYTHONPATH, so the code in it is what runs. Ray leaves out what
`.gitignore` / `.rayignore` list there and refuses uploads over ~500 MiB.
`--runtime-env-json`, `--entrypoint-num-cpus` and `--entrypoint-num-gpus` go to Ray as
`ray job submit` passes them (the runtime env's `working_dir` is `--working-dir`'s).

Credentials never travel with a job. Ray stores a job's entrypoint, runtime env and metadata in
clear, shows them to anyone who can query the Jobs API (`ray job list`, the dashboard), and its
runtime-env agent writes the env vars to its log. So `submit` refuses a tracking URI that
carries a password (`http://user:PW@host`), and `--env` / `--runtime-env-json` env vars that
name a credential; MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN and
HF_TOKEN set here stay here (their names are printed). The job uses those the cluster gives it:
the environment of `ray start` on every node, which every job inherits, or MLflow's own
credentials file ~/.mlflow/credentials (mode 600) of the user Ray runs as (README: Credentials
on a cluster). Whatever the CLI prints from the cluster (logs, job lists, status messages)
passes through the registry's scrubber first: URI passwords and the values of this
environment's secret variables are masked.

Address and Ray token authentication: launch/connect.py. What travels with the job: launch/ship.py.

Environment forwarded to the job (`runtime_env["env_vars"]`), when set here:
MLFLOW_TRACKING_URI, DIST_PRUNE_DATA, and any `--env NAME` that is not a credential.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from dist_prune.errors import UserError
from dist_prune.redact import env_secrets, scrub
from launch.connect import api_errors, connect, first_line
from launch.ship import (CREDENTIAL_ENV, JOB_DIR, describe, forwarded_env, plan_shipping, refuse_credential,
                         runtime_env_of, stage, working_dir_of)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ----------------------------------------------------------------------------- arguments

def add_parsers(commands) -> None:
    """Add submit / status / logs / stop / jobs to the `dist-prune` subparsers."""
    def address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="the Ray head's dashboard URL, e.g. http://HEAD:8265 (default: "
                                         "$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS if an http URL)")

    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    submit.add_argument("config", help="YAML job file")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    address(submit)
    follow_logs = submit.add_mutually_exclusive_group()
    follow_logs.add_argument("--wait", dest="wait", action="store_true", default=True,
                             help="follow the logs until the job ends, exit 0 only if it SUCCEEDED (the default)")
    follow_logs.add_argument("--no-wait", dest="wait", action="store_false",
                             help="print the job id and return once the job is submitted")
    submit.add_argument("--working-dir", help="directory uploaded as the job's working directory "
                                              "(default: the current directory)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also forward this environment variable (repeatable; not a credential)")
    submit.add_argument("--runtime-env-json", metavar="JSON",
                        help="Ray runtime env of the job, as for `ray job submit` (its env_vars are added "
                             "to the forwarded ones; working_dir is --working-dir)")
    for kind in ("cpus", "gpus"):
        submit.add_argument(f"--entrypoint-num-{kind}", type=float, metavar="N",
                            help=f"{kind.upper()[:-1]}s reserved for the job's driver, as for `ray job submit`")

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


# ----------------------------------------------------------------------------- submit

def validate_config(path: str, overrides: list[str]):
    """load_config without the path checks: `plan_shipping` resolves the paths itself."""
    from dist_prune.config import load_config

    return load_config(path, overrides, check_paths=False)


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


def _resources(args: argparse.Namespace) -> dict[str, float]:
    chosen = {f"entrypoint_num_{kind}": getattr(args, f"entrypoint_num_{kind}") for kind in ("cpus", "gpus")}
    for key, value in chosen.items():
        if value is not None and not value >= 0:  # also NaN
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
    return {key: value for key, value in chosen.items() if value is not None}


def submit(args: argparse.Namespace) -> int:
    cfg = validate_config(args.config, args.overrides)
    refuse_credential("registry.tracking_uri", None, cfg.registry.tracking_uri or "")
    env = forwarded_env(args.env)
    runtime_env = runtime_env_of(args.runtime_env_json, env)
    resources = _resources(args)
    working_dir = working_dir_of(args.working_dir)
    shipped, on_cluster = plan_shipping(cfg)
    config_name = Path(args.config).name
    staged = stage(working_dir, cfg, config_name, shipped)
    entrypoint = shlex.join(["dist-prune", "run", f"{JOB_DIR}/{config_name}"])
    runtime_env["working_dir"] = str(staged)
    job_id = submission_id(cfg.registry.model_name)
    secrets = env_secrets()
    try:
        client = connect(args.address)
        address = client.get_address()
        try:
            with api_errors(address):
                job_id = client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env, **resources,
                    metadata={"dist_prune.config": scrub(args.config, secrets),
                              "dist_prune.overrides": scrub(shlex.join(args.overrides), secrets),
                              "dist_prune.model_name": cfg.registry.model_name})
        except (ValueError, OSError) as e:  # working_dir too large or unreadable
            raise UserError(f"cannot package the working directory {working_dir}: "
                            f"{scrub(first_line(e), secrets)}") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"dist-prune: submitted to {address}: {entrypoint}", file=sys.stderr)
    for line in describe(shipped, on_cluster):
        print(f"dist-prune: {line}", file=sys.stderr)
    for warning in _ephemeral_outputs(cfg, env):
        print(f"dist-prune: warning: {warning}", file=sys.stderr)
    kept = [name for name in CREDENTIAL_ENV if name in os.environ]
    print(f"dist-prune: working dir {working_dir}; forwarded env: {', '.join(sorted(env)) or '(none)'}"
          + (f"; not sent (the job uses the cluster's): {', '.join(kept)}" if kept else ""), file=sys.stderr)
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

    address, secrets = client.get_address(), env_secrets()

    async def tail() -> None:
        # Ray hands over what the log file holds so far, so a line still being written comes in
        # pieces, and so can a secret in it: the text after the last line end waits for the next
        # chunk, and each piece written out is scrubbed whole lines at a time.
        pending = ""
        try:
            async for chunk in client.tail_job_logs(job_id):
                pending += chunk
                cut = max(pending.rfind("\n"), pending.rfind("\r")) + 1  # \r: progress bars
                if cut:
                    sys.stdout.write(scrub(pending[:cut], secrets))
                    sys.stdout.flush()
                    pending = pending[cut:]
        finally:
            sys.stdout.write(scrub(pending, secrets))
            sys.stdout.flush()

    with api_errors(address, job_id):
        client.get_job_status(job_id)  # a missing job: one line, not a websocket error
        try:
            asyncio.run(tail())
        except RuntimeError as e:  # websocket closed abnormally: fall back to polling
            if "404" in str(e):
                raise
            print(f"dist-prune: log stream interrupted ({first_line(e)}); polling status",
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
    with api_errors(client.get_address(), job_id):
        message = scrub(_one_line(client.get_job_info(job_id).message), env_secrets())
    print(f"dist-prune: job {job_id} ended {state}" + (f": {message}" if message else ""),
          file=sys.stderr)
    return 1


def _one_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with api_errors(client.get_address(), args.job):
        info = client.get_job_info(args.job)
    message = scrub(_one_line(info.message), env_secrets())
    print(f"{args.job}  {info.status}" + (f"  {message}" if message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        follow(client, args.job)
        return 0
    with api_errors(client.get_address(), args.job):
        text = client.get_job_logs(args.job)
    sys.stdout.write(scrub(text, env_secrets()))
    return 0


def stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with api_errors(client.get_address(), args.job):
        requested = client.stop_job(args.job)
        state = wait_terminal(client, args.job, timeout_s=60)
    if not requested and state in TERMINAL:
        print(f"{args.job}  {state}  (had already ended)")
    else:
        print(f"{args.job}  {state}")
    return 0 if state in TERMINAL else 1


def jobs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with api_errors(client.get_address()):
        found = client.list_jobs()
    found.sort(key=lambda j: j.start_time or 0)
    rows, secrets = [("JOB", "STATUS", "STARTED", "ENTRYPOINT")], env_secrets()
    for j in found:
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000))
                   if j.start_time else "-")
        entry = scrub(j.entrypoint, secrets)  # a job submitted by other means may hold one
        entry = entry if len(entry) <= 70 else entry[:67] + "..."
        rows.append((j.submission_id or j.job_id or "-", str(j.status), started, entry))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
