"""The bad-input catalogue: every user mistake is one line on stderr, exit code 2, no
traceback, no export directory and nothing in the registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_prune.cli import main


@pytest.fixture(scope="module")
def inputs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text("a few words of calibration text, repeated. " * 400)
    (d / "empty.txt").write_text("\n\n")
    (d / "short.txt").write_text("too short")
    (d / "bad.yaml").write_text("prune: {sparsity: [\n")

    def variant(name: str) -> Path:
        target = d / name
        shutil.copytree(tiny_llama, target)
        return target

    truncated = variant("truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    no_config = variant("no-config")
    (no_config / "config.json").unlink()
    pickled = variant("pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    remote = variant("remote-code")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    tampered = variant("tampered-export")  # looks like a dist-prune export whose shard changed
    digest = "0" * 64
    (tampered / "sparsity.json").write_text(json.dumps(
        {"producer": "dist-prune 0.1.0", "shards": {"model.safetensors": digest}, "tensors": {}}))
    foreign = d / "foreign-export"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's files")
    return {"dir": d, "model": tiny_llama, "text": d / "text.txt", "empty": d / "empty.txt",
            "short": d / "short.txt", "bad_yaml": d / "bad.yaml", "truncated": truncated,
            "no_config": no_config, "pickled": pickled, "remote": remote, "tampered": tampered,
            "foreign": foreign}


def small(i: dict, model: Path | None = None) -> list[str]:
    return [f"model.path={model or i['model']}", f"data.calibration.path={i['text']}",
            "data.calibration.seq_len=16", "data.calibration.num_samples=2",
            f"eval.path={i['text']}", "eval.seq_len=16", "eval.num_windows=2"]


CASES = {  # name -> (argv builder, text the one-line message must contain)
    "unknown key": (lambda i: ["run", *small(i), "prune.sparsty=0.5"], "unknown key 'prune.sparsty'"),
    "wrong type": (lambda i: ["run", *small(i), "cluster.num_workers=many"], "must be int"),
    "sparsity >= 1": (lambda i: ["run", *small(i), "prune.sparsity=1"], "prune.sparsity must be in [0, 1)"),
    "sparsity < 0": (lambda i: ["run", *small(i), "prune.sparsity=-0.2"], "prune.sparsity must be in [0, 1)"),
    "n >= m": (lambda i: ["run", *small(i), "prune.structure=4:4"], "prune.structure '4:4'"),
    "block not dividing": (lambda i: ["run", *small(i), "prune.method=magnitude",
                                      "prune.structure=block:5x5"], "block:5x5"),
    "zero workers": (lambda i: ["run", *small(i), "cluster.num_workers=0"], "cluster.num_workers must be >= 1"),
    "unknown method": (lambda i: ["run", *small(i), "prune.method=lottery"], "prune.method 'lottery'"),
    "missing config file": (lambda i: ["run", str(i["dir"] / "nope.yaml")], "does not exist"),
    "bad yaml": (lambda i: ["run", str(i["bad_yaml"])], "not valid YAML"),
    "missing model path": (lambda i: ["run", *small(i, i["dir"] / "missing")], "does not exist"),
    "no config.json": (lambda i: ["run", *small(i, i["no_config"])], "no config.json"),
    "truncated shard": (lambda i: ["run", *small(i, i["truncated"])], "truncated"),
    "sha256 mismatch": (lambda i: ["run", *small(i, i["tampered"])], "model.safetensors"),
    "pickle without opt-in": (lambda i: ["run", *small(i, i["pickled"])], "model.allow_pickle=true"),
    "remote code without opt-in": (lambda i: ["run", *small(i, i["remote"])], "model.trust_remote_code=true"),
    "empty calibration text": (lambda i: ["run", *small(i), f"data.calibration.path={i['empty']}"], "is empty"),
    "too-short calibration": (lambda i: ["run", *small(i), f"data.calibration.path={i['short']}",
                                         "data.calibration.seq_len=64"], "fewer than one window"),
    "eval shorter than a window": (lambda i: ["run", *small(i), f"eval.path={i['short']}"],
                                   "fewer than eval.num_windows"),
    "export dir not ours": (lambda i: ["run", *small(i), f"export.dir={i['foreign']}"],
                            "is not a dist-prune export"),
    "unreachable MLflow": (lambda i: ["run", *small(i), "registry.tracking_uri=http://127.0.0.1:9"],
                           "cannot reach MLflow"),
    "pull missing name": (lambda i: ["pull", "models:/no-such-model@candidate", "x"], "no-such-model"),
    "pull bad uri": (lambda i: ["pull", "runs:/abc/model", "x"], "models:/NAME@ALIAS"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    build, expected = CASES[case]
    assert main(build(inputs)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: ") and "\n" not in err, err
    assert "Traceback" not in err and expected in err, err
    assert not (tmp_path / "exports").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "x").exists()


def test_unreachable_ray_address(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert main(["run", *small(inputs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dist-prune: error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9 (Connection refused)"
