"""A Ray worker killed in the middle of fine-tuning: Ray Train restarts the worker group
(FailureConfig), the workers resume from the last checkpoint, and the job ends with the
same mask and weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dist_prune.config import load_config, to_dict
from dist_prune.data import tokenize, training_windows
from dist_prune.worker import WorkerJob, run_worker
from multirank import run_on_ranks

SEQ = 32
OVERRIDES = ["finetune.steps=60", "finetune.checkpoint_interval=10", "finetune.max_failures=1",
             "prune.schedule=cubic", "prune.method=seven", "prune.sparsity=0.5", "prune.interval=10",
             "prune.end_step=40", "finetune.lr=3e-3", "finetune.micro_batch_size=2",
             f"finetune.data.seq_len={SEQ}", "finetune.log_interval=10", "eval.num_windows=0",
             "eval.dense=false", "cluster.num_workers=2", "registry.enabled=false"]


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train workers (Ray titles them ray::RayTrainWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::RayTrainWorker"):
            pids.append(int(entry.name))
    return sorted(pids)


def _registered_checkpoints(storage: Path) -> list[str]:
    names = []
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):  # being written
            continue
        names += [r["checkpoint_dir_name"] for r in results if r.get("metrics", {}).get("step")]
    return names


def _uninterrupted(model_dir: str, text: str, out: str, train) -> None:
    cfg = load_config(None, [f"model.path={model_dir}", f"finetune.data.path={text}", *OVERRIDES])
    run_worker(WorkerJob(to_dict(cfg), model_dir, None, None, out, {}, training=train))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_killed_worker_resumes_to_the_same_mask(tiny_llama, text_file, tmp_path):
    storage = tmp_path / "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_prune.cli", "run", f"model.path={tiny_llama}",
         f"finetune.data.path={text_file}", *OVERRIDES, f"cluster.storage_path={storage}",
         "export.dir=out"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    killed = None
    deadline = time.monotonic() + 300
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            # a checkpoint counts once the Ray Train controller has registered it (it polls
            # the workers' reports and then writes its snapshot): kill mid-training after that
            if _registered_checkpoints(storage):
                pids = _train_worker_pids()
                if pids:
                    killed = pids[-1]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the job ended before a worker could be killed:\n" + output[-3000:]
    assert proc.returncode == 0, output[-4000:]
    (tmp_path / "job.log").write_text(output)
    assert "fine-tuning resumed at step" in output, output[-4000:]

    ids = tokenize(text_file.read_text(), AutoTokenizer.from_pretrained(tiny_llama))
    train = training_windows(ids, SEQ, source="t")
    run_on_ranks(_uninterrupted, 2, str(tiny_llama), str(text_file), str(tmp_path / "reference"), train)
    got, want = _weights(tmp_path / "out"), _weights(tmp_path / "reference")
    manifest = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert manifest["pruned_counts"] == json.loads(
        (tmp_path / "reference" / "sparsity.json").read_text())["pruned_counts"]
    for name in manifest["pruned_counts"]:
        assert torch.equal(got[name] == 0, want[name] == 0), f"mask of {name} differs"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
