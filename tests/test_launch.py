"""`dist-prune submit / status / logs / stop / jobs` against a real 2-node Ray cluster on loopback.

The cluster runs with token authentication (RAY_AUTH_MODE=token, a fresh token in a temporary
file), its own short --temp-dir (so no other Ray on this machine finds it through
/tmp/ray/ray_current_cluster) and only loopback listeners:

- Ray turns `--node-ip-address=127.0.0.1` into the machine's outward IP unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with that variable (inherited by every Ray process) the
  node IP stays 127.0.0.1 and GCS, raylets, agents and workers bind 127.0.0.1 only.
- That variable also makes `ray start --address` refuse to join; the second node is therefore
  started through a two-line wrapper around Ray's CLI that lifts that refusal in that one process.
- Each node has its own --temp-dir: two nodes on one machine would otherwise share one
  runtime_resources directory, and one node's runtime-env cleanup deletes the other's copy of
  the job's working directory while the job runs in it.

Teardown does what `ray stop --force` does, but only to this cluster: `ray stop` would kill
every Ray process of this user, including other tests' local clusters. Each `ray start --block`
runs in its own session, so SIGKILL to its process group ends the daemons it started; workers
and job drivers (which Ray puts in process groups of their own) are found by the cluster's
temp dir in their command line or working directory and killed too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

CLI = [sys.executable, "-m", "dist_prune.cli"]
BIN = Path(sys.executable).parent
JOIN_WRAPPER = ("import sys, ray._private.ray_constants as c, ray._private.services as s; "
                "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
                "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")
OBJECT_STORE = str(100 * 1000**2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str       # dashboard URL
    env: dict          # client environment with the token
    base: Path         # temp dir (cluster temp dir, token, logs)

    def cli(self, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
        return subprocess.run(CLI + args, cwd=cwd, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)


def _clean_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                 "RAY_AUTH_MODE", "DIST_PRUNE_DATA", "HF_TOKEN", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _wait(what: str, ok, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: ray start exited {p.returncode}\n"
                                   f"{log.read_text()[-3000:]}")
        try:
            if ok():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def _processes_of(base: Path) -> list[int]:
    """Processes that belong to this cluster: its temp dir in their command line or cwd."""
    import psutil

    mine, key = [], str(base)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            cwd = ""
        if proc.pid != os.getpid() and (key in " ".join(proc.info["cmdline"] or ())
                                        or cwd.startswith(key)):
            mine.append(proc.pid)
    return mine


def _kill_cluster(starters: list[subprocess.Popen], base: Path) -> None:
    for p in starters:  # second node first, then the head
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
    deadline = time.monotonic() + 20
    while (left := _processes_of(base)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not _processes_of(base), "processes of the test cluster survived teardown"


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="dpl-", dir="/tmp"))  # short: unix socket paths
    token = base / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _clean_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    gcs, dash = _free_port(), _free_port()
    head_cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}", "--num-cpus=1",
                f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={base / 't'}",
                "--disable-usage-stats"]
    node_cmd = [sys.executable, "-c", JOIN_WRAPPER, "start", "--block", f"--address=127.0.0.1:{gcs}",
                "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"second": 1}',
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={base / 'u'}",
                "--disable-usage-stats"]
    address = f"http://127.0.0.1:{dash}"
    headers = {"Authorization": f"Bearer {token.read_text()}"}
    starters: list[subprocess.Popen] = []
    logs = [base / "head.log", base / "node.log"]
    try:
        for cmd, log in zip((head_cmd, node_cmd), logs):
            with open(log, "w") as out:
                starters.insert(0, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                    start_new_session=True, cwd=base))
            if len(starters) == 1:
                _wait("head", lambda: requests.get(f"{address}/api/version", headers=headers,
                                                   timeout=5).ok, starters, logs[:1])

        def two_nodes() -> bool:
            r = requests.get(f"{address}/api/v0/nodes", headers=headers, timeout=10)
            nodes = r.json()["data"]["result"]["result"] if r.ok else []
            return sum(n.get("state") == "ALIVE" for n in nodes) == 2
        _wait("second node", two_nodes, starters, logs[::-1])
        yield Cluster(address, dict(env), base)
    finally:
        _kill_cluster(starters, base)
        shutil.rmtree(base, ignore_errors=True)


def _job_config(directory: Path, tiny_llama: Path, text_file: Path) -> Path:
    """A tiny Wanda job; the eval text is found through $DIST_PRUNE_DATA, which only the
    submitting environment has (so the job sees it only if submit forwards it)."""
    config = directory / "tiny.yaml"
    config.write_text(f"""
model: {{path: {tiny_llama}}}
prune: {{method: wanda, sparsity: 0.5}}
data:
  calibration: {{path: {text_file}, num_samples: 8, seq_len: 64}}
eval: {{path: "${{DIST_PRUNE_DATA}}/{text_file.name}", seq_len: 64, num_windows: 4}}
cluster: {{num_workers: 2}}
registry: {{model_name: tiny-submit}}
export: {{dir: out, max_shard_size: 40KB}}
""")
    return config


def _submit_env(cluster: Cluster, text_file: Path) -> dict:
    return dict(cluster.env, DIST_PRUNE_DATA=str(text_file.parent), HF_TOKEN="hf_not_printed_1234")


def test_unreachable_address_is_one_line(tmp_path, tiny_llama, text_file):
    config = _job_config(tmp_path, tiny_llama, text_file)
    port = _free_port()
    env = dict(_clean_env(), DIST_PRUNE_DATA=str(text_file.parent))
    proc = subprocess.run(CLI + ["submit", str(config), "--address", f"http://127.0.0.1:{port}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"http://127.0.0.1:{port}" in proc.stderr and proc.stdout == ""


def test_submit_wait_prunes_and_registers(cluster, tmp_path, tiny_llama, text_file):
    workdir = tmp_path / "work"
    workdir.mkdir()
    _job_config(workdir, tiny_llama, text_file)  # writes tiny.yaml
    db = tmp_path / "registry" / "mlflow.db"
    db.parent.mkdir()
    env = _submit_env(cluster, text_file)
    proc = cluster.cli(["submit", "tiny.yaml", f"registry.tracking_uri=sqlite:///{db}",
                        "--address", cluster.address, "--wait"], cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("dist-prune-tiny-submit-")
    # the job's logs, streamed: the summary table of `dist-prune run`
    assert "sparse perplexity" in proc.stdout and "models:/tiny-submit@candidate" in proc.stdout
    assert "achieved sparsity" in proc.stdout
    # env names printed, values never
    assert "DIST_PRUNE_DATA" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "hf_not_printed_1234" not in proc.stdout + proc.stderr
    assert cluster.base.joinpath("token").read_text() not in proc.stdout + proc.stderr

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    version = client.get_model_version_by_alias("tiny-submit", "candidate")
    assert int(version.version) == 1

    status = cluster.cli(["status", job_id, "--address", cluster.address], cwd=workdir)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout
    logs = cluster.cli(["logs", job_id, "--address", cluster.address], cwd=workdir)
    assert logs.returncode == 0 and "sparse perplexity" in logs.stdout


def test_stop_and_list(cluster, tmp_path, tiny_llama, text_file):
    # The config lives outside the working dir: it is shipped in a staged temporary one.
    config = _job_config(tmp_path, tiny_llama, text_file)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(_submit_env(cluster, text_file), RAY_API_SERVER_ADDRESS=cluster.address)
    proc = cluster.cli(["submit", str(config), "registry.model_name=tiny-stopped"], cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "temporary working directory" in proc.stderr
    assert "warning: no registry.tracking_uri" in proc.stderr  # would vanish with the job's dir
    job_id = proc.stdout.strip()
    assert job_id.startswith("dist-prune-tiny-stopped-")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = cluster.cli(["status", job_id], cwd=cwd, env=env).stdout
        if "RUNNING" in state or "SUCCEEDED" in state or "FAILED" in state:
            break
        time.sleep(0.5)
    assert f"{job_id}  RUNNING" in state

    stop = cluster.cli(["stop", job_id], cwd=cwd, env=env)
    assert stop.returncode == 0 and f"{job_id}  STOPPED" in stop.stdout, stop.stderr
    status = cluster.cli(["status", job_id], cwd=cwd, env=env)
    assert status.returncode == 0 and f"{job_id}  STOPPED" in status.stdout
    jobs = cluster.cli(["jobs"], cwd=cwd, env=env)
    assert jobs.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in jobs.stdout.splitlines()[1:]}
    assert rows[job_id] == "STOPPED"
    # `dist-prune run` as the entrypoint, config shipped under its own name
    assert "dist-prune run tiny.yaml registry.model_name=tiny-stopped" in jobs.stdout


def test_mistakes_are_one_line_and_submit_nothing(cluster, tmp_path, tiny_llama, text_file):
    config = _job_config(tmp_path, tiny_llama, text_file)
    env = _submit_env(cluster, text_file)
    before = cluster.cli(["jobs", "--address", cluster.address], cwd=tmp_path).stdout

    bad = cluster.cli(["submit", str(config), "prune.sparsity=1.5", "--address", cluster.address],
                      cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "prune.sparsity must be in [0, 1)" in bad.stderr

    no_token = dict(env)
    del no_token["RAY_AUTH_TOKEN_PATH"], no_token["RAY_AUTH_MODE"]
    proc = cluster.cli(["submit", str(config), "--address", cluster.address], cwd=tmp_path,
                       env=no_token)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "requires token authentication" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr

    wrong = dict(env, RAY_AUTH_TOKEN="0" * 64)
    proc = cluster.cli(["jobs", "--address", cluster.address], cwd=tmp_path, env=wrong)
    assert proc.returncode == 2 and "rejected the auth token" in proc.stderr

    missing = cluster.cli(["status", "no-such-job", "--address", cluster.address], cwd=tmp_path)
    assert missing.returncode == 2 and "no job no-such-job" in missing.stderr

    after = cluster.cli(["jobs", "--address", cluster.address], cwd=tmp_path).stdout
    assert len(after.splitlines()) == len(before.splitlines())


def test_token_from_env_value_and_address_flag_wins(cluster, tmp_path):
    env = dict(cluster.env, RAY_AUTH_TOKEN=cluster.base.joinpath("token").read_text(),
               RAY_ADDRESS="http://127.0.0.1:1")
    del env["RAY_AUTH_TOKEN_PATH"]
    proc = cluster.cli(["jobs", "--address", cluster.address], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("JOB")


def test_failed_job_exits_nonzero(cluster, tmp_path, tiny_llama, text_file):
    # model.path is a path on the cluster: not checked here, so the job starts and fails there.
    config = _job_config(tmp_path, tiny_llama, text_file)
    proc = cluster.cli(["submit", str(config), "model.path=/nonexistent/model", "--wait",
                        "--working-dir", str(tmp_path), "--address", cluster.address],
                       cwd=Path("/"), env=_submit_env(cluster, text_file))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "model.path /nonexistent/model does not exist" in proc.stdout  # the job's own log
    assert "ended FAILED" in proc.stderr.splitlines()[-1]


def test_address_auth_and_staging_rules(tmp_path, monkeypatch):
    """No cluster needed: which address, which token, what is uploaded."""
    from dist_prune.errors import UserError
    from launch import jobs

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                 "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert jobs.resolve_address("a:8265") == "http://a:8265"
    assert jobs.resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://c:443/")
    assert jobs.resolve_address(None) == "https://c:443"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the dashboard
    with pytest.raises(UserError, match="not the dashboard"):
        jobs.resolve_address(None)

    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-token\n")
    assert jobs.auth_token() is None  # like Ray's client: the default file only in token mode
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert jobs.auth_token() == "default-token"
    (tmp_path / "tok").write_text(" file-token \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.auth_token() == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_token() is None

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    inside, outside = work / "sub" / "a.yaml", tmp_path / "b.yaml"
    inside.write_text("{}")
    outside.write_text("{}")
    assert jobs._stage(inside, work) == (work.resolve(), "sub/a.yaml", None)
    with pytest.raises(UserError, match="outside --working-dir"):
        jobs._stage(outside, work)
    monkeypatch.chdir(work)
    upload, rel, staged = jobs._stage(outside, None)
    try:
        assert upload == staged and rel == "b.yaml" and sorted(os.listdir(staged)) == ["b.yaml"]
    finally:
        shutil.rmtree(staged)

    monkeypatch.setenv("HF_TOKEN", "x")
    monkeypatch.setenv("OTHER", "y")
    assert jobs.forwarded_env(["OTHER"]) == {"HF_TOKEN": "x", "OTHER": "y"}
    with pytest.raises(UserError, match="inherits Ray auth"):
        jobs.forwarded_env(["RAY_AUTH_TOKEN"])
