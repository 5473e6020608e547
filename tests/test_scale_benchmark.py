"""benchmarks/scale.py: how re-measured runs enter the results and how the bound is read."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its `from _ranks import ...`
    try:
        spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _run(method: str, workers: int, peak_mib: int) -> dict:
    return {"parameters": 3e9, "model_bytes": 6000 * MiB, "layer_bytes": 200 * MiB, "method": method,
            "workers": workers, "worker_peak_rss": [peak_mib * MiB] * workers, "driver_peak_rss": 600 * MiB,
            "model_bytes_per_worker": 6000 * MiB / workers, "seconds": {"calibrate": 10.0}, "wall_s": 20.0}


def test_a_new_measurement_replaces_the_old_in_place(scale):
    runs = [_run("wanda", 1, 7500), _run("wanda", 2, 3900)]
    scale._replace_or_add(runs, _run("wanda", 1, 7100))
    scale._replace_or_add(runs, _run("magnitude", 1, 7000))
    assert [(r["method"], r["workers"], r["worker_peak_rss"][0] // MiB) for r in runs] == [
        ("wanda", 1, 7100), ("wanda", 2, 3900), ("magnitude", 1, 7000)]


def test_bound_is_model_share_plus_layer_plus_runtime(scale):
    report = {"machine": "m", "runs": [_run("wanda", 2, 3905)],
              "runtimes": {"2": {"model_bytes": 148 * MiB, "overhead": 700 * MiB}}}
    table = scale.markdown(report)  # bound: 3000 + 200 + 700 = 3900 MiB
    assert "| 3.00B (5.86 GiB) | wanda | 2 | 3,000 MiB | 1.000 | 3,905 MiB | 3,900 MiB | 1.00 |" in table
