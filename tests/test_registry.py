"""MLflow registry round trip on a throw-away sqlite store (one store per module: MLflow's schema
migration costs several seconds): a registered version is an MLflow model (its LoggedModel, its
lineage, mlflow.pyfunc.load_model, `mlflow models serve`), every model URI form pulls it back, and
a failed registration leaves nothing behind. The registry's refusals: tests/test_registry_trust.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TEXT, make_tokenizer
from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import SPARSITY_FILE, TensorSpec
from dist_prune.registry import flatten_params, parse_model_uri, pull, register_export, set_alias
from mlflow_servers import clean_env, free_port, stop

SECRET = "hunter2-very-secret"
NAME = "tiny-llama-sparse"


def tiny_model(seed: int, vocab_size: int = 128) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor], list[str]]:
    """A tiny random Llama, a copy of its state dict and the names of its decoder linear weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                         tie_word_embeddings=False, eos_token_id=0))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, sd, [k for k in sd if ".layers." in k and k.endswith("_proj.weight")]


def tokenizer_files(root: Path) -> list[Path]:
    """The files of a small byte-level BPE tokenizer (conftest.make_tokenizer), made once per `root`."""
    directory = root / "tokenizer"
    if not directory.is_dir():
        make_tokenizer(directory, TEXT[:2000], vocab_size=260)
    return sorted(directory.iterdir())


def make_export(root: Path, seed: int, *, pruned_counts: bool = True,
                report: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny random Llama with its tokenizer, half of its decoder linear weights zeroed, exported in
    several shards; sparsity.json records the pruned counts as a job does (or not, as older
    exports), and `report`'s keys."""
    model, sd, pruned = tiny_model(seed, vocab_size=260)
    counts = {}
    for k in pruned:
        mask = sd[k].abs() <= sd[k].abs().median()
        sd[k][mask] = 0
        counts[k] = int(mask.sum())
    report = {"method": "magnitude", "structure": "unstructured", "scope": "global", "pruned_tensors": pruned,
              **({"pruned_counts": counts} if pruned_counts else {}), **(report or {})}
    return write_export(root / f"export-{seed}", model.config.to_dict(), sd, report), sd


def write_export(directory: Path, config: dict, sd: dict[str, torch.Tensor], report: dict) -> Path:
    """`sd` exported as a job exports it, in shards of 20 kB, with a tokenizer beside it."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with StreamingExport(directory, specs, 20_000) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        return ex.finish(config, tokenizer_files(directory.parent), report)


LINEAGE = {"source_model": "/models/tiny", "source_sha256": {"model.safetensors": "ab" * 32},
           "config_sha256": "cd" * 32, "dist_prune_commit": "0123abcd"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's defaults (mlflow.db, mlruns/) would land here, not in the repo
        mp.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        uri = f"sqlite:///{root}/mlflow.db"
        export_dir, sd = make_export(root, 0, report=LINEAGE)
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


def client_of(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def assert_same_weights(directory: Path, sd: dict[str, torch.Tensor]) -> None:
    lsd = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert set(lsd) == set(sd)
    for k, v in sd.items():
        assert torch.equal(lsd[k], v), k


def greedy(directory: Path, prompt: str, max_new_tokens: int) -> str:
    """What plain transformers generates from an export directory, greedily."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(prompt, return_tensors="pt")
    out = AutoModelForCausalLM.from_pretrained(directory).generate(**ids, max_new_tokens=max_new_tokens,
                                                                    do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


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
    reg = store["reg"]
    assert reg.version == 1 and reg.uri == f"models:/{NAME}/1" and reg.alias_uri == f"models:/{NAME}@candidate"
    client = client_of(store["uri"])
    run = client.get_run(reg.run_id)
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["prune.scope.kind"] == "global" and p["layers"] == "[0, 1]" and len(p["long"]) == 6000
    assert m["ppl_sparse"] == 123.4 and m["per_layer.l0"] == 0.5 and m["curve"] == 1.0
    assert m["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert t["dist_prune.version"] and t["team"] == "compression" and t["method"] == "magnitude"
    assert run.info.status == "FINISHED"
    dumped = json.dumps([p, t, {k: str(v) for k, v in m.items()}])
    assert SECRET not in dumped and "mlflow_password" not in p
    assert {a.path for a in client.list_artifacts(reg.run_id)} == {"notes.txt"}  # the model is the LoggedModel
    assert [o.model_id for o in run.outputs.model_outputs] == [reg.model_id]
    assert client.get_model_version_by_alias(NAME, "candidate").version in ("1", 1)
    assert not (Path.cwd() / "mlflow.db").exists() or Path.cwd() == store["root"]


def test_version_is_a_logged_mlflow_model_with_lineage(store):
    """The version points at the run's LoggedModel: READY, the pyfunc flavour with the export as
    its artifact, a signature, the lock's pins, and the lineage as params, tags and metrics."""
    import mlflow.artifacts
    import mlflow.models
    from mlflow.models import Model

    reg, client = store["reg"], client_of(store["uri"])
    with pytest.MonkeyPatch.context() as mp:  # get_model_info reads the global tracking URI
        mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
        assert mlflow.models.get_model_info(f"models:/{NAME}@candidate").model_id == reg.model_id
    model = client.get_logged_model(reg.model_id)
    version = client.get_model_version(NAME, "1")
    assert version.source == model.artifact_location and version.run_id == reg.run_id
    assert str(model.status) == "READY" and model.source_run_id == reg.run_id
    assert model.params["prune.sparsity"] == "0.5" and SECRET not in json.dumps(model.params)
    assert model.tags["lineage.source_model"] == "/models/tiny"
    assert json.loads(model.tags["lineage.source_sha256"]) == LINEAGE["source_sha256"]
    assert model.tags["lineage.config_sha256"] == "cd" * 32 and model.tags["lineage.dist_prune_commit"] == "0123abcd"
    assert {m.key: m.value for m in model.metrics}["ppl_sparse"] == 123.4
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/MLmodel",
                                                     dst_path=str(store["root"] / "mlmodel"),
                                                     tracking_uri=store["uri"]))
    mlmodel = Model.load(str(local))
    assert mlmodel.model_id == reg.model_id and mlmodel.signature.inputs.input_names() == ["prompt"]
    assert mlmodel.flavors["python_function"]["artifacts"]["export"]["path"] == f"artifacts/{store['export'].name}"
    requirements = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/requirements.txt", dst_path=str(store["root"] / "req"),
        tracking_uri=store["uri"])).read_text().split()
    lock = dict(line.split("==") for line in (Path(__file__).parents[1] / "requirements.lock").read_text().split()
                if "==" in line)
    assert sorted(requirements) == sorted(f"{name}=={lock[name].split('+')[0]}"
                                          for name in ("mlflow", "torch", "transformers", "tokenizers", "safetensors"))


def test_load_model_predicts_what_transformers_generates(store, tmp_path):
    import mlflow.pyfunc
    import pandas

    with pytest.MonkeyPatch.context() as mp:  # load_model reads the global tracking URI
        mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    answers = model.predict(pandas.DataFrame({"prompt": ["The quick brown", "Pruning"]}), params={"max_new_tokens": 6})
    dst = pull(f"models:/{NAME}@candidate", tmp_path / "pulled", tracking_uri=store["uri"])
    assert answers == [greedy(dst, "The quick brown", 6), greedy(dst, "Pruning", 6)]


SERVE_TIMEOUT_S = 240  # imports, a uvicorn worker and the model: 15-60 s on a loaded 2-core box


def test_mlflow_models_serve_answers_an_invocation(store, tmp_path):
    """`mlflow models serve -m models:/NAME@ALIAS --env-manager local` against the sqlite store, on
    loopback: one real HTTP /invocations request, answered as transformers generates."""
    import requests

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs uvicorn from PATH
    env = clean_env(MLFLOW_TRACKING_URI=store["uri"], PATH=f"{bin_dir}:{clean_env().get('PATH', '')}")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVE_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not serving after {SERVE_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        answer = requests.post(f"{url}/invocations", timeout=120, json={
            "dataframe_records": [{"prompt": "The quick brown"}], "params": {"max_new_tokens": 5}})
        assert answer.status_code == 200, answer.text
    finally:
        stop(proc)
    dst = pull(f"models:/{NAME}@candidate", tmp_path / "pulled", tracking_uri=store["uri"])
    assert answer.json() == {"predictions": [greedy(dst, "The quick brown", 5)]}


def test_pull_by_every_uri_form(store, tmp_path):
    """models:/NAME@ALIAS, /VERSION, /latest and the logged model's own models:/MODEL_ID."""
    forms = {"alias": f"models:/{NAME}@candidate", "version": f"models:/{NAME}/1",
             "latest": f"models:/{NAME}/latest", "id": f"models:/{store['reg'].model_id}"}
    for label, uri in forms.items():
        dst = tmp_path / label
        assert pull(uri, dst, tracking_uri=store["uri"]) == dst.absolute()
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in store["export"].iterdir())
        assert (dst / SPARSITY_FILE).read_bytes() == (store["export"] / SPARSITY_FILE).read_bytes()
    assert_same_weights(tmp_path / "alias", store["sd"])
    empty = tmp_path / "empty"
    empty.mkdir()
    pull(f"models:/{NAME}/1", empty, tracking_uri=store["uri"])
    assert (empty / SPARSITY_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_pull_errors(store, tmp_path):
    uri = store["uri"]
    for bad in ["runs:/abc/model", "NAME@alias", "models:/", "models:/a/b/c", "models:/a@"]:
        with pytest.raises(UserError, match=r"^invalid model URI .*: use models:/NAME@ALIAS, models:/NAME/VERSION, "
                                            r"models:/NAME/latest or models:/MODEL_ID$"):
            pull(bad, tmp_path / "x", tracking_uri=uri)
    with pytest.raises(UserError, match="the name '..' must not read as a relative path"):
        pull("models:/../1", tmp_path / "x", tracking_uri=uri)
    with pytest.raises(UserError, match=f"^no logged model 'm-0' at {uri} \\(models:/m-0\\)$"):
        pull("models:/m-0", tmp_path / "x", tracking_uri=uri)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    parsed = parse_model_uri("models:/a-b.c@prod_1")
    assert (parsed.name, parsed.alias, parsed.version, parsed.model_id) == ("a-b.c", "prod_1", None, None)
    assert parse_model_uri("models:/m/12").version == "12" and parse_model_uri("models:/m-9f").model_id == "m-9f"


def test_unreachable_server_is_one_line_after_mlflows_retries(tmp_path, monkeypatch):
    """MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR) are used and named."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as e:
        pull("models:/x@candidate", tmp_path / "x", tracking_uri=dead)
    assert str(e.value) == (f"cannot reach MLflow tracking server at {dead} (ConnectionError after MLflow's retries: "
                            f"MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1)")
    assert list(tmp_path.iterdir()) == []


def test_a_job_stops_in_seconds_when_nothing_answers_at_the_tracking_uri():
    """Before a job starts: a server not started is one line at once, not after the ~4 minutes of
    MLflow's default retries (7, back-off factor 2) that a job otherwise waited."""
    import time

    from dist_prune.registry import check_registry

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach MLflow tracking server at {dead} \\(Connection refused\\)"):
        check_registry(dead)
    assert time.monotonic() - started < 10


def test_unverified_export_is_not_registered(store, tmp_path):
    export_dir, _ = make_export(tmp_path, 2)
    shard = next(export_dir.glob("model-00001-*"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x7f")
    with pytest.raises(UserError, match="model-00001-of-.*corrupt"):
        register_export(export_dir, tracking_uri=store["uri"], experiment="dist-prune-test",
                        model_name="never", alias="candidate", params={}, metrics={})
    with pytest.raises(UserError, match="no registered model named 'never'"):
        pull("models:/never/1", tmp_path / "x", tracking_uri=store["uri"])


def test_failed_registration_leaves_nothing_half_made(store, tmp_path, monkeypatch):
    """The alias cannot be set (the server refuses, after the version was created): the version,
    the logged model and the run this registration opened are removed; a job's own run stays,
    FAILED, holding no model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dist_prune.registry import start_run

    def refuse(self, name, alias, version):
        raise MlflowException("the server refused the alias", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    export_dir, _ = make_export(tmp_path, 4)
    client = client_of(store["uri"])
    job_run = start_run(store["uri"], "dist-prune-test", run_name="job")
    for run_id in (None, job_run):
        with pytest.raises(UserError, match="registering model 'half' failed: the server refused the alias$"):
            register_export(export_dir, tracking_uri=store["uri"], experiment="dist-prune-test", model_name="half",
                            alias="candidate", params={"a": 1}, metrics={"ppl": 1.0}, run_id=run_id)
    assert client.search_model_versions("name = 'half'") == []
    runs = client.search_runs([client.get_experiment_by_name("dist-prune-test").experiment_id],
                              filter_string="params.a = '1'", run_view_type=3)  # ViewType.ALL
    assert sorted((r.info.run_id == job_run, r.info.lifecycle_stage, r.info.status) for r in runs) == [
        (False, "deleted", "FAILED"), (True, "active", "FAILED")]
    for run in runs:
        for output in run.outputs.model_outputs:
            with pytest.raises(MlflowException):  # deleted: no run holds a model
                client.get_logged_model(output.model_id)


def test_second_version_and_tampered_artifact(store, tmp_path):
    export_dir, sd = make_export(tmp_path, 1)
    reg = register_export(export_dir, tracking_uri=store["uri"], experiment="dist-prune-test", model_name=NAME,
                          alias="candidate", params={"method": "magnitude"}, metrics={})
    assert reg.version == 2 and reg.uri == f"models:/{NAME}/2"
    dst = pull(f"models:/{NAME}@candidate", tmp_path / "v2", tracking_uri=store["uri"])  # alias moved
    assert_same_weights(dst, sd)

    source = client_of(store["uri"]).get_model_version_download_uri(NAME, "2")
    stored = Path(source.removeprefix("file://"))
    shard = next(stored.rglob("model-00002-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="failed verification.*model-00002-of-.*corrupt"):
        pull(f"models:/{NAME}/2", tmp_path / "bad", tracking_uri=store["uri"])
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_register_cli_registers_an_existing_export_with_lineage(tmp_path):
    """`dist-prune register DIR` (what a job whose MLflow was unreachable tells the user to run)."""
    export_dir, sd = make_export(tmp_path, 3, report={"source_model": "/models/tiny",
                                                      "source_sha256": {"model.safetensors": "ab" * 32}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "dist_prune.cli", "register", str(export_dir), "--model-name", "later",
           "--alias", "rescued", "--tracking-uri", uri]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "models:/later/1" in proc.stdout and "models:/later@rescued" in proc.stdout
    client = client_of(uri)
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


def test_artifacts_go_to_registry_artifact_location(tmp_path, monkeypatch):
    """registry.artifact_location, where a new experiment keeps its artifacts (shared storage on a
    cluster): the version's files land there, nothing beside the store or in the working directory."""
    cwd, state, shared = tmp_path / "cwd", tmp_path / "state", tmp_path / "shared"
    for d in (cwd, state, shared):
        d.mkdir()
    export_dir, _ = make_export(tmp_path, 3)
    monkeypatch.chdir(cwd)
    reg = register_export(export_dir, tracking_uri=f"sqlite:///{state}/mlflow.db", experiment="located",
                          model_name="located", alias="candidate", params={}, metrics={},
                          artifact_location=shared.as_uri())
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in state.iterdir()) == ["mlflow.db"]
    assert any(shared.rglob("sparsity.json")), reg
