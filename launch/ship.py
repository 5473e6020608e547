"""What a submitted job takes with it: the working directory (the code that runs), the resolved
config, the small local files that config names, and a few environment variables; never a
credential (launch/jobs.py's docstring says why and how a job gets them instead).

The job runs on the cluster, where a path of this machine means nothing. `dist-prune submit`
therefore resolves, before anything is submitted, every path the job will read
(`dist_prune.config.input_paths`: the model, calibration, eval and fine-tuning data, but not
calibration text for a method that needs none):

- an absolute path names storage that every node mounts: it is sent as it is, not checked here;
- a relative path is a file or directory here, relative to the current directory, as
  `dist-prune run` would read it. It must exist, and it travels with the job's working
  directory, under `dist-prune-job/inputs/`, with its config key pointed there, when all the
  shipped inputs together hold at most SHIP_LIMIT bytes. A larger one is refused in one line
  that names it and says how to point at shared storage.

SHIP_LIMIT is 64 MiB. Ray keeps every uploaded package in the head node's GCS, in memory, for
as long as a job uses it, every node running a worker downloads it, and Ray refuses a package of
512 MiB (its gRPC message limit) and warns from 10 MiB a file. Text data fits with room
(WikiText-2's valid and test files: 1.1 and 1.2 MiB), as does a test-sized model; a real model
(SmolLM2-135M: 270 MB in bfloat16) belongs on shared storage, read in place by every worker.

The job runs `dist-prune run dist-prune-job/<config name>`: the config resolved here (overrides,
`${VAR}` expansion, the method's defaults), the same YAML `dist-prune config` prints. So what
runs is exactly what was checked here.

Ray uploads one directory, leaving out what the `.gitignore` / `.rayignore` files in it list.
The staged directory holds a symlink to every top-level entry of the working directory (Ray's
packaging follows links, so their files are uploaded as they are), copies of its top-level
`.gitignore` and `.rayignore` with two lines appended that keep `dist-prune-job/` and all in it
(a `*.txt` or `*.safetensors` there must not drop a shipped input), and `dist-prune-job/` itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dist_prune.config import JobConfig, config_yaml, input_paths, set_input_path
from dist_prune.errors import UserError
from dist_prune.redact import SECRET_ENV, redact_uri, scrub

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "DIST_PRUNE_DATA")
# set here, never sent: the cluster gives the job its own (launch/jobs.py's docstring)
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN")
SHIP_LIMIT = 64 * 2**20
JOB_DIR = "dist-prune-job"
IGNORE_FILES = (".gitignore", ".rayignore")


@dataclass(frozen=True)
class Shipped:
    key: str        # config key
    given: str      # the path as the config gave it
    source: Path    # the file or directory here
    target: str     # its path in the job's working directory
    size: int       # bytes


def _size_inside(root: Path, key: str) -> int:
    """Bytes of a file, or of every file under a directory; a link that leaves the directory
    is refused (a cloned model could point one at a credentials file)."""
    if root.is_file():
        return root.stat().st_size
    total, inside = 0, root.resolve()
    for path in root.rglob("*"):
        resolved = path.resolve()
        if not resolved.is_relative_to(inside):
            raise UserError(f"{key} {root}: {path.relative_to(root)} links to {resolved}, outside it; "
                            "refusing to ship it with the job")
        if resolved.is_file():
            total += resolved.stat().st_size
    return total


def plan_shipping(cfg: JobConfig) -> tuple[list[Shipped], list[str]]:
    """(the relative inputs to ship, the keys of absolute ones left to the cluster); `cfg` is
    pointed at the shipped copies."""
    shipped, on_cluster, by_source = [], [], {}
    for item in input_paths(cfg):
        if Path(item.path).is_absolute():
            on_cluster.append(f"{item.key} {item.path}")
            continue
        source = Path(item.path).resolve()
        exists = source.exists() if item.directory_ok else source.is_file()
        if not exists:
            kind = "does not exist" if item.directory_ok else "is not a file"
            raise UserError(f"{item.key} {item.path} {kind} here ({source}): a relative path names a "
                            "file on this machine, shipped with the job; an absolute path names "
                            "storage every node of the cluster mounts")
        first = by_source.get(source)  # one file under two keys travels once
        target = first.target if first else f"{JOB_DIR}/inputs/{len(by_source)}/{source.name}"
        shipped.append(Shipped(item.key, item.path, source, target,
                               first.size if first else _size_inside(source, item.key)))
        by_source.setdefault(source, shipped[-1])
        set_input_path(cfg, item.key, target)
    total = sum(s.size for s in by_source.values())
    if total > SHIP_LIMIT:
        largest = max(by_source.values(), key=lambda s: s.size)
        raise UserError(f"{largest.key} {largest.given} is {largest.size / 2**20:.1f} MiB, too much to ship with "
                        f"the job (all local inputs together: at most {SHIP_LIMIT // 2**20} MiB): put it on "
                        "storage every node mounts and give its absolute path")
    return shipped, on_cluster


def stage(working_dir: Path, cfg: JobConfig, config_name: str, shipped: list[Shipped]) -> Path:
    """A temporary directory for Ray to upload (module docstring); the caller removes it."""
    staged = Path(tempfile.mkdtemp(prefix="dist-prune-submit-"))
    try:
        for entry in working_dir.iterdir():
            if entry.name == JOB_DIR:
                raise UserError(f"--working-dir {working_dir} holds {JOB_DIR}/, the name submit gives "
                                "the job's own files; rename it")
            if entry.name in IGNORE_FILES and entry.is_file():
                (staged / entry.name).write_text(entry.read_text() + f"\n!/{JOB_DIR}\n!/{JOB_DIR}/**\n")
            else:
                (staged / entry.name).symlink_to(entry)
        (staged / JOB_DIR).mkdir()
        (staged / JOB_DIR / config_name).write_text(config_yaml(cfg))
        for item in {s.target: s for s in shipped}.values():
            link = staged / item.target
            link.parent.mkdir(parents=True)
            link.symlink_to(item.source)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def describe(shipped: list[Shipped], on_cluster: list[str]) -> list[str]:
    """One line per input: what travels with the job, what the cluster must have."""
    lines = [f"{s.key} {s.given} ({s.size / 2**20:.1f} MiB) ships with the job" for s in shipped]
    return lines + [f"{item} is read on the cluster (absolute: shared storage)" for item in on_cluster]


def working_dir_of(option: str | None) -> Path:
    base = Path(option or os.getcwd()).resolve()
    if not base.is_dir():
        raise UserError(f"--working-dir {option} is not a directory")
    return base


def refuse_credential(where: str, name: str | None, value: str) -> None:
    """A credential in what Ray stores in clear: one line naming where, never the value."""
    if name is not None and (name in CREDENTIAL_ENV or SECRET_ENV.search(name)):
        raise UserError(f"{where} {name}: credentials are not sent with a job (Ray keeps its environment "
                        f"in clear and logs it); set {name} on the cluster's nodes (README: Credentials "
                        "on a cluster)")
    try:
        password = urlsplit(value).password
    except ValueError:  # a URI that does not parse ("Invalid IPv6 URL") may still hold user:password@
        password = scrub(value, ()) != value
    if password:
        raise UserError(f"{where}{' ' + name if name else ''} {redact_uri(value)} carries a password, "
                        "which Ray would keep in clear with the job: give the URI without user:password@ "
                        "and the credentials to the cluster's nodes (README: Credentials on a cluster)")


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
    env = {name: os.environ[name] for name in names if name in os.environ}
    for name, value in env.items():
        refuse_credential("--env" if name in extra else "environment variable", name, value)
    return env


def runtime_env_of(text: str | None, env: dict[str, str]) -> dict:
    """`--runtime-env-json` with the forwarded env vars added (its own win)."""
    runtime_env: dict = {}
    if text is not None:
        try:
            runtime_env = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--runtime-env-json: not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(runtime_env, dict):
            raise UserError("--runtime-env-json: expected a JSON object, e.g. '{\"pip\": [\"rich\"]}'")
    if "working_dir" in runtime_env:
        raise UserError("--runtime-env-json: give working_dir as --working-dir (submit adds the "
                        "resolved config and the files it ships to it)")
    own = runtime_env.get("env_vars", {})
    if not isinstance(own, dict) or not all(isinstance(v, str) for v in own.values()):
        raise UserError("--runtime-env-json: env_vars must map names to strings")
    for name, value in own.items():
        refuse_credential("--runtime-env-json env_vars", name, value)
    if env or own:
        runtime_env["env_vars"] = {**env, **own}
    return runtime_env
