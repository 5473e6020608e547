"""`dist-prune run` on 2 Ray workers registering on a real `mlflow server` over HTTP, then
`dist-prune pull`, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mlflow_servers import clean_env

CLI = [sys.executable, "-m", "dist_prune.cli"]
# the drift canary's core (make test-latest): a real job, fine-tuning, export, registry, pull
pytestmark = pytest.mark.smoke


# in registry.tracking_uri (the server ignores it): it must be nowhere, test_a_password_in_the_tracking_uri_is_nowhere
TRACKING_PASSWORD = "planted-e2e-pw-8c3f"


def _cli(args: list[str], cwd: Path, uri: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    env = dict(clean_env(), MLFLOW_TRACKING_URI=uri, **env)  # the standard variable, as a user sets it
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ray_tmp():
    """The job's own RAY_TMPDIR, so that its Ray session logs can be searched (short: Ray's unix
    sockets live under it)."""
    path = Path(tempfile.mkdtemp(prefix="dpe-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def job(tiny_llama, text_file, tmp_path_factory, plain_mlflow, ray_tmp):
    cwd = tmp_path_factory.mktemp("job")
    # the config's URI wins over MLFLOW_TRACKING_URI; with a user and password in it
    with_password = plain_mlflow.url.replace("http://", f"http://e2e-user:{TRACKING_PASSWORD}@", 1)
    proc = _cli(["run", f"model.path={tiny_llama}", "prune.method=wanda", "prune.sparsity=0.5",
                 "cluster.num_workers=2", f"data.calibration.path={text_file}",
                 "data.calibration.num_samples=8", "data.calibration.seq_len=64",
                 f"eval.path={text_file}", "eval.seq_len=64", "eval.num_windows=4",
                 "registry.model_name=tiny-e2e", "export.dir=out", "export.max_shard_size=40KB",
                 # a few Sparse-NEFT steps: the masks must survive them
                 "finetune.steps=6", "finetune.log_interval=2", "finetune.eval_interval=3",
                 f"finetune.data.path={text_file}", "finetune.data.seq_len=64", "finetune.lr=1e-3",
                 f"registry.tracking_uri={with_password}", "cluster.storage_path=ray-results"], cwd,
                # RAY_memory_monitor_refresh_ms=0: Ray's monitor kills a worker when the *machine* is at
                # 95% memory, whoever holds it (on a shared test box: other work; tests/test_launch.py)
                plain_mlflow.url, RAY_TMPDIR=str(ray_tmp), RAY_memory_monitor_refresh_ms="0")
    (cwd / "job.stdout").write_text(proc.stdout)
    (cwd / "job.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()  # all went to the server
    return cwd, proc.stdout, plain_mlflow.url


def test_the_local_ray_logs_no_warnings_of_ray_trains_cluster_watchers(job):
    """Ray Train's PlacementGroupCleaner asks the State API (the dashboard's) every second
    whether the controller lives; on a local Ray started without the dashboard each question
    failed with a warning (14 of a 58-line log in a 40-s job). Its PreemptionWatcher (drained
    spot nodes; a local Ray has none) logged a core_worker.cc error line at every job's start."""
    cwd, _, _ = job
    log = (cwd / "job.stderr").read_text()
    assert "State API may be temporarily unavailable" not in log
    assert "PreemptionWatcher" not in log


def test_summary_and_exact_sparsity_in_files(job):
    cwd, stdout, _ = job
    assert "sparse perplexity" in stdout and "models:/tiny-e2e@candidate" in stdout
    out = cwd / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1  # max_shard_size honoured
    pruned = total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if ".layers." in name and t.ndim == 2:
                    # Wanda, row scope: exactly half of every row of every pruned linear
                    assert ((t == 0).sum(1) == t.shape[1] // 2).all(), name
                    pruned += int((t == 0).sum())
                    total += t.numel()
                elif "embed" in name or "norm" in name or "lm_head" in name:
                    assert (t != 0).all(), name  # excluded by default
    assert pruned * 2 == total
    manifest = json.loads((out / "sparsity.json").read_text())
    assert manifest["overall_sparsity"] == 0.5 and manifest["method"] == "wanda"
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["format"] == "dense"
    assert config["sparsity_config"]["sparsity_structure"] == "unstructured"


def test_pull_by_alias_and_version_loads(job):
    cwd, _, url = job
    for uri, dst in (("models:/tiny-e2e@candidate", "pulled-alias"), ("models:/tiny-e2e/1", "pulled-v1")):
        proc = _cli(["pull", uri, dst], cwd, url)
        assert proc.returncode == 0, proc.stderr[-2000:]
        model = AutoModelForCausalLM.from_pretrained(cwd / dst)
        exported = AutoModelForCausalLM.from_pretrained(cwd / "out")
        for (name, a), (_, b) in zip(model.named_parameters(), exported.named_parameters()):
            assert torch.equal(a, b), name
        q = model.model.layers[0].self_attn.q_proj.weight
        assert int((q == 0).sum()) == q.numel() // 2


def test_pull_missing_alias_is_one_line(job):
    cwd, _, url = job
    proc = _cli(["pull", "models:/tiny-e2e@production", "x"], cwd, url)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no alias 'production'" in proc.stderr and not (cwd / "x").exists()


def test_training_steps_are_mlflow_step_metrics(job):
    """The workers log loss, learning rate, sparsity, alpha and eval perplexity into the job's
    run while they train; the registered version comes from that same run."""
    from mlflow import MlflowClient

    _, _, url = job
    client = MlflowClient(url, url)
    run_id = client.get_model_version_by_alias("tiny-e2e", "candidate").run_id
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)]
             for key in ("train/loss", "train/lr", "train/sparsity", "train/neftune_alpha", "eval/perplexity")}
    assert steps["train/loss"] == steps["train/lr"] == steps["train/sparsity"] == [2, 4, 6]
    assert steps["train/neftune_alpha"] == [2, 4, 6]
    assert steps["eval/perplexity"] == [3, 6]
    assert {m.value for m in client.get_metric_history(run_id, "train/sparsity")} == {0.5}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perplexity_sparse"] < run.data.metrics["perplexity_pruned"]
    assert run.data.params["prune.method"] == "wanda"
    assert run.data.metrics["overall_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_lineage_of_the_registered_version(job, tiny_llama):
    """Source model path and shard sha256s, config hash, dist-prune commit, served artifacts."""
    from mlflow import MlflowClient

    cwd, _, url = job
    client = MlflowClient(url, url)
    version = client.get_model_version_by_alias("tiny-e2e", "candidate")
    model = client.get_logged_model(client.get_run(version.run_id).outputs.model_outputs[0].model_id)
    assert version.source == model.artifact_location and version.source.startswith("mlflow-artifacts:")  # uploaded
    assert model.tags == {**model.tags, **{k: v for k, v in version.tags.items() if k.startswith("lineage.")}}
    tags = version.tags
    assert tags["lineage.source_model"] == str(tiny_llama)
    shard = tiny_llama / "model.safetensors"
    assert json.loads(tags["lineage.source_sha256"]) == {shard.name: hashlib.sha256(shard.read_bytes()).hexdigest()}
    manifest = json.loads((cwd / "out" / "sparsity.json").read_text())
    assert tags["lineage.config_sha256"] == manifest["config_sha256"] and len(manifest["config_sha256"]) == 64
    head = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    assert tags.get("lineage.dist_prune_commit") == (head or None)  # None: not a git checkout


def test_a_password_in_the_tracking_uri_is_nowhere(job, plain_mlflow, ray_tmp):
    """The job's registry.tracking_uri held a user and password: the run's param shows the URI
    masked, and the password is in none of the files of the job's directory (what it printed, its
    export, Ray Train's storage), of its Ray session (every log), or of the tracking server (its
    database: params, tags, model versions; its artifact store; its log)."""
    from mlflow import MlflowClient

    cwd, _, url = job
    client = MlflowClient(url, url)
    run = client.get_run(client.get_model_version_by_alias("tiny-e2e", "candidate").run_id)
    assert run.data.params["registry.tracking_uri"] == url.replace("http://", "http://***@")
    files = [p for root in (cwd, ray_tmp, plain_mlflow.log.parent) for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"job.stderr", "sparsity.json", "mlflow.db", "MLmodel", "raylet.out"} <= names, sorted(names)
    assert any(p.name.startswith("worker-") and p.suffix == ".err" for p in files)  # the workers' output
    assert [p for p in files if TRACKING_PASSWORD.encode() in p.read_bytes()] == []
