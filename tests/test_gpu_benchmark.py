"""benchmarks/gpu.py: its CPU path (what a machine without CUDA can check) and its pure helpers.
The GPU measurements themselves run by hand on a CUDA machine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
SKIP_LINE = ("CUDA is not available: skipped (a) selection on the GPU, (b) Wanda 50% on the 7B-shaped "
             "checkpoint, (c) 2:4 sparse matmul")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs only without CUDA")


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@no_cuda
def test_cpu_path_checks_what_it_can_and_names_what_it_skipped():
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-n", "100000"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("(a) selection of N = 100,000 on the CPU: exact")
    assert lines[1].startswith("(b) checkpoint for --params 7e9 (not written): 7.00B parameters, 38 layers, "
                               "hidden 4096, intermediate 11008, 14.0 GB in bfloat16")
    assert lines[2].startswith("(c) 2:4 mask of a 64x128 weight from nm_mask: pattern ok")
    assert lines[3:] == [SKIP_LINE]


@no_cuda
def test_require_cuda_fails_without_it(gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--cpu-n", "1000", "--require-cuda"])
    monkeypatch.setattr(gpu, "RESULTS", tmp_path)
    assert gpu.main() == 1
    assert capsys.readouterr().out.splitlines()[-1] == SKIP_LINE
    assert not list(tmp_path.iterdir())  # no results without a GPU


def test_selection_size_follows_free_memory(gpu):
    assert gpu.select_size(80 * 2**30) == 1_000_000_000
    assert gpu.select_size(10 * 10**9) == 1_000_000_000  # 10 bytes per score
    assert gpu.select_size(10 * 10**9 - 1) == 500_000_000
    assert gpu.select_size(2 * 2**30) == 500_000_000  # nothing fits: the smallest, and let it fail loudly


def test_two_four_mask_prunes_the_two_smallest_of_every_four(gpu):
    weight = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -9.0, 8.0],
                           [0.0, 0.0, 0.0, 1.0, -1.0, 2.0, -3.0, 4.0]])
    mask = gpu.two_four_mask(weight)
    assert mask.tolist() == [[True, False, False, True, True, True, False, False],
                             [True, True, False, False, True, True, False, False]]  # ties: lower column
    assert gpu.nm_pattern_ok(weight, mask)
    assert not gpu.nm_pattern_ok(weight, ~mask)  # right counts, but the largest pruned
    three = mask.clone()
    three[0, 1] = True
    assert not gpu.nm_pattern_ok(weight, three)  # 3 of 4 pruned
    assert not gpu.nm_pattern_ok(weight[:, :6], mask[:, :6])  # rows not made of whole groups
    big = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    assert gpu.nm_pattern_ok(big, gpu.two_four_mask(big))


def test_seven_billion_checkpoint_shape(gpu):
    facts = gpu.checkpoint_facts(7e9)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 11008 + 2 * 4096  # q o, k v (8 kv heads), mlp, norms
    assert facts["parameters"] == 2 * 32000 * 4096 + 38 * per_layer + 4096  # embeddings, head, layers, final norm
    assert facts["bytes"] == 2 * facts["parameters"]
    assert (facts["layers"], facts["hidden"], facts["intermediate"]) == (38, 4096, 11008)


def test_selection_measurement_is_exact_and_timed(gpu):
    result = gpu.measure_selection(10_001, torch.device("cpu"), repeats=3)
    assert result["exact"] and result["k"] == 5001  # floor(0.5 * 10001 + 0.5)
    assert len(result["sum_times_s"]) == len(result["select_times_s"]) == 3
    assert result["sum_gb_per_s"] == pytest.approx(4 * 10_001 / result["sum_s"] / 1e9)
    assert result["of_bandwidth"] == pytest.approx(result["sum_s"] / result["select_s"])
    assert result["peak_gpu_bytes"] is None


def test_timed_warms_up_once(gpu):
    calls = []
    times = gpu.timed(lambda: calls.append(1), 4, torch.device("cpu"))
    assert len(calls) == 5 and len(times) == 4 and all(t >= 0 for t in times)
