"""Config: every shipped YAML loads; overrides are typed; mistakes are one line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_prune.cli import main
from dist_prune.config import JobConfig, describe_keys, load_config, parse_overrides
from dist_prune.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "sweeps")
SWEEPS = sorted((CONFIG_DIR / "sweeps").glob("*.yaml"))


@pytest.fixture
def data_root(monkeypatch, tmp_path):
    """Data paths in configs point at ../shared/data; make them exist wherever tests run."""
    data = tmp_path / "wikitext-2"
    data.mkdir()
    for name in ("valid.txt", "test.txt"):
        (data / name).write_text("some text\n")
    monkeypatch.setenv("DIST_PRUNE_DATA", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path, data_root):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def _methods() -> list[str]:
    from dist_prune.methods import METHODS

    return sorted(METHODS)


@pytest.mark.smoke
@pytest.mark.parametrize("method", _methods())
def test_quickstart_accepts_every_method(method, data_root):
    """`dist-prune run configs/quickstart.yaml prune.method=X` validates for every method: the
    file pins no method-specific key, and a method's own defaults fill what it leaves unset
    (sparsegpt was refused when the file pinned prune.scope row)."""
    from dist_prune.config import scope_of
    from dist_prune.methods import METHODS

    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"prune.method={method}"])
    assert cfg.prune.method == method
    for dotted, value in METHODS[method].defaults.items():
        section, *rest = dotted.split(".")
        assert getattr(getattr(cfg, section), rest[0]) == value, dotted
    assert scope_of(cfg.prune) in ("global", "layer", "row")


def test_what_the_user_sets_beats_a_method_default(data_root):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["prune.method=movement", "finetune.steps=7",
                                                       "prune.interval=3"])
    assert (cfg.finetune.steps, cfg.prune.interval, cfg.prune.schedule) == (7, 3, "cubic")
    with pytest.raises(UserError, match="prune.schedule cubic"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["prune.method=movement", "prune.schedule=oneshot"])


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_file_expands_to_valid_configs(path, data_root, monkeypatch):
    from dist_prune.sweep import configure, read_sweep_file, trials_of

    monkeypatch.chdir(data_root)
    base, grid, overrides = read_sweep_file(path)
    trials = trials_of(grid, overrides)
    assert len(trials) >= 3
    configs = [configure(base, t, "stamp") for t in trials]
    assert len({c.export.dir for c in configs}) == len(trials)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["prune.sparsity=0.6", "cluster.num_workers=1", "prune.scope=layer",
                             "prune.exclude=[a, b]", "data.calibration.sequential=false"])
    assert cfg.prune.sparsity == 0.6 and cfg.cluster.num_workers == 1
    assert cfg.prune.exclude == ["a", "b"] and cfg.data.calibration.sequential is False
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_ratio_strings_stay_strings(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("prune:\n  structure: 2:4\n  method: magnitude\n")
    assert load_config(job).prune.structure == "2:4"  # YAML 1.1 would read 124
    assert load_config(None, ["prune.structure=4:8"]).prune.structure == "4:8"
    assert load_config(None, ["cluster.num_workers=0x2"]).cluster.num_workers == 2


def test_env_expansion_with_default(monkeypatch, tmp_path):
    (tmp_path / "t.txt").write_text("x")
    monkeypatch.delenv("NOPE_DIR", raising=False)
    cfg = load_config(None, [f"eval.path=${{NOPE_DIR:-{tmp_path}}}/t.txt"])
    assert cfg.eval.path == f"{tmp_path}/t.txt"


@pytest.mark.parametrize("override, message", [
    ("prune.sparsty=0.5", "unknown key 'prune.sparsty'"),
    ("bogus.key=1", "unknown key 'bogus'"),
    ("prune.sparsity=1.0", "prune.sparsity must be in [0, 1)"),
    ("prune.sparsity=-0.1", "prune.sparsity must be in [0, 1)"),
    ("prune.sparsity=half", "prune.sparsity must be float"),
    ("cluster.num_workers=0", "cluster.num_workers must be >= 1"),
    ("cluster.num_workers=two", "cluster.num_workers must be int"),
    ("model.path=/does/not/exist", "model.path /does/not/exist does not exist"),
    ("prune.method=lottery", "prune.method 'lottery' is unknown (allowed: magnitude, wanda"),
    ("prune.scope=block", "prune.scope 'block' is unknown"),
    ("prune.structure=4:2", "prune.structure '4:2'"),
    ("prune.structure=neurons", "prune.structure 'neurons'"),
    ("prune.norm=l3", "prune.norm 'l3' is unknown"),
    ("prune.method=sparsegpt prune.scope=row", "sparsegpt chooses its masks"),
    ("prune.method=admm prune.scope=layer", "admm chooses each tensor's mask as a whole"),
    ("export.max_shard_size=lots", "lots"),
    ("export.format=zip", "export.format 'zip' is unknown (allowed: dense, sparse-bitmask, sparse-24-bitmask)"),
    ("export.format=sparse-24-bitmask", "export.format sparse-24-bitmask stores 2 of every 4 weights: "
                                        "it needs prune.structure 2:4, not unstructured"),
    ("export.format=sparse-24-bitmask prune.structure=1:4", "needs prune.structure 2:4, not 1:4"),
    ("eval.path=/nope.txt", "eval.path /nope.txt is not a file"),
    ("eval.extra_paths=['/nope.txt']", "eval.extra_paths /nope.txt is not a file"),
    ("eval.extra_paths=['/a/t.txt','/b/t.txt']", "eval.extra_paths names two files with the same stem (t, t)"),
    ("eval.extra_paths=['/a/my.text.txt']", "may hold only letters, digits, _ and - (got my.text)"),
    ("prune", "expected key.sub=value"),
])
def test_rejections_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(None, override.split())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exit_code_2_and_one_line(capsys):
    assert main(["run", "prune.sparsity=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-prune: error: config: prune.sparsity") and err.count("\n") == 1


def test_cli_subprocess_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "dist_prune.cli", "run", "cluster.num_workers=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "dist-prune: error: config: cluster.num_workers must be >= 1, got 0"


def test_every_key_is_documented():
    rows = describe_keys()
    assert {"model.path", "prune.method", "prune.sparsity", "prune.scope", "prune.structure",
            "prune.exclude", "data.calibration.path", "data.calibration.num_samples",
            "data.calibration.seq_len", "eval.path", "eval.seq_len", "eval.num_windows",
            "cluster.num_workers", "cluster.use_gpu", "registry.tracking_uri",
            "registry.model_name", "registry.alias", "export.dir",
            "export.max_shard_size"} <= {key for key, _, _ in rows}
    assert all(help for _, _, help in rows)


def test_keys_lists_every_method_with_its_own_defaults():
    """`dist-prune keys` shows each method's scope and defaults from its Method declaration: one
    place for them, not a help string kept in step by hand."""
    from dist_prune.methods import METHODS

    proc = subprocess.run([sys.executable, "-m", "dist_prune.cli", "keys"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line for line in proc.stdout.split("prune.method:\n", 1)[1].splitlines()}
    assert list(listed) == list(METHODS)
    for name, method in METHODS.items():
        assert method.summary and method.summary in listed[name]
        for key, value in method.defaults.items():
            assert f"{key}={value}" in listed[name]
    assert "defaults prune.schedule=cubic, finetune.steps=100, prune.interval=10" in listed["movement"]


def test_seed_aliases_map_to_config_keys():
    from dist_prune.cli import _parser, _split_config_and_overrides

    args = _parser().parse_args(["run", "prune.scope=layer", "--pruning_ratio", "0.3",
                                 "--pruning_method", "l2"])
    path, overrides = _split_config_and_overrides(args)
    cfg = load_config(path, overrides)
    assert (cfg.prune.sparsity, cfg.prune.method, cfg.prune.norm, cfg.prune.scope) == \
        (0.3, "magnitude", "l2", "layer")


def test_sparse_neft_aliases_map_to_config_keys():
    from dist_prune.cli import _parser, _split_config_and_overrides

    args = _parser().parse_args(["run", "finetune.steps=300", "--pruning_ratio", "0.3",
                                 "--pruning_method", "l1", "--pruning_interval", "100",
                                 "--neftune_alpha", "5", "--dynamic_alpha"])
    cfg = load_config(*_split_config_and_overrides(args))
    assert (cfg.prune.schedule, cfg.prune.interval, cfg.prune.sparsity, cfg.prune.method) == \
        ("cubic", 100, 0.3, "magnitude")
    assert (cfg.finetune.neftune.alpha, cfg.finetune.neftune.dynamic) == (5.0, True)


def test_learning_rates_in_exponent_notation_are_floats():
    cfg = load_config(None, ["finetune.steps=10", "finetune.lr=3e-4"])
    assert cfg.finetune.lr == 3e-4


@pytest.mark.parametrize("overrides, message", [
    (["prune.schedule=cubic"], "finetune.steps > 0"),
    (["prune.method=movement", "finetune.steps=10", "prune.schedule=oneshot"], "prune.schedule cubic"),
    (["prune.schedule=cubic", "finetune.steps=10", "prune.method=wanda"], "re-scores during training"),
    (["prune.schedule=cubic", "finetune.steps=10", "prune.method=magnitude", "prune.end_step=20"],
     "prune.end_step=20"),
    (["finetune.steps=10", "finetune.zero_stage=1"], "finetune.zero_stage must be one of auto, 0, 2, 3, got 1"),
    (["finetune.steps=10", "finetune.zero_stage=0", "model.dtype=bfloat16"],
     "finetune.zero_stage 0 trains the weights in their own dtype, with no fp32 master copy: it needs "
     "model.dtype float32 (this job computes in bfloat16)"),
    (["finetune.steps=10", "finetune.lr_schedule=step"], "finetune.lr_schedule 'step'"),
    (["finetune.steps=10", "finetune.max_failures=2"], "finetune.checkpoint_interval"),
    (["prune.schedule=cubic", "finetune.steps=10", "prune.method=seven", "finetune.zero_stage=2"],
     "use finetune.zero_stage 3 or 0"),
    (["finetune.steps=10", "finetune.data.path=/nonexistent"], "finetune.data.path /nonexistent"),
])
def test_finetune_rejections_name_the_key(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)
