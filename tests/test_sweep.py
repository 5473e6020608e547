"""`dist-prune sweep`: every combination as a Ray Tune trial, one MLflow parent run with a
child run per trial, the comparison table logged; mistakes caught before any trial."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_prune.errors import UserError
from dist_prune.config import load_config
from dist_prune.sweep import split_axes, trials_at_once, trials_of

CLI = [sys.executable, "-m", "dist_prune.cli"]


def test_grid_is_every_combination_in_order():
    axes, plain = split_axes(["prune.sparsity=0.3,0.5", "prune.method=wanda,magnitude",
                              "eval.num_windows=4", "prune.exclude=['*norm*','*embed*']"])
    assert plain == ["eval.num_windows=4", "prune.exclude=['*norm*','*embed*']"]
    trials = trials_of(axes, plain)
    assert [t.grid_values for t in trials] == [
        {"prune.sparsity": "0.3", "prune.method": "wanda"},
        {"prune.sparsity": "0.3", "prune.method": "magnitude"},
        {"prune.sparsity": "0.5", "prune.method": "wanda"},
        {"prune.sparsity": "0.5", "prune.method": "magnitude"}]
    assert trials[3].overrides[-2:] == ["prune.sparsity=0.5", "prune.method=magnitude"]
    with pytest.raises(UserError):
        split_axes(["prune.sparsity"])


def test_trials_run_side_by_side_only_as_many_as_the_cluster_holds():
    """Ray Tune starts every trial it may; a trial whose workers do not fit fails its worker-group
    start every 60 s until one ends (Ray 2.60), so the sweep caps them at what fits."""
    def jobs(n, *overrides):
        return [load_config(None, list(overrides)) for _ in range(n)]

    local = {"CPU": 3.0}  # a 2-core laptop: 2 + 1 for the trial drivers (job.init_ray)
    assert trials_at_once(jobs(4, "cluster.num_workers=2"), local) == 1
    assert trials_at_once(jobs(2, "cluster.num_workers=1"), local) == 2
    assert trials_at_once(jobs(3, "cluster.num_workers=1"), local) == 2  # 3 - 0.03 CPUs
    assert trials_at_once(jobs(2, "cluster.num_workers=4"), local) == 1  # oversubscribed: one at a time
    big = {"CPU": 64.0, "GPU": 8.0}
    assert trials_at_once(jobs(4, "cluster.num_workers=2", "cluster.cpus_per_worker=4"), big) == 7
    assert trials_at_once(jobs(4, "cluster.num_workers=4", "cluster.use_gpu=true"), big) == 2
    mixed = jobs(1, "cluster.num_workers=2") + jobs(1, "cluster.num_workers=8")
    assert trials_at_once(mixed, big) == 7  # sized for the largest trial (and the drivers' 0.02 CPU)


def _cli(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_bad_trial_stops_the_sweep_before_it_starts(tiny_llama, tmp_path):
    proc = _cli(["sweep", f"model.path={tiny_llama}", "prune.sparsity=0.5,1.5"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "prune.sparsity must be in [0, 1), got 1.5" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "exports").exists()


def test_a_sweep_over_job_files_is_one_axis(tmp_path):
    from dist_prune.sweep import CONFIG_AXIS, read_sweep_file

    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("prune: {method: magnitude}\n")
    (tmp_path / "design.yaml").write_text("base: [a.yaml, b.yaml]\ngrid: {prune.sparsity: [0.3, 0.5]}\n")
    base, axes, plain = read_sweep_file(tmp_path / "design.yaml")
    trials = trials_of(axes, plain)
    assert base is None and list(axes) == [CONFIG_AXIS, "prune.sparsity"]
    assert [(t.config.name, t.grid_values) for t in trials] == [
        ("a.yaml", {"config": "a", "prune.sparsity": "0.3"}), ("a.yaml", {"config": "a", "prune.sparsity": "0.5"}),
        ("b.yaml", {"config": "b", "prune.sparsity": "0.3"}), ("b.yaml", {"config": "b", "prune.sparsity": "0.5"})]
    assert trials[1].overrides == ["prune.sparsity=0.5"]  # the file is no override
    for bad, says in (("base: [a.yaml, missing.yaml]\n", "missing.yaml is not a file"),
                      ("base: []\n", "non-empty list"),
                      ("base: [a.yaml]\ngrid: {config: [b.yaml]}\n", "not grid.config")):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(UserError, match=says):
            read_sweep_file(tmp_path / "bad.yaml")


def test_sweep_runs_trials_as_child_runs(tiny_llama, text_file, tmp_path):
    """Two job files compared in one sweep (the experiment design's form); each measures a second
    text named relative to where the sweep starts (trials run in directories of their own)."""
    from mlflow import MlflowClient

    (tmp_path / "other.txt").write_text(text_file.read_text()[::-1])
    for name, sparsity in (("sparse30.yaml", 0.3), ("sparse50.yaml", 0.5)):
        (tmp_path / name).write_text(f"prune: {{sparsity: {sparsity}}}\neval: {{extra_paths: [other.txt]}}\n")
    (tmp_path / "sweep.yaml").write_text(
        "base: [sparse30.yaml, sparse50.yaml]\n"
        f"overrides: ['model.path={tiny_llama}', 'prune.method=magnitude', 'eval.path={text_file}',"
        " 'eval.seq_len=64', 'eval.num_windows=2', 'eval.dense=false', 'registry.model_name=tiny-sweep',"
        " 'cluster.num_workers=1']\n")  # 1 worker each: the two trials run side by side
    proc = _cli(["sweep", "sweep.yaml", "registry.experiment=sweeps"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| trial0 | sparse30 |" in proc.stdout and "| trial1 | sparse50 |" in proc.stdout
    assert "perplexity_sparse | perplexity_sparse.other |" in proc.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.metrics["sparsity"] for c in children) == pytest.approx([0.3, 0.5], abs=1e-3)
    assert all(c.info.status == "FINISHED" for c in [*children, parent])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.md", "sweep.png"}
    for trial, sparsity in (("trial0", 0.3), ("trial1", 0.5)):
        version = client.get_model_version_by_alias("tiny-sweep", f"candidate-{trial}")
        assert client.get_run(version.run_id).data.metrics["sparsity"] == pytest.approx(sparsity, abs=1e-3)
