"""benchmarks/_recovery.py's table (`python benchmarks/finetune.py quality`): the targets against
the dense model, and what it shows when the reference arm was not run with the same settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recovery():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its `from _ranks import ...`
    try:
        import _recovery
        yield _recovery
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _arm(before: float, after: float, before2: float, after2: float, overrides: tuple[str, ...] = (),
         sparsity: float = 0.5) -> dict:
    return {"metrics": {"perplexity_pruned": before, "perplexity_pruned.fortunes": before2,
                        "perplexity_sparse": after, "perplexity_sparse.fortunes": after2, "sparsity": sparsity,
                        "seconds_finetune": 10.0},
            "rows": [{"step": 1, "train/step_seconds": 2.0}], "export": {"zeros_in_targets": 8, "pruned": 8},
            "overrides": ["finetune.steps=4", *overrides]}


DENSE = ("prune.sparsity=0.0",)
SETTINGS = {"steps": 4, "seq_len": 8, "lr": 1e-4, "accumulation": 1, "eval_interval": 2}


def test_targets_are_judged_against_the_dense_model(recovery):
    arms = {recovery.REFERENCE: _arm(30.0, 20.0, 28.0, 30.0, DENSE, 0.0), "wanda": _arm(54.0, 24.0, 58.0, 42.0),
            "far": _arm(54.0, 26.0, 58.0, 44.0)}
    lines = recovery.table(arms, SETTINGS)
    assert "Dense model: 30.00 (WikiText-2), 28.00 (fortunes); tuned alike (the reference arm): 20.00, 30.00." in lines
    # half-gap target on fortunes: 28 + (58 - 28) / 2 = 43
    assert "| wanda | 54.00 | 24.00 | 1.200 | 1.200 | 58.00 | 42.00 | 43.00 met | yes (8 / 8) | 0.5000 | 10 | 2.00 | — |" in lines
    assert "| far | 54.00 | 26.00 | 1.300 | 1.300 | 58.00 | 44.00 | 43.00 missed | yes (8 / 8) | 0.5000 | 10 | 2.00 | — |" in lines


def test_an_arm_tuned_on_other_data_is_also_judged_against_the_dense_model_tuned_on_that_data(recovery):
    mix = ("finetune.data.generated_windows=8", "finetune.data.generated_share=0.5", "finetune.distill.beta=1.0")
    arms = {recovery.REFERENCE: _arm(30.0, 20.0, 28.0, 30.0, DENSE, 0.0),
            "dense on the mix": _arm(30.0, 22.0, 28.0, 27.0, (*DENSE, *mix), 0.0),
            "one-shot on the mix": _arm(50.0, 26.4, 48.0, 40.0, mix),
            "gradual on the mix": _arm(30.0, 27.5, 28.0, 37.0, ("prune.schedule=cubic", *mix))}
    lines = recovery.table(arms, SETTINGS)
    # 26.4 / 20 and 26.4 / 22; the dense arms are no target's
    assert "| one-shot on the mix | 50.00 | 26.40 | 1.320 | 1.200 | 48.00 | 40.00 | 38.00 missed |" in "\n".join(lines)
    assert "| dense on the mix | 30.00 | 22.00 | 1.100 | — | 28.00 | 27.00 | — |" in "\n".join(lines)
    # starting dense, the gradual arm is held to half the best one-shot start's gap: 28 + (48 - 28) / 2
    assert "| gradual on the mix | 30.00 | 27.50 | 1.375 | 1.250 | 28.00 | 37.00 | 38.00 (best one-shot) met |" \
        in "\n".join(lines)


def test_without_the_reference_arm_the_table_says_so_instead_of_nan(recovery):
    lines = recovery.table({"wanda": _arm(54.0, 24.0, 58.0, 42.0)}, SETTINGS, "recovery_lr3e-4.png")
    text = "\n".join(lines)
    assert "nan" not in text
    assert f"The reference arm ({recovery.REFERENCE}) is not measured with these settings." in lines
    assert "| wanda | 54.00 | 24.00 | — | — | 58.00 | 42.00 | — | yes (8 / 8) | 0.5000 | 10 | 2.00 | — |" in lines
    assert "--name recovery_lr3e-4`; curves: `results/recovery_lr3e-4.png`" in text


def test_a_dense_arm_other_than_the_reference_gives_the_untuned_dense_model(recovery):
    mix = ("finetune.data.generated_share=0.5", "finetune.distill.beta=1.0")
    arms = {"dense on the mix": _arm(30.0, 22.0, 28.0, 27.0, (*DENSE, *mix), 0.0),
            "gradual on the mix": _arm(30.0, 27.5, 28.0, 37.0, ("prune.schedule=cubic", *mix))}
    lines = recovery.table(arms, SETTINGS)
    assert ("Dense model: 30.00 (WikiText-2), 28.00 (fortunes); the reference arm "
            f"({recovery.REFERENCE}) is not measured with these settings.") in lines
    # 27.5 / 22 against the dense arm of the same recipe; no one-shot start, so no half-gap target
    assert "| gradual on the mix | 30.00 | 27.50 | — | 1.250 | 28.00 | 37.00 | — |" in "\n".join(lines)


def test_a_gradual_arm_alone_shows_no_nan_before_tuning(recovery):
    # measured this way (recovery_600_lr3e-4.md): a cubic arm starts dense and is not evaluated
    # before tuning, and with no dense arm beside it its start is unknown
    gradual = _arm(30.0, 21.17, 28.0, 43.06, ("prune.schedule=cubic",))
    for key in ("perplexity_pruned", "perplexity_pruned.fortunes"):
        del gradual["metrics"][key]
    lines = recovery.table({"gradual": gradual}, SETTINGS, "recovery_600_lr3e-4.png")
    assert "nan" not in "\n".join(lines)
    assert "| gradual | — | 21.17 | — | — | — | 43.06 | — | yes (8 / 8) | 0.5000 | 10 | 2.00 | — |" in lines


def test_the_table_gives_each_arm_its_median_load_where_it_was_recorded(recovery):
    loaded = {**_arm(54.0, 24.0, 58.0, 42.0), "load_average_1min_per_minute": [2.1, 3.9, 2.5, 2.7],
              "other_cpu_share_per_minute": [0.0, 0.5, 0.02]}
    load_only = {**_arm(54.0, 25.0, 58.0, 43.0), "load_average_1min_per_minute": [2.5]}
    lines = recovery.table({"loaded": loaded, "load only": load_only, "older": _arm(54.0, 26.0, 58.0, 44.0)},
                           SETTINGS)
    rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in lines if line.startswith("| ")}
    assert rows["| loaded"] == "2.60, 2% |"  # medians: (2.5 + 2.7) / 2 and 0.02
    assert rows["| load only"] == "2.50, — |"
    assert rows["| older"] == "— |"


@pytest.fixture(scope="module")
def ranks(recovery):
    import _ranks  # importable while `recovery` holds benchmarks/ on the path
    return _ranks


def test_the_load_sampler_samples_from_its_start_until_it_is_closed(ranks):
    with ranks.LoadSampler(every=0.01) as load:
        while len(load.other_cpu) < 3:
            time.sleep(0.005)
    closed = len(load.samples), len(load.other_cpu)
    time.sleep(0.05)
    assert (len(load.samples), len(load.other_cpu)) == closed  # nothing after the arm ends
    assert len(load.samples) == len(load.other_cpu) + 1  # the first sample has no interval yet
    assert all(x >= 0 for x in load.samples) and all(0 <= x <= 1 for x in load.other_cpu)


def test_a_child_processes_cpu_time_is_its_own_not_other_work(ranks):
    """The ranks are children of the benchmark, spawned and reaped per arm: their CPU time must
    count as the benchmark's, before and after they exit, or every arm would report them as
    other work."""
    before = ranks._own_ticks(os.getpid())
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.5: pass"], check=True)
    spent = ranks._own_ticks(os.getpid()) - before
    assert spent >= 0.4 * os.sysconf("SC_CLK_TCK")  # the reaped child's 0.5 s, in cutime


def test_every_arm_is_a_valid_job(recovery):
    """Each arm's overrides, on top of the shared budget, load and validate as a job config: a
    misspelt key or a combination the product refuses fails here, not an hour into a run."""
    from dist_prune.config import load_config, scope_of

    budget = recovery.base_overrides({**SETTINGS, "steps": 600})
    configs = {name: load_config(None, ["model.path=m.gguf", *budget, *overrides], check_paths=False)
               for name, overrides in recovery.ARMS.items()}
    layer = "cubic SEVENdyn 0 -> 50% per layer by step 200, alpha 5, WikiText-2 + sampled text distilled"
    assert scope_of(configs[layer].prune) == "layer"
    assert configs[layer].prune.end_step == 200
    assert scope_of(configs[layer.replace(" per layer", "")].prune) == "global"  # SEVENdyn's default
    assert configs[recovery.REFERENCE].prune.sparsity == 0.0
