"""`dist-prune run --dry-run` checks what the driver checks and starts nothing; progress is one
line per stage where no terminal watches."""

from __future__ import annotations

import re

import pytest

from dist_prune.cli import main


@pytest.fixture
def quiet_dir(tmp_path, monkeypatch):
    """An empty working directory, no cluster or tracking server from the shell, and Ray
    forbidden: a dry run that started it fails the test."""
    import dist_prune.job

    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dist_prune.job, "init_ray", lambda *a, **k: pytest.fail("a dry run started Ray"))
    return tmp_path


def _small(model, text) -> list[str]:
    return [f"model.path={model}", f"data.calibration.path={text}", "data.calibration.seq_len=16",
            "data.calibration.num_samples=2", f"eval.path={text}", "eval.seq_len=16", "eval.num_windows=2"]


def test_dry_run_checks_and_prints_the_plan_and_creates_nothing(quiet_dir, tiny_llama, text_file, capsys):
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "export.dir=out"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: config, model, data, export directory and registry check out; "
                          "nothing was started. The job would run:\n")
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines()[1:])
    assert rows["model"].startswith(f"{tiny_llama} (") and rows["model"].endswith(" tensors)")
    assert rows["prune"] == "wanda, sparsity 0.5, unstructured, scope row, schedule oneshot"
    assert rows["calibration"] == f"2 windows x 16 tokens from {text_file}"
    assert rows["evaluation"] == f"2 windows x 16 tokens from {text_file}"
    assert rows["fine-tuning"] == "-"
    assert rows["workers"] == "2 x 1 CPU on a local Ray"
    assert rows["export"] == f"{quiet_dir / 'out'} (dense, shards up to 2GB)"
    assert rows["registry"] == (f"models:/dist-prune-model@candidate in experiment 'dist-prune' at "
                                f"sqlite:///{quiet_dir / 'mlflow.db'}")
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "export.dir=out", "prune.method=admm",
                 "prune.block_tuning.epochs=5"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["prune"] == ("admm, sparsity 0.5, unstructured, scope layer, schedule oneshot, each layer then "
                             "tuned 5 epochs (lr 0.003)")
    assert list(quiet_dir.iterdir()) == []  # no database, no export


@pytest.mark.parametrize("extra, message", [
    (["data.calibration.path=missing.txt"], "config: data.calibration.path missing.txt is not a file"),
    (["data.calibration.seq_len=10000000"], "calibration"),  # the text, tokenized, is too short
    (["registry.tracking_uri=sqlite:////nonexistent-dir/mlflow.db"],
     "registry: cannot create the MLflow database /nonexistent-dir/mlflow.db"),
    (["export.dir=afile"], "export target"),
])
def test_dry_run_mistakes_are_one_line(extra, message, quiet_dir, tiny_llama, text_file, capsys):
    (quiet_dir / "afile").write_text("not a directory")
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_dry_run_of_a_method_without_calibration_needs_no_calibration_file(quiet_dir, tiny_llama, text_file,
                                                                          capsys):
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "prune.method=magnitude",
                 "data.calibration.path=missing.txt"]) == 0
    assert "\ncalibration  -\n" in capsys.readouterr().out


def test_progress_off_a_terminal_is_one_line_per_stage(capsys):
    from dist_prune.report import progress, show_bars

    show_bars(False)
    try:
        bar = progress(3, "load", enabled=True)
        for _ in range(3):
            bar.update(1)
        bar.set_description("load (3 shards)")
        assert capsys.readouterr().err == ""
        bar.close()
        bar.close()
        assert re.fullmatch(r"load \(3 shards\): 3/3 in \d+\.\d s\n", capsys.readouterr().err)
        progress(3, "not rank 0", enabled=False).close()
        assert capsys.readouterr().err == ""
        show_bars(True)
        bar = progress(3, "on a terminal", enabled=True)
        assert type(bar).__module__.startswith("tqdm")
        bar.close()
    finally:
        show_bars(None)
