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
    # the out-of-domain text the experiment configs name relative to the repository root
    (tmp_path / "benchmarks" / "data").mkdir(parents=True)
    (tmp_path / "benchmarks" / "data" / "fortunes.txt").write_text("other text\n")
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
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["prune.method=movement", "finetune.steps=7000",
                                                       "prune.interval=3", "prune.end_step=6000"])
    assert (cfg.finetune.steps, cfg.prune.interval, cfg.prune.schedule) == (7000, 3, "cubic")
    assert cfg.prune.start_step == 5400  # the method's, as the user left it
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
    ("eval.extra_paths=['/nope.txt']", "eval.extra_paths[0] /nope.txt is not a file"),
    ("eval.extra_paths=['/a/t.txt','/b/t.txt']", "eval.extra_paths names two files with the same stem (t, t)"),
    ("eval.extra_paths=['/a/my.text.txt']", "may hold only letters, digits, _ and - (got my.text)"),
    ("prune", "expected key.sub=value"),
    ("+prune.sparsity=0.3", "override '+prune.sparsity=0.3': 'prune.sparsity' already exists (the schema is "
                            "closed, '+' adds nothing): write prune.sparsity=0.3"),
    ("+prune.sparsty=0.3", "'prune.sparsty' is not a config key, and the schema is closed"),
    ("+bogus=1", "'bogus' is not a config key"),
    ("~prune.sparsty", "unknown key 'prune.sparsty' (allowed: method, sparsity,"),
    ("~prune.exclude.x", "unknown key 'prune.exclude.x'"),
    ("~prune.sparsity=0.5", "write ~prune.sparsity"),
    ("~", "expected ~key.sub"),
    ("prune.sparsity=null", "prune.sparsity cannot be null (only keys whose default is empty can); "
                            "~prune.sparsity resets it to its default"),
    ("prune.exclude=null", "prune.exclude cannot be null"),
])
def test_rejections_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(None, override.split())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_hydra_overrides_remove_reset_and_null(tmp_path):
    """`~key` takes the key out of the file (its default: the method's, else the schema's), `~section`
    a whole section, `key=null` sets None; applied in order, like Hydra's; `++key=v` is `key=v`."""
    (tmp_path / "m").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{path: {tmp_path / 'm'}}}\n"
                   "prune: {method: movement, sparsity: 0.7, interval: 5}\n"
                   "finetune: {steps: 60000}\n"
                   "data: {calibration: {num_samples: 8, seq_len: 64}}\n")
    base = load_config(job)
    assert (base.prune.sparsity, base.finetune.steps, base.data.calibration.num_samples) == (0.7, 60000, 8)

    cfg = load_config(job, ["~prune.sparsity", "~finetune.steps", "~data", "model.path=null"])
    assert cfg.prune.sparsity == 0.5                    # the schema's default
    assert cfg.finetune.steps == 54000                  # movement's own default, not the schema's 0
    assert (cfg.data.calibration.num_samples, cfg.data.calibration.seq_len) == (32, 512)
    assert cfg.model.path is None and cfg.prune.interval == 5  # what was not named stays
    assert load_config(job, ["prune.sparsity=0.3", "~prune.sparsity"]).prune.sparsity == 0.5
    assert load_config(job, ["~prune.sparsity", "prune.sparsity=0.3"]).prune.sparsity == 0.3
    reset = load_config(job, ["~prune"])  # the whole section, the method with it
    assert (reset.prune.method, reset.prune.interval, reset.finetune.steps) == ("wanda", 100, 60000)
    assert load_config(job, ["++prune.sparsity=0.2"]).prune.sparsity == 0.2
    assert load_config(None, ["~model.path", "~data.calibration.path"]).model.path is None
    assert load_config(None, ["prune.scope=layer", "prune.scope=null"]).prune.scope is None

    from dist_prune.cli import _parser, _split_config_and_overrides

    args = _parser().parse_args(["run", "~prune.scope", "prune.sparsity=0.3"])
    assert _split_config_and_overrides(args) == (None, ["~prune.scope", "prune.sparsity=0.3"])

    from dist_prune.sweep import split_axes

    assert split_axes(["~prune.scope", "prune.sparsity=0.3,0.5"]) == ({"prune.sparsity": ["0.3", "0.5"]},
                                                                      ["~prune.scope"])


@pytest.mark.parametrize("method", _methods())
def test_config_command_prints_a_job_file_that_reads_back_the_same(method, data_root, tmp_path, capsys):
    """`dist-prune config` (like Hydra's --cfg job) prints every key of the resolved config;
    that YAML, read back as a job file, is the same config (submit ships it)."""
    overrides = [f"prune.method={method}", "~data.calibration.seq_len", "eval.extra_paths=[a.txt]",
                 "export.max_shard_size=1000", "finetune.lr=3e-4"]
    assert main(["config", str(CONFIG_DIR / "quickstart.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model:\n  path: null\n") and "  method: " + method in printed
    (tmp_path / "job.yaml").write_text(printed)
    assert load_config(tmp_path / "job.yaml", check_paths=False) == \
        load_config(CONFIG_DIR / "quickstart.yaml", overrides, check_paths=False)


@pytest.mark.parametrize("uri, shown", [
    ("http://bob:Pw-9f8e7d@mlflow:5000", "http://mlflow:5000"),
    ("https://Pw-9f8e7d@mlflow/path?x=1", "https://mlflow/path?x=1"),  # a token as the user name
    ("http://bob:Pw-9f8e7d@", "http://"),  # no host: was a TypeError traceback
    ("http://bob:Pw-9f8e7d@mlflow:port", "http://mlflow:port"),  # no port number: was a ValueError traceback
    ("http://bob:Pw-9f8e7d@[::1]:5000", "http://[::1]:5000"),  # was printed as http://::1:5000
])
def test_config_command_hides_credentials(uri, shown, capsys):
    assert main(["config", f"registry.tracking_uri={uri}"]) == 0
    printed = capsys.readouterr().out
    assert "Pw-9f8e7d" not in printed and "bob" not in printed
    assert f"  tracking_uri: {shown}\n" in printed


def test_only_files_the_job_reads_must_exist():
    """magnitude needs no calibration text, no eval windows read no eval text: their paths are not
    required to exist; the same paths are refused where the job reads them."""
    load_config(None, ["prune.method=magnitude", "data.calibration.path=/nope.txt"])
    load_config(None, ["eval.num_windows=0", "eval.path=/nope.txt", "eval.extra_paths=[/nope.txt]"])
    load_config(None, ["finetune.data.path=/nope"])  # finetune.steps is 0
    with pytest.raises(UserError, match=re.escape("data.calibration.path /nope.txt is not a file")):
        load_config(None, ["prune.method=wanda", "data.calibration.path=/nope.txt"])


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
    assert ("defaults prune.schedule=cubic, prune.start_step=5400, prune.end_step=37800, finetune.steps=54000, "
            "prune.interval=100") in listed["movement"]


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
    (["prune.method=movement", "prune.schedule=oneshot"], "prune.schedule cubic"),
    (["prune.method=movement", "finetune.steps=100", "prune.start_step=10", "prune.end_step=75"],
     "prune.method movement needs prune.start_step >= 5,400 steps of warm-up (got 10): over fewer its scores "
     "pruned the largest weights"),
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
