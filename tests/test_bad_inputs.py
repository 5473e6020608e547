"""The bad-input and fault catalogue: every user mistake (and a disk that fills up) is one line
on stderr, exit code 2, no traceback, no export directory and nothing in the registry; a driver
killed during its export leaves nothing half-written in sight and nothing registered."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_prune.cli import main
from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import TensorSpec
from dist_prune.io.verify import verify_export
from dist_prune.job import placeable_workers

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"  # given a NaN, and an Inf, in copies of the model


@pytest.fixture(scope="module")
def inputs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text("a few words of calibration text, repeated. " * 400)
    (d / "empty.txt").write_text("\n\n")
    (d / "short.txt").write_text("too short")
    (d / "bad.yaml").write_text("prune: {sparsity: [\n")

    def variant(name: str) -> Path:
        target = d / name
        shutil.copytree(tiny_llama, target)
        return target

    truncated = variant("truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    no_config = variant("no-config")
    (no_config / "config.json").unlink()
    pickled = variant("pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    remote = variant("remote-code")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    tampered = variant("tampered-export")  # looks like a dist-prune export whose shard changed
    digest = "0" * 64
    (tampered / "sparsity.json").write_text(json.dumps(
        {"producer": "dist-prune 0.1.0", "shards": {"model.safetensors": digest}, "tensors": {}}))
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = variant(name)
        weights = load_file(bad / "model.safetensors")
        weights[BAD_TENSOR].view(-1)[-1] = value  # the last element of one tensor
        save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    foreign = d / "foreign-export"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's files")
    return {"dir": d, "model": tiny_llama, "text": d / "text.txt", "empty": d / "empty.txt",
            "short": d / "short.txt", "bad_yaml": d / "bad.yaml", "truncated": truncated,
            "no_config": no_config, "pickled": pickled, "remote": remote, "tampered": tampered,
            "foreign": foreign, "nan": d / "nan", "inf": d / "inf"}


def small(i: dict, model: Path | None = None) -> list[str]:
    return [f"model.path={model or i['model']}", f"data.calibration.path={i['text']}",
            "data.calibration.seq_len=16", "data.calibration.num_samples=2",
            f"eval.path={i['text']}", "eval.seq_len=16", "eval.num_windows=2"]


CASES = {  # name -> (argv builder, text the one-line message must contain)
    "unknown key": (lambda i: ["run", *small(i), "prune.sparsty=0.5"], "unknown key 'prune.sparsty'"),
    "wrong type": (lambda i: ["run", *small(i), "cluster.num_workers=many"], "must be int"),
    "sparsity >= 1": (lambda i: ["run", *small(i), "prune.sparsity=1"], "prune.sparsity must be in [0, 1)"),
    "sparsity < 0": (lambda i: ["run", *small(i), "prune.sparsity=-0.2"], "prune.sparsity must be in [0, 1)"),
    "n >= m": (lambda i: ["run", *small(i), "prune.structure=4:4"], "prune.structure '4:4'"),
    "block not dividing": (lambda i: ["run", *small(i), "prune.method=magnitude",
                                      "prune.structure=block:5x5"], "block:5x5"),
    "zero workers": (lambda i: ["run", *small(i), "cluster.num_workers=0"], "cluster.num_workers must be >= 1"),
    "unknown method": (lambda i: ["run", *small(i), "prune.method=lottery"], "prune.method 'lottery'"),
    "missing config file": (lambda i: ["run", str(i["dir"] / "nope.yaml")], "does not exist"),
    "bad yaml": (lambda i: ["run", str(i["bad_yaml"])], "not valid YAML"),
    "missing model path": (lambda i: ["run", *small(i, i["dir"] / "missing")], "does not exist"),
    "no config.json": (lambda i: ["run", *small(i, i["no_config"])], "no config.json"),
    "truncated shard": (lambda i: ["run", *small(i, i["truncated"])], "truncated"),
    "sha256 mismatch": (lambda i: ["run", *small(i, i["tampered"])], "model.safetensors"),
    "pickle without opt-in": (lambda i: ["run", *small(i, i["pickled"])], "model.allow_pickle=true"),
    "remote code without opt-in": (lambda i: ["run", *small(i, i["remote"])], "model.trust_remote_code=true"),
    "empty calibration text": (lambda i: ["run", *small(i), f"data.calibration.path={i['empty']}"], "is empty"),
    "too-short calibration": (lambda i: ["run", *small(i), f"data.calibration.path={i['short']}",
                                         "data.calibration.seq_len=64"], "fewer than one window"),
    "eval shorter than a window": (lambda i: ["run", *small(i), f"eval.path={i['short']}"],
                                   "fewer than eval.num_windows"),
    "export dir not ours": (lambda i: ["run", *small(i), f"export.dir={i['foreign']}"],
                            "is not a dist-prune export"),
    "unreachable MLflow": (lambda i: ["run", *small(i), "registry.tracking_uri=http://127.0.0.1:9"],
                           "cannot reach MLflow"),
    "NaN weight": (lambda i: ["run", *small(i, i["nan"])],
                   f"tensor {BAD_TENSOR} in model.safetensors contains NaN or Inf values"),
    "Inf weight": (lambda i: ["run", *small(i, i["inf"])],
                   f"tensor {BAD_TENSOR} in model.safetensors contains NaN or Inf values"),
    "pull bad uri": (lambda i: ["pull", "runs:/abc/model", "x"], "models:/NAME@ALIAS"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries take 4 minutes
    build, expected = CASES[case]
    assert main(build(inputs)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: ") and "\n" not in err, err
    assert "Traceback" not in err and expected in err, err
    assert not (tmp_path / "exports").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "x").exists()


def test_nan_scan_reads_large_tensors_in_runs_of_rows(inputs):
    """The NaN sits in the last element: found in the last run of rows, whatever the run length."""
    from dist_prune.io.checkpoint import open_checkpoint

    open_checkpoint(inputs["model"]).check_finite(max_elements=100)
    for max_elements in (1, 100, 1 << 24):
        with pytest.raises(UserError, match=f"tensor {BAD_TENSOR} in model.safetensors contains NaN"):
            open_checkpoint(inputs["nan"]).check_finite(max_elements=max_elements)


def test_unreachable_ray_address(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert main(["run", *small(inputs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dist-prune: error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9 (Connection refused)"


# -- the registry: pull of what is not there ---------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store holding version 1 of `tiny`, alias `candidate` (one schema migration
    for the module: it costs seconds)."""
    from test_registry import make_export

    from dist_prune.registry import register_export

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    export_dir, _ = make_export(root, 0)
    register_export(export_dir, tracking_uri=uri, experiment="bad-inputs", model_name="tiny",
                    alias="candidate", params={}, metrics={}, artifact_location=(root / "artifacts").as_uri())
    return {"root": root, "uri": uri}


def registry_contents(uri: str) -> tuple[list[str], int]:
    """(registered model names, number of runs in the store)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return (sorted(m.name for m in client.search_registered_models()),
            len(client.search_runs(experiments, max_results=1000)))


@pytest.mark.parametrize("uri, expected", [
    ("models:/no-such-model@candidate", "no registered model named 'no-such-model' at {store}"),
    ("models:/tiny/7", "registered model 'tiny' at {store} has no version 7"),
    ("models:/tiny@champion", "registered model 'tiny' at {store} has no alias 'champion'"),
])
def test_pull_of_what_is_not_registered(uri, expected, store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pull", uri, "x", "--tracking-uri", store["uri"]]) == 2
    assert capsys.readouterr().err.strip() == "dist-prune: error: " + expected.format(store=store["uri"])
    assert list(tmp_path.iterdir()) == []  # neither x nor a hidden download directory


# -- workers the cluster cannot place ---------------------------------------------------------------

def test_placeable_workers_counts_per_node():
    nodes = [{"CPU": 32.0}, {"CPU": 32.0, "GPU": 2.0}]
    assert placeable_workers(nodes, 64, 0, 1) == 0  # 64 CPUs in all, but no node has 64
    assert placeable_workers(nodes, 16, 0, 8) == 4
    assert placeable_workers(nodes, 4, 1, 8) == 2  # the GPUs of the second node
    assert placeable_workers(nodes, 1, 0, 3) == 3
    assert placeable_workers([], 1, 0, 1) == 0


@pytest.fixture(scope="module")
def ray_cluster():
    """A fixed-size local Ray (2 CPUs, no GPU) for the cases that need workers; the jobs connect
    to it instead of starting their own. Shut down at the end: later modules start theirs."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_TRAIN_V2_ENABLED", "1")  # as job.init_ray does, before the raylet starts
        context = ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                           log_to_driver=False, object_store_memory=128 * 1024**2)
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray.shutdown()


def job(i: dict, store: dict, *extra: str) -> list[str]:
    return ["run", *small(i), "prune.method=magnitude", "cluster.num_workers=1", "eval.num_windows=0",
            "eval.dense=false", f"registry.tracking_uri={store['uri']}", "registry.experiment=bad-inputs",
            *extra]


@pytest.mark.parametrize("overrides, expected", [
    (["cluster.num_workers=3"], "cluster.num_workers=3 workers of 1 CPU each cannot be placed"),
    (["cluster.use_gpu=true"], "cluster.num_workers=1 workers of 1 CPU and 1 GPU each cannot be placed"),
])
def test_workers_the_cluster_cannot_place(overrides, expected, ray_cluster, store, inputs, tmp_path,
                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = registry_contents(store["uri"])
    start = time.monotonic()
    assert main(job(inputs, store, *overrides)) == 2
    assert time.monotonic() - start < 60  # refused, not left waiting for resources
    assert capsys.readouterr().err.strip() == (
        f"dist-prune: error: {expected}: the Ray cluster has 1 node with 2 CPUs and 0 GPUs in all")
    assert registry_contents(store["uri"]) == before  # not even a failed run
    assert not (tmp_path / "exports").exists()


# -- disk full while exporting ----------------------------------------------------------------------

def test_disk_full_in_the_export_api_removes_the_partial_export(tmp_path, monkeypatch):
    """ENOSPC as fsync reports it (delayed allocation, network file systems)."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    specs = [TensorSpec(f"w{i}", (4, 4), torch.float32) for i in range(3)]
    export = StreamingExport(tmp_path / "out", specs, max_shard_size=64)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as raised:
        export.write("w0", torch.ones(4, 4))
    assert str(raised.value) == (f"no space left on device while writing the export to {tmp_path / 'out'}; "
                                 "free some space or choose another export.dir")
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC for the workers, which run in processes of their own."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_while_exporting(full_disk, ray_cluster, store, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = full_disk / "out"
    assert main(job(inputs, store, f"export.dir={out}", "registry.model_name=full")) == 2
    # the worker's UserError, through Ray Train, as the driver's one line
    assert capsys.readouterr().err.strip() == (
        f"dist-prune: error: no space left on device while writing the export to {out}; "
        "free some space or choose another export.dir")
    assert list(full_disk.iterdir()) == []  # neither the export nor its temporary directory
    assert "full" not in registry_contents(store["uri"])[0]


# -- the driver killed during the export ------------------------------------------------------------

def _train_workers(since: float) -> list[psutil.Process]:
    """Ray Train workers started after `since` in this module's Ray (descendants of the pytest
    process, through its raylet)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker") and p.create_time() >= since:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_driver_killed_during_export(ray_cluster, store, inputs, tmp_path, monkeypatch):
    """SIGKILL to the driver while its worker writes the export: nothing half-written becomes
    visible, nothing is registered, and the next job into the same export.dir is not hindered."""
    from transformers import AutoConfig, LlamaForCausalLM

    deep = inputs["dir"] / "deep"  # the tiny model with 16 layers: 147 tensors, one shard each
    if not deep.exists():
        shutil.copytree(inputs["model"], deep, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
        config = AutoConfig.from_pretrained(inputs["model"])
        config.num_hidden_layers = 16
        LlamaForCausalLM(config).save_pretrained(deep)
    out = tmp_path / "out"
    argv = [*job(inputs, store, f"export.dir={out}", "export.max_shard_size=1KB", "registry.model_name=killed"),
            f"model.path={deep}"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    started = time.time()
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "dist_prune.cli", *argv], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker, partial = None, []
    try:
        deadline = time.monotonic() + 300
        while not partial and not out.exists() and driver.poll() is None and time.monotonic() < deadline:
            if worker is None:  # a walk of the process tree is slow: not every few milliseconds
                worker = next(iter(_train_workers(started)), None)
                time.sleep(0.1)
                continue
            # The worker runs in slices of 10 ms and is looked at while stopped, so that it is
            # caught with some shards written, never after the export is complete.
            try:
                worker.resume()
                time.sleep(0.01)
                worker.suspend()
            except psutil.NoSuchProcess:
                worker = None
                continue
            partial = [d for d in tmp_path.glob(".out.tmp-*") if any(d.glob("*.safetensors"))]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies while its worker is mid-export
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    try:
        log_text = (tmp_path / "driver.log").read_text()
        assert partial, "the job was not caught during its export:\n" + log_text[-3000:]
        # Ray ends the job of a dead driver: its worker goes too (stopped or not), export unfinished
        _, alive = psutil.wait_procs([worker], timeout=60)
        assert not alive, "Ray left the dead driver's worker running"
    finally:
        if worker is not None and worker.is_running():
            worker.kill()
    assert not out.exists()
    # nothing but its log in the working directory: Ray Train state goes to ~/ray_results
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["driver.log"]
    assert "killed" not in registry_contents(store["uri"])[0]

    # The next job into the same export.dir ignores the hidden leftover: its driver accepts the
    # destination and its writer publishes beside it. (Its Ray part would add a run's ~10 s.)
    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    again = prepare(load_config(None, job(inputs, store, f"export.dir={out}")[1:]))
    assert Path(again.export_dir) == out
    specs = [TensorSpec("w", (2, 2), torch.float32)]
    with StreamingExport(out, specs, max_shard_size=1024) as export:
        export.write("w", torch.zeros(2, 2))
        export.finish({"model_type": "llama"}, [], {"method": "magnitude", "pruned_tensors": ["w"]})
    assert verify_export(out)["overall_sparsity"] == 1.0 and partial[0].is_dir()
