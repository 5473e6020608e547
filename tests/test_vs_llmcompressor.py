"""benchmarks/vs_llmcompressor.py: both sides measure the same thing. dist-prune's runs use the
overrides of quality.py's table, and the llm-compressor side's perplexity is dist-prune's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its `from _ranks import ...`, `from quality import ...`
    try:
        yield _load("vs_llmcompressor", ROOT / "benchmarks" / "vs_llmcompressor.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("case, method", [("wanda 50%", "wanda-1pass"), ("sparsegpt 50%", "sparsegpt"),
                                          ("wanda 2:4", "wanda")])
def test_our_side_runs_the_quality_tables_job(bench, monkeypatch, tmp_path, case, method):
    quality = sys.modules["quality"]
    for name in ("valid.txt", "test.txt"):  # quality.parse_args checks that the data set is there
        (tmp_path / name).write_text("text")
    monkeypatch.setattr(quality, "DATA", tmp_path)
    _, structure, methods = bench.CASES[case]
    assert method in methods
    calls = []

    def run_ranks(fn, overrides, data, world):
        calls.append((overrides, world))
        return {"seconds_calibrate": 40.0, "seconds_score+select+mask": 2.5, "perplexity_sparse": 70.0}

    monkeypatch.setattr(bench, "run_ranks", run_ranks)
    data = {"calibration": torch.zeros(32, 512, dtype=torch.long), "evaluation": torch.zeros(16, 512, dtype=torch.long)}
    assert bench.run_ours(method, structure, data, world=2) == {
        "seconds": 42.5, "perplexity": 70.0, "stages": {"calibrate": 40.0, "score+select+mask": 2.5}}
    key = f"llm-compressor/{method}/{structure}/0.5"
    planned = next(r for r in quality.plan(quality.parse_args(["--skip-plot"]), {"runs": {}}) if r["key"] == key)
    overrides, world = calls[0]
    assert world == 2 and sorted(overrides) == sorted([*planned["overrides"], "eval.dense=false"])


def test_table_reads_medians_and_ratios(bench):
    theirs = bench.summary([{"seconds": s, "perplexity": p} for s, p in ((60, 72.0), (58, 72.2), (90, 72.4))])
    mine = bench.summary([{"seconds": s, "perplexity": p} for s, p in ((87, 70.1), (80, 70.1), (81, 70.1))])
    results = {"llmcompressor_versions": {"llmcompressor": "0.14.0.1"}, "machine": "m", "repeats": 3,
               "command": "c", "cases": {"wanda 50%": {"llm-compressor": theirs, "dist-prune": {"wanda": mine}}}}
    assert "| wanda 50% | wanda | 72.20 | 70.10 | 0.971 | 60.0 | 81.0 | 1.35 |" in bench.markdown(results)


def test_llm_compressor_side_measures_our_perplexity(tiny_llama):
    from transformers import AutoModelForCausalLM

    from dist_prune.evaluate import perplexity

    runner = _load("llmcompressor_run", ROOT / "benchmarks" / "_llmcompressor_run.py")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = perplexity(model, windows)
    assert runner.perplexity(model, windows) == pytest.approx(ours, rel=1e-6)
