"""The run's own life through the real CLI (issue 21, classes 8, 9 and 11), with the Ray settings the
CLI uses (log_to_driver=True), next to a real `ray start --head` on this machine and no RAY_ADDRESS:

- the job runs on that cluster (as Ray's own ray.init() would, without the ValueError about
  num_cpus that a job sized for a local Ray met), and says so in one line;
- a UserError raised inside a worker reaches the terminal as one line, without the worker's or Ray
  Train's tracebacks around it; a bug (any other exception), in a worker or the driver, keeps its
  traceback and exits 1;
- Ctrl-C once the workers run: exit code 130, `dist-prune: interrupted`, the job's processes on the
  cluster gone (the cluster itself left running), no export or temporary directory, nothing
  registered.

The head lives in a private RAY_TMPDIR: only the processes given that variable see its address, so
other Ray users on this machine neither join it nor are disturbed by it; teardown kills its process
group and whatever runs from its directory (tests/test_launch.py: `ray stop` would end every Ray
instance of this user on the machine).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from dist_prune.errors import UserError
from dist_prune.ray_driver import TracebackGate
from test_launch import BIN, _clean_env, _free_port, _kill_cluster, _processes_of, _wait

CLI = [sys.executable, "-m", "dist_prune.cli"]
OWL_ERROR = ("prune.layer_sparsity owl spreads the sparsity over decoder layers: add lm_head.weight to "
             "prune.exclude")


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on loopback ports chosen free, 2 CPUs; yields (address, environment
    without RAY_ADDRESS in which plain ray.init() would connect to it, its directory)."""
    base = Path(tempfile.mkdtemp(prefix="dph-", dir="/tmp"))  # short: unix socket paths
    env = dict(_clean_env(), RAY_TMPDIR=str(base), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    gcs = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=false", f"--dashboard-agent-listen-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--object-store-memory=100000000",
           "--disable-usage-stats"]
    log = base / "head.log"
    with open(log, "w") as out:
        starter = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=base)
    address_file = base / "ray" / "ray_current_cluster"
    try:
        _wait("head", address_file.is_file, [starter], [log])
        yield address_file.read_text().strip(), env, base
    finally:
        _kill_cluster([starter], base)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _job(tiny_llama: Path, text_file: Path, *extra: str) -> list[str]:
    return [*CLI, "run", f"model.path={tiny_llama}", f"data.calibration.path={text_file}",
            "data.calibration.seq_len=16", "data.calibration.num_samples=2", "eval.num_windows=0",
            "eval.dense=false", "cluster.num_workers=1", "prune.method=wanda", *extra]


def test_worker_user_error_is_one_line_and_a_running_head_is_left_alone(head, tiny_llama, text_file, tmp_path):
    """One run: the head is running (class 9), and the job's mistake is found only by a worker (OWL
    spreads sparsity over decoder layers; lm_head is a target once prune.exclude is empty) (class 8)."""
    address, env, _ = head
    run = subprocess.run(_job(tiny_llama, text_file, "prune.layer_sparsity=owl", "prune.exclude=[]",
                              "registry.enabled=false", f"export.dir={tmp_path / 'out'}"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    assert (f"dist-prune: running on the Ray cluster at {address} (recorded by `ray start` in {env['RAY_TMPDIR']}"
            "/ray/ray_current_cluster) (RAY_ADDRESS=local: a Ray of this job's own)") in run.stdout.splitlines()
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"dist-prune: error: {OWL_ERROR}", output[-3000:]
    assert output.count(OWL_ERROR) == 1, output[-3000:]  # not in a worker's or the controller's report
    assert "Traceback" not in output and "UserError" not in output and "Error in training function" not in output
    assert not (tmp_path / "out").exists()
    assert (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text().strip() == address


def test_a_job_killed_by_rays_memory_monitor_is_one_line(tiny_llama, text_file, tmp_path):
    """Ray's memory monitor kills a process of the job (its threshold set below what the node
    uses, in a Ray of the job's own): Ray's 40-line OutOfMemoryError becomes one line that says
    what happened, how much memory was in use and what to change; exit 2, nothing exported."""
    env = dict(_clean_env(), RAY_ADDRESS="local", RAY_memory_usage_threshold="0.01",
               RAY_memory_monitor_refresh_ms="100")
    run = subprocess.run(_job(tiny_llama, text_file, "registry.enabled=false", f"export.dir={tmp_path / 'out'}"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"dist-prune: error: Ray's memory monitor killed a process of the job: the node ran low on "
                        r"memory \([\d.]+\s*GB of [\d.]+\s*GB in use, \d+%\); give the job more, .*RAY_memory_usage_"
                        r"threshold.*", last), output[-3000:]
    assert "Traceback" not in output and "Top 10 memory users" not in output, output[-3000:]
    assert not (tmp_path / "out").exists()


BUG = "planted bug, not a user mistake"
# The CLI with one function replaced by a bug (a RuntimeError, not a UserError). The worker's is the
# real training function whose run_worker raises once the process group is up: defined in __main__,
# cloudpickle ships it to the workers by value, so nothing but this process is patched.
PATCHED_CLI = f"""
import sys
import dist_prune.job
from dist_prune.cli import main


def bug(*args, **kwargs):
    raise RuntimeError({BUG!r})


def buggy_train_loop(payload):
    import dist_prune.worker as worker

    worker.run_worker = bug
    return worker.ray_train_loop(payload)


dist_prune.job.{{target}} = {{replacement}}
sys.exit(main(sys.argv[1:]))
"""


def _with_bug(argv: list[str], target: str, replacement: str) -> list[str]:
    assert argv[:len(CLI)] == CLI
    return [sys.executable, "-c", PATCHED_CLI.format(target=target, replacement=replacement), *argv[len(CLI):]]


@pytest.mark.parametrize("where", ["worker", "driver"])
def test_a_bug_keeps_its_traceback(where, request, tiny_llama, text_file, tmp_path):
    """Unlike a user's mistake, a bug is not cut to one line: its traceback reaches the terminal and
    the exit code is Python's 1, not 2. In a worker on the running head (its report held by the gate
    while fit() ran, then released; the driver's traceback carries the worker's frames) or in the
    driver before Ray starts (check_targets)."""
    if where == "worker":
        env, target, replacement = request.getfixturevalue("head")[1], "ray_train_loop", "buggy_train_loop"
    else:
        env, target, replacement = dict(_clean_env(), RAY_ADDRESS="local"), "check_targets", "bug"
    run = subprocess.run(_with_bug(_job(tiny_llama, text_file, "registry.enabled=false",
                                        f"export.dir={tmp_path / 'out'}"), target, replacement),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-3000:]
    assert "Traceback (most recent call last):" in run.stderr and f"RuntimeError: {BUG}" in run.stderr, output[-3000:]
    assert ('dist_prune/worker.py", line' in run.stderr) == (where == "worker"), output[-3000:]
    assert "dist-prune: error:" not in output, output[-3000:]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_once_workers_run(head, tiny_llama, text_file, tmp_path):
    """SIGINT to the CLI's process group, as a terminal's Ctrl-C sends it, once a Ray Train worker
    exists (the job would then tune for 100,000 steps)."""
    from mlflow import MlflowClient

    _, env, base = head
    store = f"sqlite:///{tmp_path}/mlflow.db"
    argv = _job(tiny_llama, text_file, "finetune.steps=100000", f"finetune.data.path={text_file}",
                "finetune.data.seq_len=16", f"registry.tracking_uri={store}", "registry.experiment=ctrl-c",
                f"export.dir={tmp_path / 'out'}")
    with open(tmp_path / "driver.log", "w") as out, open(tmp_path / "driver.err", "w") as err:
        driver = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True,
                                  preexec_fn=_as_a_shell_starts_a_foreground_job)
    job: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not any(_title(p).startswith("ray::RayTrainWorker") for p in job) and driver.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            job = [p for p in _cluster_processes(base)
                   if _title(p).startswith(("ray::RayTrainWorker", "ray::TrainController"))]
        assert driver.poll() is None and job, (tmp_path / "driver.err").read_text()[-3000:]
        # a terminal's Ctrl-C: SIGINT to the foreground process group, here the driver's session
        # (the cluster's processes are in sessions of their own)
        os.killpg(driver.pid, signal.SIGINT)
        try:
            driver.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the driver did not end within 120 s of SIGINT: "
                        + (tmp_path / "driver.err").read_text()[-3000:])
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    err = (tmp_path / "driver.err").read_text()
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "dist-prune: interrupted", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(job, timeout=60)  # Ray ends the actors of a driver that has gone
    assert alive == [], [_title(p) for p in alive]
    assert any(_title(p).split(" ")[0].endswith("gcs_server") for p in _cluster_processes(base))  # still running
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.err", "driver.log", "mlflow.db"]  # no export
    client = MlflowClient(store, store)
    assert client.search_registered_models() == []
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


def _as_a_shell_starts_a_foreground_job() -> None:
    """SIGINT at its default, as an interactive shell sets it for the job it starts in the
    foreground. The child would otherwise inherit this process's disposition, and a suite started
    in the background from a script (`make test &`, nohup, CI runners) ignores SIGINT: POSIX shells
    without job control start background commands with SIGINT and SIGQUIT ignored, and Python then
    installs no KeyboardInterrupt handler. That made this test hang in such runs (issue 21)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _title(process: psutil.Process) -> str:
    """What Ray calls the process (its command line: "ray::RayTrainWorker.run_train_fn", ...)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _cluster_processes(base: Path) -> list[psutil.Process]:
    found = []
    for pid in _processes_of(base):
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:  # gone since
            pass
    return found


# -- the gate itself: which of the workers' lines reach the terminal --------------------------------

def _batch(pid: int, *lines: str, is_err: bool = True) -> dict:
    return {"pid": pid, "is_err": is_err, "lines": list(lines)}


REPORT = [  # a worker's report of a failed training function, then the controller's, as Ray sends them
    _batch(7, "Setting up process group for: env:// [rank=0, world_size=1]"),
    _batch(7, "load: 100%", is_err=False),
    _batch(7, "Error in training function:", "Traceback (most recent call last):", '  File "worker.py"'),
    _batch(7, "dist_prune.errors.UserError: it was the user's"),
    _batch(9, "[FailurePolicy] RAISE", "ray.train.WorkerGroupError: Training failed due to worker errors:"),
    _batch(7, "progress after the report", is_err=False),
]


def test_gate_drops_a_user_errors_report_and_prints_a_bugs():
    """Ordinary lines and stdout pass at once; a report waits for the outcome: dropped for a user
    mistake (with whatever Ray forwards of it later), printed in order for a bug."""
    shown = []
    gate = TracebackGate(shown.append)
    for batch in REPORT:
        gate(batch)
    assert shown == [REPORT[0], REPORT[1], REPORT[5]]  # the reports wait
    gate.drop()
    gate(_batch(9, "late line of the controller's report"))
    # Ray's own trailing noise once the outcome is known (on a loaded machine its placement-group
    # cleaner's retries arrived after the error line, which was then no longer the last)
    gate({"pid": 7, "is_err": True, "lines": ["(PlacementGroupCleaner pid=7) Failed to query Ray Train "
                                              "Controller actor state. Continuing to monitor."]})
    gate({"pid": 8, "is_err": False, "lines": ["a worker's last stdout line"]})
    gate.release()
    assert shown == [REPORT[0], REPORT[1], REPORT[5]]

    shown.clear()
    gate = TracebackGate(shown.append)
    for batch in REPORT:
        gate(batch)
    gate.release()
    assert shown == [REPORT[0], REPORT[1], REPORT[5], REPORT[2], REPORT[3], REPORT[4]]


def _bug_raised_while_handling_a_user_error() -> BaseException:
    try:
        try:
            raise UserError("data.calibration.path: no such file")
        except UserError:
            raise AttributeError("'NoneType' object has no attribute 'shape'")  # noqa: B904 - the bug
    except AttributeError as e:
        return e


def _as_ray_train_reports(error: BaseException) -> BaseException:
    """What trainer.fit() raises on the driver when rank 0's train function raised `error`: a
    WorkerGroupError around Ray Train's UserExceptionWithTraceback, through a pickle round trip
    (which drops __context__: only the traceback text keeps the chain)."""
    import pickle
    import traceback

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    text = "".join(traceback.format_exception(error))
    failure = WorkerGroupError(f"[Rank 0]\n{text}", {0: UserExceptionWithTraceback(error, text)})
    return pickle.loads(pickle.dumps(failure))


def test_only_a_user_error_is_one_line_not_a_bug_raised_while_handling_one():
    """find_user_error looks through Ray's wrappers, not through a bug: an AttributeError raised
    in an `except UserError` block carries the UserError as its __context__ (and, from a worker,
    in its traceback text), and used to be reported as that user mistake, its traceback dropped."""
    from ray.exceptions import RayTaskError

    from dist_prune.ray_driver import find_user_error

    mistake = UserError("prune.sparsity: 1.5 is not in [0, 1]")
    bug = _bug_raised_while_handling_a_user_error()
    assert find_user_error(mistake) == "prune.sparsity: 1.5 is not in [0, 1]"
    assert find_user_error(_as_ray_train_reports(mistake)) == "prune.sparsity: 1.5 is not in [0, 1]"
    wrapped = RayTaskError("run_trial", "Traceback ...\ndist_prune.errors.UserError: x", mistake).as_instanceof_cause()
    assert find_user_error(wrapped) == "prune.sparsity: 1.5 is not in [0, 1]"
    assert isinstance(bug.__context__, UserError)
    assert find_user_error(bug) is None
    assert find_user_error(_as_ray_train_reports(bug)) is None
    assert find_user_error(RayTaskError("run_trial", "Traceback ...", bug).as_instanceof_cause()) is None
