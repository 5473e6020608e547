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

import json
import os
import re
import secrets
import shlex
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
    secret: str        # MLFLOW_TRACKING_PASSWORD in the environment of `ray start` on both nodes

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
    # RAY_memory_monitor_refresh_ms=0: Ray's monitor kills a job's processes when the *machine* is
    # at 95% memory, whoever holds it; on a shared test box that was other work (22.5 of 23.5 GB)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_memory_monitor_refresh_ms="0")
    # the documented way to give a job credentials: the nodes' own environment, never the client's
    secret = "cluster-pw-" + secrets.token_hex(8)
    node_env = dict(env, MLFLOW_TRACKING_PASSWORD=secret)
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
                starters.insert(0, subprocess.Popen(cmd, env=node_env, stdout=out, stderr=subprocess.STDOUT,
                                                    start_new_session=True, cwd=base))
            if len(starters) == 1:
                _wait("head", lambda: requests.get(f"{address}/api/version", headers=headers,
                                                   timeout=5).ok, starters, logs[:1])

        def two_nodes() -> bool:
            r = requests.get(f"{address}/api/v0/nodes", headers=headers, timeout=10)
            nodes = r.json()["data"]["result"]["result"] if r.ok else []
            return sum(n.get("state") == "ALIVE" for n in nodes) == 2
        _wait("second node", two_nodes, starters, logs[::-1])
        yield Cluster(address, dict(env), base, secret)
    finally:
        _kill_cluster(starters, base)
        shutil.rmtree(base, ignore_errors=True)


def _job_config(directory: Path, tiny_llama: Path, text_file: Path) -> Path:
    """A tiny Wanda job; the eval text is found through $DIST_PRUNE_DATA, expanded here."""
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


# Credentials set in the submitting shell: none may travel with a job or show up anywhere.
PLANTED = {"MLFLOW_TRACKING_USERNAME": "planted-user-2b7f", "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-5d1e",
           "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-77a0", "HF_TOKEN": "hf_planted_token_91c3"}


URI_PASSWORD, ENV_SECRET = "planted-uri-pw-6d2e", "planted-aws-secret-0b9f"
# a line a job prints: a tracking URI with a password, and the value of a secret variable of the
# shell that reads the logs
SECRET_LINE = f"tracking at http://bob:{URI_PASSWORD}@mlflow.example:5000 key {ENV_SECRET}"
MASKED_LINE = "tracking at http://***@mlflow.example:5000 key ***"


def _submit_env(cluster: Cluster, text_file: Path) -> dict:
    return dict(cluster.env, DIST_PRUNE_DATA=str(text_file.parent), **PLANTED)


def _headers(cluster: Cluster) -> dict:
    return {"Authorization": f"Bearer {cluster.base.joinpath('token').read_text()}"}


def _plain_job(cluster: Cluster, entrypoint: str) -> str:
    """Run a plain entrypoint through the Jobs API (not dist-prune) until it ends; its id."""
    r = requests.post(f"{cluster.address}/api/jobs/", json={"entrypoint": entrypoint},
                      headers=_headers(cluster), timeout=30)
    job = r.json()["submission_id"]
    deadline = time.monotonic() + 120
    while requests.get(f"{cluster.address}/api/jobs/{job}", headers=_headers(cluster),
                       timeout=30).json()["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job} did not end"
        time.sleep(0.5)
    return job


def _job_of_the_cluster(cluster: Cluster, entrypoint: str) -> str:
    """Run a plain entrypoint through the Jobs API and return its logs."""
    job = _plain_job(cluster, entrypoint)
    return requests.get(f"{cluster.address}/api/jobs/{job}/logs", headers=_headers(cluster), timeout=30).json()["logs"]


def test_unreachable_address_is_one_line(tmp_path, tiny_llama, text_file):
    config = _job_config(tmp_path, tiny_llama, text_file)
    port = _free_port()
    env = dict(_clean_env(), DIST_PRUNE_DATA=str(text_file.parent))
    proc = subprocess.run(CLI + ["submit", str(config), "--address", f"http://127.0.0.1:{port}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"http://127.0.0.1:{port}" in proc.stderr and proc.stdout == ""


def test_submit_ships_inputs_follows_logs_and_keeps_secrets(cluster, tmp_path, tiny_llama, text_file):
    """`submit` with no flag follows the job's logs, like `ray job submit`. It ships the config's
    relative inputs with the job, past a .gitignore that lists them; the job's log has one line
    per stage, timed where the work ran; the model is registered. No planted credential (the
    client's, or the cluster's own) appears in any output, Ray job record, file under Ray's
    session directories, or the registry; the cluster's reaches a job through its environment."""
    workdir, data = tmp_path / "work", tmp_path / "data"
    workdir.mkdir()
    data.mkdir()
    (workdir / ".gitignore").write_text("*.txt\ninputs/\n")
    shutil.copy(text_file, data / "wiki.txt")
    (workdir / "tiny.yaml").write_text(f"""
model: {{path: {tiny_llama}}}
prune: {{method: wanda, sparsity: 0.5}}
data:
  calibration: {{path: ../data/wiki.txt, num_samples: 8, seq_len: 64}}
eval: {{path: ../data/wiki.txt, seq_len: 64, num_windows: 4}}
cluster: {{num_workers: 2}}
registry: {{model_name: tiny-submit}}
export: {{dir: out, max_shard_size: 40KB}}
""")
    db = tmp_path / "registry" / "mlflow.db"
    db.parent.mkdir()
    proc = cluster.cli(["submit", "tiny.yaml", f"registry.tracking_uri=sqlite:///{db}",
                        "--address", cluster.address], cwd=workdir, env=_submit_env(cluster, text_file))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("dist-prune-tiny-submit-")
    # the job's logs, streamed: the summary table of `dist-prune run`
    assert "sparse perplexity" in proc.stdout and "models:/tiny-submit@candidate" in proc.stdout
    assert f"job {job_id} SUCCEEDED" in proc.stderr.splitlines()[-1]
    size = f"({(data / 'wiki.txt').stat().st_size / 2**20:.1f} MiB)"
    for key in ("data.calibration.path", "eval.path"):
        assert f"dist-prune: {key} ../data/wiki.txt {size} ships with the job" in proc.stderr
    assert f"dist-prune: model.path {tiny_llama} is read on the cluster" in proc.stderr
    assert "not sent (the job uses the cluster's): " + ", ".join(PLANTED) in proc.stderr

    # one line per stage, no tqdm frames; a stage's time fits in the stage timer around it
    assert "\r" not in proc.stdout and "it/s" not in proc.stdout
    (load,) = re.findall(r"load \(this rank's slices\): (\d+)/(\d+) in ([\d.]+) s\n", proc.stdout)
    assert load[0] == load[1] and float(load[2]) <= float(re.search(r"seconds: load +([\d.]+)", proc.stdout)[1]) + 0.05
    for stage in (r"calibrate\+prune \(wanda\)", r"perplexity \(dense\)", r"perplexity \(sparse\)", "export"):
        assert len(re.findall(stage + r": (\d+)/\1 in [\d.]+ s\n", proc.stdout)) == 1, stage

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    version = client.get_model_version_by_alias("tiny-submit", "candidate")
    assert int(version.version) == 1
    params = client.get_run(version.run_id).data.params
    assert params["data.calibration.path"] == params["eval.path"] == "dist-prune-job/inputs/0/wiki.txt"

    status = cluster.cli(["status", job_id, "--address", cluster.address], cwd=workdir)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout
    logs = cluster.cli(["logs", job_id, "--address", cluster.address], cwd=workdir)
    assert logs.returncode == 0 and "sparse perplexity" in logs.stdout
    jobs = cluster.cli(["jobs", "--address", cluster.address], cwd=workdir)
    record = requests.get(f"{cluster.address}/api/jobs/{job_id}", headers=_headers(cluster), timeout=30).json()
    assert record["entrypoint"] == "dist-prune run dist-prune-job/tiny.yaml"
    assert set(record["runtime_env"]["env_vars"]) == {"DIST_PRUNE_DATA"}

    probe = _job_of_the_cluster(cluster, "python -c \"import os; print('cluster password length', "
                                         "len(os.environ['MLFLOW_TRACKING_PASSWORD']))\"")
    assert f"cluster password length {len(cluster.secret)}" in probe

    texts = [proc.stdout, proc.stderr, status.stdout, logs.stdout, jobs.stdout, json.dumps(record), probe]
    files = [p for root in (cluster.base, db.parent) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "runtime_env_agent.log" for p in files)  # where Ray logs a job's env vars
    for secret in (*PLANTED.values(), cluster.secret):
        assert not any(secret in text for text in texts), secret
        assert not [p for p in files if secret.encode() in p.read_bytes()], secret


def test_job_commands_mask_what_a_job_holds(cluster, tmp_path):
    """A job submitted by other means (the Jobs API, as `ray job submit` does) whose entrypoint and
    log hold a tracking URI with a password and the value of a secret variable of the shell that
    asks: `dist-prune logs` (whole and --follow), `jobs` and `status` show both masked."""
    job = _plain_job(cluster, f"echo {shlex.quote(SECRET_LINE)}; exit 3")
    env = dict(cluster.env, AWS_SECRET_ACCESS_KEY=ENV_SECRET)
    outputs = {" ".join(args): cluster.cli([*args, "--address", cluster.address], cwd=tmp_path, env=env)
               for args in (["logs", job], ["logs", job, "--follow"], ["jobs"], ["status", job])}
    for command, proc in outputs.items():
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert URI_PASSWORD not in proc.stdout + proc.stderr and ENV_SECRET not in proc.stdout + proc.stderr, command
    assert MASKED_LINE in outputs[f"logs {job}"].stdout and MASKED_LINE in outputs[f"logs {job} --follow"].stdout
    (row,) = [line for line in outputs["jobs"].stdout.splitlines() if line.startswith(job)]
    assert row.endswith(f"echo '{MASKED_LINE}'; exit 3")
    assert outputs[f"status {job}"].stdout.startswith(f"{job}  FAILED")


def test_stop_and_list(cluster, tmp_path, tiny_llama, text_file):
    # The config lives outside the working dir: the job gets it, resolved, all the same.
    config = _job_config(tmp_path, tiny_llama, text_file)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(_submit_env(cluster, text_file), RAY_API_SERVER_ADDRESS=cluster.address)
    proc = cluster.cli(["submit", str(config), "registry.model_name=tiny-stopped", "--no-wait"], cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    # `dist-prune run` as the entrypoint, the resolved config shipped under the file's name
    assert "dist-prune run dist-prune-job/tiny.yaml" in jobs.stdout


def test_submit_passes_runtime_env_and_entrypoint_resources(cluster, tmp_path, tiny_llama, text_file):
    """--runtime-env-json and --entrypoint-num-cpus/gpus reach Ray as `ray job submit` passes them:
    the job waits for a GPU this cluster lacks, its driver never starts. (Ray cannot stop it: its
    stop request goes to the supervisor actor, which is never placed; the cluster's teardown ends it.)"""
    config = _job_config(tmp_path, tiny_llama, text_file)
    proc = cluster.cli(["submit", str(config), "--no-wait", "--entrypoint-num-cpus", "0.5",
                        "--entrypoint-num-gpus", "1", "--runtime-env-json", '{"env_vars": {"DP_FLAG": "on"}}',
                        "--address", cluster.address], cwd=tmp_path, env=_submit_env(cluster, text_file))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    record = requests.get(f"{cluster.address}/api/jobs/{job_id}", headers=_headers(cluster), timeout=30).json()
    assert record["runtime_env"]["env_vars"] == {"DIST_PRUNE_DATA": str(text_file.parent), "DP_FLAG": "on"}
    assert record["status"] == "PENDING"
    # the job's supervisor actor (its driver's slot) asks for what the flags said
    actors = requests.get(f"{cluster.address}/api/v0/actors", params={"detail": "1", "limit": "10000"},
                          headers=_headers(cluster), timeout=30).json()["data"]["result"]["result"]
    (supervisor,) = [a for a in actors if a.get("name") == f"_ray_internal_job_actor_{job_id}"]
    assert supervisor["required_resources"] == {"CPU": 0.5, "GPU": 1.0}, supervisor


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


def test_address_and_auth_rules(tmp_path, monkeypatch):
    """No cluster needed: which address, which token."""
    from dist_prune.errors import UserError
    from launch import connect

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                 "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert connect.resolve_address("a:8265") == "http://a:8265"
    assert connect.resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://c:443/")
    assert connect.resolve_address(None) == "https://c:443"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the dashboard
    with pytest.raises(UserError, match="not the dashboard"):
        connect.resolve_address(None)

    assert connect.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-token\n")
    assert connect.auth_token() is None  # like Ray's client: the default file only in token mode
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert connect.auth_token() == "default-token"
    (tmp_path / "tok").write_text(" file-token \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert connect.auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert connect.auth_token() == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert connect.auth_token() is None


def test_followed_logs_are_masked_when_a_secret_comes_in_pieces(monkeypatch, capsys):
    """No cluster needed. Ray's log tail hands over what the job's log file holds so far: a line
    still being written arrives in pieces (a block-buffered stdout flushes every 8 KiB, wherever
    that falls in a line). `logs --follow` and `submit` mask a secret cut anywhere in two."""
    from launch import jobs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    text = f"start\n{SECRET_LINE}\nend\n"

    class Client:  # the part of ray.job_submission.JobSubmissionClient that follow() uses
        def __init__(self, pieces: list[str]):
            self.pieces = pieces

        def get_address(self) -> str:
            return "http://127.0.0.1:1"

        def get_job_status(self, job: str) -> str:
            return "SUCCEEDED"

        async def tail_job_logs(self, job: str):
            for piece in self.pieces:
                yield piece

    for cut in range(len(text) + 1):
        assert jobs.follow(Client([text[:cut], text[cut:]]), "job") == "SUCCEEDED"
        assert capsys.readouterr().out == f"start\n{MASKED_LINE}\nend\n", cut


def test_what_ships_with_a_job(tmp_path, monkeypatch):
    """No cluster needed: relative inputs are shipped once each and the config pointed at them,
    absolute ones left to the cluster, an unread calibration file not required; the staged
    directory mirrors the working one and keeps the job's files past its .gitignore."""
    from dist_prune.config import config_yaml, load_config
    from launch.ship import JOB_DIR, plan_shipping, stage

    work, data = tmp_path / "work", tmp_path / "data"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "code.py").write_text("x = 1\n")
    (work / ".gitignore").write_text("*.txt\n")
    model = data / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (data / "a.txt").write_text("calibration text " * 100)
    (data / "b.txt").write_text("other text")
    monkeypatch.chdir(work)
    cfg = load_config(None, ["model.path=../data/model", "data.calibration.path=../data/a.txt",
                             "eval.path=../data/a.txt", f"eval.extra_paths=[{data / 'b.txt'}]",
                             "finetune.steps=2", "finetune.data.path=../data/a.txt"], check_paths=False)
    shipped, on_cluster = plan_shipping(cfg)
    assert [(s.key, s.target) for s in shipped] == [
        ("model.path", f"{JOB_DIR}/inputs/0/model"), ("data.calibration.path", f"{JOB_DIR}/inputs/1/a.txt"),
        ("eval.path", f"{JOB_DIR}/inputs/1/a.txt"), ("finetune.data.path", f"{JOB_DIR}/inputs/1/a.txt")]
    assert on_cluster == [f"eval.extra_paths[0] {data / 'b.txt'}"]
    assert (cfg.model.path, cfg.eval.path, cfg.eval.extra_paths) == (f"{JOB_DIR}/inputs/0/model",
                                                                      f"{JOB_DIR}/inputs/1/a.txt", [str(data / "b.txt")])
    staged = stage(work, cfg, "job.yaml", shipped)
    try:
        assert sorted(p.name for p in staged.iterdir()) == sorted([".gitignore", JOB_DIR, "pkg"])
        assert (staged / "pkg").resolve() == (work / "pkg").resolve()
        assert (staged / ".gitignore").read_text() == f"*.txt\n\n!/{JOB_DIR}\n!/{JOB_DIR}/**\n"
        assert (staged / JOB_DIR / "job.yaml").read_text() == config_yaml(cfg)
        assert (staged / JOB_DIR / "inputs" / "1" / "a.txt").read_text() == (data / "a.txt").read_text()
        assert (staged / JOB_DIR / "inputs" / "0" / "model" / "config.json").is_file()
    finally:
        shutil.rmtree(staged)

    # magnitude reads no calibration text: a calibration path that does not exist is fine
    cfg = load_config(None, ["prune.method=magnitude", "data.calibration.path=missing.txt",
                             "eval.num_windows=0"], check_paths=False)
    assert plan_shipping(cfg) == ([], [])


@pytest.mark.parametrize("args, env, message", [
    (["registry.tracking_uri=http://bob:planted-uri-pw-3c9a@127.0.0.1:5000"], {},
     "registry.tracking_uri http://127.0.0.1:5000 carries a password"),
    (["registry.tracking_uri=http://bob:planted-uri-pw-3c9a@[::1:5000"], {},  # does not parse: was sent
     "registry.tracking_uri http://***@[::1:5000 carries a password"),
    ([], {"MLFLOW_TRACKING_URI": "https://bob:planted-uri-pw-3c9a@mlflow.example"},
     "environment variable MLFLOW_TRACKING_URI https://mlflow.example carries a password"),
    (["--env", "MY_API_KEY"], {"MY_API_KEY": "planted-key-8e21"},
     "--env MY_API_KEY: credentials are not sent with a job"),
    (["--runtime-env-json", '{"env_vars": {"DB_PASSWORD": "planted-db-pw-4f0c"}}'], {},
     "--runtime-env-json env_vars DB_PASSWORD: credentials are not sent with a job"),
    (["--runtime-env-json", '{"env_vars": {"URL": "s3://k:planted-s3-secret-1a2b@bucket"}}'], {},
     "--runtime-env-json env_vars URL s3://bucket carries a password"),
    (["--runtime-env-json", "{not json"], {}, "--runtime-env-json: not valid JSON"),
    (["--runtime-env-json", '{"working_dir": "/x"}'], {}, "give working_dir as --working-dir"),
    (["--entrypoint-num-cpus", "-1"], {}, "--entrypoint-num-cpus must be >= 0, got -1.0"),
    (["data.calibration.path=missing.txt"], {}, "data.calibration.path missing.txt is not a file here"),
    (["model.path=missing-model"], {}, "model.path missing-model does not exist here"),
    (["data.calibration.path=big.txt"], {}, "data.calibration.path big.txt is 65.0 MiB, too much to ship with "
                                            "the job (all local inputs together: at most 64 MiB): put it on storage"),
])
def test_submit_refusals_are_one_line_before_any_connection(args, env, message, tmp_path, monkeypatch, capsys,
                                                            tiny_llama, text_file):
    """Credentials, bad Ray options and unshippable paths: one line, exit 2, the planted value
    nowhere, and no cluster contacted (the address is one nothing listens on)."""
    from dist_prune.cli import main

    with open(tmp_path / "big.txt", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used
    config = _job_config(tmp_path, tiny_llama, text_file)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIST_PRUNE_DATA", str(text_file.parent))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["submit", str(config), *args, "--address", f"http://127.0.0.1:{_free_port()}"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and err.count("\n") == 1 and message in err, err
    assert "planted" not in err
