"""Against real `mlflow server` processes on loopback (sqlite backend, artifacts served by the
server; tests/mlflow_servers.py): basic-auth credentials come from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, an unreachable server fails in one line and keeps the export, two
registrations racing for one model name get distinct, intact versions, and a sweep trial's run
records its parent. These tests register pre-built exports; the end-to-end job
(tests/test_end_to_end.py) registers on the same plain server over HTTP."""

from __future__ import annotations

import filecmp
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow_servers import ADMIN, PASSWORD, Server, clean_env, free_port
from test_registry import make_export

CLI = [sys.executable, "-m", "dist_prune.cli"]
WRONG = "Wr0ng-pa55word-q9"


@pytest.fixture(scope="module")
def plain(plain_mlflow) -> Server:
    return plain_mlflow


@pytest.fixture(scope="module")
def secured(secured_mlflow) -> Server:
    return secured_mlflow


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, env=clean_env(**env),
                          timeout=600, check=False)


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(url, url)


def _same_files(a: Path, b: Path) -> bool:
    """Same file names, byte for byte the same contents."""
    names = sorted(p.name for p in a.iterdir())
    _, differ, unreadable = filecmp.cmpfiles(a, b, names, shallow=False)
    return names == sorted(p.name for p in b.iterdir()) and differ == unreadable == []


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dist-prune: error: "), proc.stderr[-3000:]
    return lines[0]


def test_parent_run_is_recorded(plain, tmp_path):
    """A sweep trial's version points at the sweep's run (MLflow's mlflow.parentRunId)."""
    from dist_prune.registry import register_export, start_run

    parent = start_run(plain.url, "remote-sweep", run_name="sweep")
    child = start_run(plain.url, "remote-sweep", parent_run_id=parent)
    export_dir, _ = make_export(tmp_path, 5)
    reg = register_export(export_dir, tracking_uri=plain.url, experiment="remote-sweep", model_name="trial",
                          alias="candidate", params={"prune": {"sparsity": 0.5}}, metrics={"ppl": 12.5},
                          run_id=child)
    run = _client(plain.url).get_run(reg.run_id)
    assert reg.run_id == child and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["ppl"] == 12.5 and run.data.params["prune.sparsity"] == "0.5"


def test_mlflows_links_to_the_run_hold_no_password(plain, tmp_path, capfd):
    """Ending a run on an HTTP server, MLflow writes links to it on stdout ("View run NAME at: URL"),
    built from the tracking URI as given: with a user:password@ in it, they are printed masked."""
    from dist_prune.registry import end_run, register_export, start_run

    password = "planted-link-pw-5a0e"
    uri = plain.url.replace("http://", f"http://bob:{password}@", 1)
    export_dir, _ = make_export(tmp_path, 6)
    register_export(export_dir, tracking_uri=uri, experiment="links", model_name="linked", alias="candidate",
                    params={"registry": {"tracking_uri": uri}}, metrics={})
    end_run(uri, start_run(uri, "links", run_name="failed"), "FAILED")  # a job that failed
    out, err = capfd.readouterr()
    assert password not in out + err
    assert out.count(f" at: {plain.url}/#/experiments/") == 4, out  # run and experiment, of 2 runs


# -- basic auth -----------------------------------------------------------------------------------

def test_basic_auth_credentials(secured, tmp_path, monkeypatch, capsys):
    from dist_prune.errors import UserError
    from dist_prune.registry import pull, register_directory

    export_dir, _ = make_export(tmp_path, 6)
    before = _snapshot(export_dir)
    proc = _cli(["register", str(export_dir), "--model-name", "secured", "--tracking-uri", secured.url],
                tmp_path, MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=WRONG)
    line = _one_error_line(proc)
    assert line == (f"dist-prune: error: MLflow at {secured.url} rejected the credentials of "
                    f"MLFLOW_TRACKING_USERNAME={ADMIN} (HTTP 401): check MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD")
    assert WRONG not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(export_dir) == before

    with pytest.raises(UserError, match=r"rejected the request \(HTTP 401, no credentials given\)"):
        register_directory(export_dir, tracking_uri=secured.url, experiment="dist-prune",
                           model_name="secured", alias="candidate")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = _client(secured.url)
    assert client.search_registered_models() == []  # the failed attempts registered nothing
    reg = register_directory(export_dir, tracking_uri=secured.url, experiment="dist-prune",
                             model_name="secured", alias="candidate")
    assert reg.version == 1
    dst = pull("models:/secured@candidate", tmp_path / "pulled", tracking_uri=secured.url)
    assert _same_files(export_dir, dst)
    run = client.get_run(reg.run_id)
    version = client.get_model_version("secured", "1")
    logged = json.dumps([run.data.params, run.data.tags, version.tags])
    assert PASSWORD not in logged and "MLFLOW_TRACKING_PASSWORD" not in logged

    # a user the server knows, without EDIT on the admin's experiment: 403, named as such
    requests.post(f"{secured.url}/api/2.0/mlflow/users/create", auth=(ADMIN, PASSWORD), timeout=60,
                  json={"username": "reader", "password": "Reader-pa55word-1"}).raise_for_status()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Reader-pa55word-1")
    with pytest.raises(UserError) as denied:
        register_directory(export_dir, tracking_uri=secured.url, experiment="dist-prune",
                           model_name="secured", alias="candidate")
    assert str(denied.value).startswith(f"MLflow at {secured.url} denied MLFLOW_TRACKING_USERNAME=reader permission "
                                        f"for experiment 'dist-prune' (HTTP 403)")
    assert len(_client(secured.url).search_model_versions("name='secured'")) == 1
    assert PASSWORD not in "".join(capsys.readouterr())


# -- unreachable server ---------------------------------------------------------------------------

def test_unreachable_server_fails_in_one_line_and_keeps_export(plain, tmp_path, monkeypatch, capsys):
    """A job's final registration when nothing answers: retries, one clear line, the export kept,
    and the `dist-prune register DIR` it suggests works once the server is back. (The CLI prints
    a UserError as that one line: test_basic_auth_credentials runs it in a subprocess.)"""
    from dist_prune import cli, registry
    from dist_prune.config import load_config
    from dist_prune.errors import UserError
    from dist_prune.job import _keep_export_on_failure

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's own retries, 0 s then 2 s apart
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    export_dir, _ = make_export(tmp_path, 7)
    before = _snapshot(export_dir)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(None, ["registry.model_name=rescued", f"registry.tracking_uri={dead}"], check_paths=False)
    started = time.monotonic()
    with pytest.raises(UserError) as failure, _keep_export_on_failure(export_dir, cfg):
        registry.register_export(export_dir, tracking_uri=dead, experiment="dist-prune", model_name="rescued",
                                 alias="candidate", params={}, metrics={})
    assert time.monotonic() - started >= 2  # it waited out MLflow's back-off
    assert str(failure.value) == (f"cannot reach MLflow tracking server at {dead} (ConnectionError after MLflow's "
                                  f"retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1); "
                                  f"the verified export is kept at {export_dir}: register it later with "
                                  f"`dist-prune register {export_dir} --model-name rescued`")
    assert _snapshot(export_dir) == before

    assert cli.main(["register", str(export_dir), "--model-name", "rescued", "--tracking-uri", plain.url]) == 0
    assert "registered models:/rescued/1 (models:/rescued@candidate)" in capsys.readouterr().out
    dst = registry.pull("models:/rescued@candidate", tmp_path / "pulled", tracking_uri=plain.url)
    assert _same_files(export_dir, dst)


# -- concurrency ----------------------------------------------------------------------------------

# `dist-prune register DIR` in a process that, once imported, waits for a "go" file, so that two of
# them hit the server within milliseconds of each other
RACER = """
import sys, time
from pathlib import Path
from dist_prune.registry import check_registry, register_directory
export_dir, url, ready, go = sys.argv[1:]
check_registry(url)  # imports and first connection done: after "go" only the registration is left
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
print(register_directory(Path(export_dir), tracking_uri=url, experiment="raced", model_name="raced",
                         alias="candidate").version)
"""


def test_concurrent_registrations_get_distinct_versions(plain, tmp_path):
    from dist_prune.registry import pull

    exports = [make_export(tmp_path, seed)[0] for seed in (10, 11)]
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    # a new experiment and a new model name: both processes race to create each of them
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(e), plain.url, str(r), str(go)], cwd=tmp_path,
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e, r in zip(exports, ready)]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    versions = [int(out.split()[-1]) for out, _ in outs]
    assert sorted(versions) == [1, 2]
    for version, export_dir in zip(versions, exports):
        dst = pull(f"models:/raced/{version}", tmp_path / f"pulled-{version}", tracking_uri=plain.url)
        assert _same_files(export_dir, dst)
    assert int(_client(plain.url).get_model_version_by_alias("raced", "candidate").version) in versions
