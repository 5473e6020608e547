"""MLflow registry round trip on a throw-away sqlite store (one store per module: MLflow's schema
migration costs several seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import SPARSITY_FILE, TensorSpec
from dist_prune.registry import flatten_params, parse_model_uri, pull, register_export, set_alias

SECRET = "hunter2-very-secret"
NAME = "tiny-llama-sparse"


def tiny_model(seed: int) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor], list[str]]:
    """A tiny random Llama, a copy of its state dict and the names of its decoder linear weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         tie_word_embeddings=False))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, sd, [k for k in sd if ".layers." in k and k.endswith("_proj.weight")]


def make_export(root: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny random Llama, half of its decoder linear weights zeroed, exported in several shards."""
    model, sd, pruned = tiny_model(seed)
    for k in pruned:
        sd[k][sd[k].abs() <= sd[k].abs().median()] = 0
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with StreamingExport(root / f"export-{seed}", specs, 20_000) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        out = ex.finish(model.config.to_dict(), [], {"method": "magnitude", "structure": "unstructured",
                                                     "scope": "global", "pruned_tensors": pruned})
    return out, sd


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's defaults (mlflow.db, mlruns/) would land here, not in the repo
        mp.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        uri = f"sqlite:///{root}/mlflow.db"
        export_dir, sd = make_export(root, 0)
        notes = root / "notes.txt"
        notes.write_text("calibration notes")
        reg = register_export(
            export_dir, tracking_uri=uri, experiment="dist-prune-test", model_name=NAME, alias="candidate",
            params={"method": "wanda", "prune": {"sparsity": 0.5, "scope": {"kind": "global"}},
                    "layers": [0, 1], "long": "x" * 7000, "mlflow_password": SECRET, "echo": f"pw={SECRET}"},
            metrics={"ppl_sparse": 123.4, "per_layer": {"l0": 0.5}, "curve": [3.0, 2.0, 1.0]},
            artifacts=[notes], tags={"team": "compression"},
            artifact_location=(root / "artifacts").as_uri())
        yield {"root": root, "uri": uri, "reg": reg, "sd": sd, "export": export_dir}


def assert_same_weights(directory: Path, sd: dict[str, torch.Tensor]) -> None:
    lsd = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert set(lsd) == set(sd)
    for k, v in sd.items():
        assert torch.equal(lsd[k], v), k


def test_flatten_params(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456")
    flat = flatten_params({"a": {"b": {"c": 1}}, "l": [1, "x"], "n": None, "s": "y" * 7000,
                           "api_key": "k", "db": {"password": "p"}, "url": "https://u:tok-123456@h",
                           "bad key[0]": 2, "db_uri": "postgresql://me:pw1@db/x", "calib": {"max_tokens": 5, "pad_token": 0, "hf_token": "t"}})
    assert flat["a.b.c"] == "1" and flat["l"] == '[1, "x"]' and flat["n"] == "None"
    assert len(flat["s"]) == 6000 and flat["s"].endswith("...")
    assert "api_key" not in flat and "db.password" not in flat
    assert "tok-123456" not in flat["url"]
    assert flat["bad key_0_"] == "2" and flat["db_uri"] == "postgresql://***@db/x"
    assert flat["calib.max_tokens"] == "5" and flat["calib.pad_token"] == "0" and "calib.hf_token" not in flat


def test_register_logs_run(store):
    from mlflow import MlflowClient

    reg = store["reg"]
    assert reg.version == 1 and reg.uri == f"models:/{NAME}/1" and reg.alias_uri == f"models:/{NAME}@candidate"
    client = MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])
    run = client.get_run(reg.run_id)
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["prune.scope.kind"] == "global" and p["layers"] == "[0, 1]" and len(p["long"]) == 6000
    assert m["ppl_sparse"] == 123.4 and m["per_layer.l0"] == 0.5 and m["curve"] == 1.0
    assert m["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert t["dist_prune.version"] and t["team"] == "compression" and t["method"] == "magnitude"
    assert run.info.status == "FINISHED"
    dumped = json.dumps([p, t, {k: str(v) for k, v in m.items()}])
    assert SECRET not in dumped and "mlflow_password" not in p
    names = {a.path for a in client.list_artifacts(reg.run_id)}
    assert {"model", "notes.txt"} <= names
    assert {a.path for a in client.list_artifacts(reg.run_id, "model")} >= {"model/config.json", f"model/{SPARSITY_FILE}"}
    assert client.get_model_version_by_alias(NAME, "candidate").version in ("1", 1)
    assert not (Path.cwd() / "mlflow.db").exists() or Path.cwd() == store["root"]


def test_pull_by_alias_and_version(store, tmp_path):
    for uri in (f"models:/{NAME}@candidate", f"models:/{NAME}/1"):
        dst = tmp_path / uri.replace("/", "_").replace(":", "_").replace("@", "_")
        assert pull(uri, dst, tracking_uri=store["uri"]) == dst.absolute()
        assert_same_weights(dst, store["sd"])
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in store["export"].iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    pull(f"models:/{NAME}/1", empty, tracking_uri=store["uri"])
    assert (empty / SPARSITY_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []  # no temp left


def test_pull_errors(store, tmp_path):
    uri = store["uri"]
    for bad in ["models:/x", "runs:/abc/model", "models:/a@b/c", f"models:/{NAME}/latest", "NAME@alias"]:
        with pytest.raises(UserError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
            pull(bad, tmp_path / "x", tracking_uri=uri)
    with pytest.raises(UserError, match="no registered model named 'nope'"):
        pull("models:/nope@candidate", tmp_path / "x", tracking_uri=uri)
    with pytest.raises(UserError, match="no alias 'prod'"):
        pull(f"models:/{NAME}@prod", tmp_path / "x", tracking_uri=uri)
    with pytest.raises(UserError, match="no version 99"):
        pull(f"models:/{NAME}/99", tmp_path / "x", tracking_uri=uri)
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        pull(f"models:/{NAME}/1", full, tracking_uri=uri)
    with pytest.raises(UserError, match="127.0.0.1:9"):
        pull(f"models:/{NAME}/1", tmp_path / "x", tracking_uri="http://127.0.0.1:9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert parse_model_uri("models:/a-b.c@prod_1") == ("a-b.c", "prod_1", None)
    assert parse_model_uri("models:/m/12") == ("m", None, 12)


def test_unverified_export_is_not_registered(store, tmp_path):
    export_dir, _ = make_export(tmp_path, 2)
    shard = next(export_dir.glob("model-00001-*"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x7f")
    with pytest.raises(UserError, match="model-00001-of-.*corrupt"):
        register_export(export_dir, tracking_uri=store["uri"], experiment="dist-prune-test",
                        model_name="never", alias="candidate", params={}, metrics={})
    with pytest.raises(UserError, match="no registered model named 'never'"):
        pull("models:/never/1", tmp_path / "x", tracking_uri=store["uri"])


def test_second_version_and_tampered_artifact(store, tmp_path):
    export_dir, sd = make_export(tmp_path, 1)
    reg = register_export(export_dir, tracking_uri=store["uri"], experiment="dist-prune-test", model_name=NAME,
                          alias="candidate", params={"method": "magnitude"}, metrics={})
    assert reg.version == 2 and reg.uri == f"models:/{NAME}/2"
    dst = pull(f"models:/{NAME}@candidate", tmp_path / "v2", tracking_uri=store["uri"])  # alias moved
    assert_same_weights(dst, sd)

    from mlflow import MlflowClient

    source = MlflowClient(tracking_uri=store["uri"]).get_model_version_download_uri(NAME, "2")
    stored = Path(source.removeprefix("file://"))
    shard = next(stored.glob("model-00002-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="failed verification.*model-00002-of-.*corrupt"):
        pull(f"models:/{NAME}/2", tmp_path / "bad", tracking_uri=store["uri"])
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_register_cli_registers_an_existing_export_with_lineage(tmp_path):
    """`dist-prune register DIR` (what a job whose MLflow was unreachable tells the user to run)."""
    import json
    import subprocess
    import sys

    from mlflow import MlflowClient

    export_dir, sd = make_export(tmp_path, 3)
    manifest = json.loads((export_dir / "sparsity.json").read_text())
    manifest.update(source_model="/models/tiny", source_sha256={"model.safetensors": "ab" * 32})
    (export_dir / "sparsity.json").write_text(json.dumps(manifest))  # the manifest's own hash is not in it
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "dist_prune.cli", "register", str(export_dir), "--model-name", "later",
           "--alias", "rescued", "--tracking-uri", uri]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "models:/later/1" in proc.stdout and "models:/later@rescued" in proc.stdout
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("later", "rescued")
    assert version.tags["lineage.source_model"] == "/models/tiny"
    assert json.loads(version.tags["lineage.source_sha256"]) == {"model.safetensors": "ab" * 32}
    pulled = pull("models:/later@rescued", tmp_path / "pulled", tracking_uri=uri)
    assert_same_weights(pulled, sd)
    (export_dir / "sparsity.json").unlink()  # no manifest: nothing verified, nothing registered
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(client.search_model_versions("name='later'")) == 1


class _RacedClient:
    """Fails its first `failures` alias settings with `error`, as MLflow's SQL store does when
    another job inserted the same new alias a moment earlier; then records the setting."""

    def __init__(self, failures: int, error: str):
        self.failures, self.error, self.aliases, self.calls = failures, error, {}, 0

    def set_registered_model_alias(self, name, alias, version):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.failures:
            raise MlflowException(self.error, error_code="BAD_REQUEST")
        self.aliases[(name, alias)] = version


SQLITE_RACE = ("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace, "
               "registered_model_aliases.name, registered_model_aliases.alias")


def test_alias_set_concurrently_is_set_again():
    client = _RacedClient(1, SQLITE_RACE)
    set_alias(client, "m", "candidate", "2")
    assert client.calls == 2 and client.aliases == {("m", "candidate"): "2"}


def test_alias_errors_other_than_the_race_are_not_retried():
    from mlflow.exceptions import MlflowException

    client = _RacedClient(1, "Registered Model with name=m not found")
    with pytest.raises(MlflowException, match="not found"):
        set_alias(client, "m", "candidate", "2")
    assert client.calls == 1
    client = _RacedClient(5, SQLITE_RACE)  # a race that never ends is reported, not retried forever
    with pytest.raises(MlflowException, match="UNIQUE constraint"):
        set_alias(client, "m", "candidate", "2")
    assert client.calls == 3


def test_artifacts_go_beside_the_sqlite_store_not_the_working_directory(tmp_path, monkeypatch):
    """MLflow puts a new experiment's artifacts in ./mlruns of whatever directory the job ran
    from, even when the database lies elsewhere: a run from a repository left mlruns/ there."""
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "state"
    cwd.mkdir(), elsewhere.mkdir()
    export_dir, _ = make_export(tmp_path, 3)
    monkeypatch.chdir(cwd)
    reg = register_export(export_dir, tracking_uri=f"sqlite:///{elsewhere}/mlflow.db", experiment="beside",
                          model_name="beside", alias="candidate", params={}, metrics={})
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mlflow.db", "mlruns"]
    assert any((elsewhere / "mlruns").rglob("sparsity.json")), reg
