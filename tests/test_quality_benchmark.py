"""benchmarks/quality.py: which runs a call plans, with which overrides, and how the table reads.
The runs themselves take hours on SmolLM2-135M; they are made by hand (README "Pruning quality")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality(monkeypatch_module, tmp_path_factory):
    monkeypatch_module.syspath_prepend(str(ROOT / "benchmarks"))  # its `from _ranks import ...`
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = tmp_path_factory.mktemp("wikitext-2")  # parse_args checks that the data set is there
    for name in ("valid.txt", "test.txt"):
        (data / name).write_text("text")
    monkeypatch_module.setattr(module, "DATA", data)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _run(method: str, structure: str, sparsity: float, ppl: float, seconds: float) -> dict:
    key = f"llm-compressor/{method}/{structure}/{sparsity:g}"
    return {"key": key, "targets": "llm-compressor", "method": method, "structure": structure,
            "sparsity": sparsity, "dense_evaluated": False, "first_in_call": False, "machine": "m",
            "command": "c", "metrics": {"perplexity_sparse": ppl, "sparsity": sparsity, "seconds_total": 1.0,
                                        "seconds_calibrate": seconds, "seconds_score+select+mask": 0.0}}


def test_plan_has_every_method_and_structure_once(quality):
    runs = quality.plan(quality.parse_args([]), {"runs": {}})
    keys = [r["key"] for r in runs]
    # 50% and 2:4 each; heads, channels; OWL's variants not on these targets (lm_head is one)
    owl = [m for m in quality.METHODS if quality.OWL in quality._method_overrides(m)]
    assert len(keys) == len(set(keys)) == 2 * (len(quality.METHODS) - len(owl)) + 2
    onepass = next(r for r in runs if r["key"] == "llm-compressor/wanda-1pass/unstructured/0.5")
    assert "prune.method=wanda" in onepass["overrides"]
    assert "data.calibration.sequential=false" in onepass["overrides"]
    wanda = next(r for r in runs if r["key"] == "llm-compressor/wanda/unstructured/0.5")
    assert not any("sequential" in o for o in wanda["overrides"])
    heads = next(r for r in runs if r["structure"] == "heads")
    assert "prune.method=wanda" in heads["overrides"] and "prune.sparsity=0.67" in heads["overrides"]


def test_owl_variants_run_unstructured_on_the_default_targets_only(quality):
    args = quality.parse_args(["--methods", "sparsegpt,sparsegpt-owl,admm-owl", "--structures", "unstructured,2:4",
                               "--sparsities", "0.5,0.7", "--targets", "dist-prune"])
    keys = [r["key"] for r in quality.plan(args, {"runs": {}})]
    assert keys == [f"dist-prune/{m}/unstructured/{s}" for m in ("sparsegpt", "sparsegpt-owl", "admm-owl")
                    for s in ("0.5", "0.7")] + ["dist-prune/sparsegpt/2:4/0.5"]
    owl = next(r for r in quality.plan(args, {"runs": {}}) if r["method"] == "admm-owl")
    assert {"prune.method=admm", "prune.layer_sparsity=owl"} <= set(owl["overrides"])


def test_plot_sweep_follows_the_three_best_at_half(quality):
    results = {"runs": {}}
    for i, method in enumerate(quality.METHODS):
        run = _run(method, "unstructured", 0.5, 50.0 + i, 10.0)
        results["runs"][run["key"]] = run
    runs = quality.plan(quality.parse_args(["--structures", "unstructured"]), results)
    swept = {(r["method"], r["sparsity"]) for r in runs if r["sparsity"] != 0.5}
    best = quality.METHODS[:3]
    assert swept == {(m, s) for m in best for s in quality.PLOT_SPARSITIES if s != 0.5}


def test_table_compares_like_for_like_with_llm_compressor(quality):
    results = {"protocol": {"model": quality.SMOLLM2, "calibration": quality.CALIBRATION.format(32, 512),
                            "evaluation": quality.EVALUATION.format(16, 512), "world": 2},
               "dense": {"perplexity": 29.6, "run": "x"}, "runs": {}}
    for method, ppl, seconds in (("wanda", 70.1, 116.0), ("wanda-1pass", 72.2, 58.0)):
        run = _run(method, "unstructured", 0.5, ppl, seconds)
        results["runs"][run["key"]] = run
    results["runs"]["llm-compressor/wanda/unstructured/0.5"]["metrics"]["perplexity_sparse.fortunes"] = 91.25
    table = "\n".join(quality.markdown(results))
    # the second text's column is blank for a run measured before it existed
    assert ("| wanda | unstructured | 0.5 | 0.5000 of targets | 70.10 | 91.25 | 72.21 | 0.971 | 116.0 | 58 | "
            "2.000 |") in table
    assert "| wanda-1pass | unstructured | 0.5 | 0.5000 of targets | 72.20 |  | 72.21 | 1.000 | 58.0 | 58 | 1.000 |" in table


def test_plot_has_a_panel_per_text(quality, tmp_path, capsys):
    """Both texts once the runs measured the second one; WikiText-2 alone for runs from before it."""
    results = {"protocol": {"model": "m"}, "dense": {"perplexity": 29.6, "perplexity_fortunes": 27.6}, "runs": {}}
    for sparsity, ppl in ((0.3, 33.0), (0.5, 45.0), (0.7, 140.0)):
        run = _run("sparsegpt", "unstructured", sparsity, ppl, 1.0)
        results["runs"][run["key"]] = run
    args = quality.parse_args(["--plot-methods", "sparsegpt"])
    quality.plot(results, args, tmp_path / "wikitext.png")
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {tmp_path / 'wikitext.png'} (1 panel: WikiText-2 test)"
    for run in results["runs"].values():
        run["metrics"]["perplexity_sparse.fortunes"] = 2 * run["metrics"]["perplexity_sparse"]
    quality.plot(results, args, tmp_path / "both.png")
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"plot: {tmp_path / 'both.png'} (2 panels: WikiText-2 test, fortunes (out of domain))"
    assert any("sparsegpt lacks 0.4,0.6" in line for line in out)
    from PIL import Image

    assert Image.open(tmp_path / "both.png").size[0] > 1.8 * Image.open(tmp_path / "wikitext.png").size[0]


def test_sparsity_grid_has_a_row_per_method_and_both_texts_in_each_cell(quality):
    results = {"protocol": {"model": quality.SMOLLM2, "calibration": "c", "evaluation": "e", "world": 2},
               "runs": {}}
    for method, sparsity, ppl in (("sparsegpt", 0.3, 33.0), ("sparsegpt", 0.7, 1234.5), ("wanda", 0.3, 34.0)):
        run = _run(method, "unstructured", sparsity, ppl, 1.0)
        run["metrics"]["perplexity_sparse.fortunes"] = ppl + 1
        results["runs"][run["key"]] = run
    run = _run("wanda", "2:4", 0.5, 99.0, 1.0)  # not unstructured: not in the grid
    results["runs"][run["key"]] = run
    del results["runs"]["llm-compressor/wanda/unstructured/0.3"]["metrics"]["perplexity_sparse.fortunes"]
    table = quality.markdown(results)
    start = table.index("| unstructured sparsity | 30% | 70% |")
    # rows in the registry's order (wanda before sparsegpt), a missing run blank, a missing text a dash
    assert table[start:start + 4] == ["| unstructured sparsity | 30% | 70% |", "|---|---|---|",
                                      "| wanda | 34.00 / — |  |", "| sparsegpt | 33.00 / 34.00 | 1,234.50 / 1,235.50 |"]
