"""A registered version is an MLflow model: a pyfunc model (served.py: text in, generated text out)
whose artifact "export" is the export directory, with a signature and the pip requirements it
needs to load and generate, logged as the LoggedModel of the job's run.

It is logged with the explicit client, step by step as `mlflow.pyfunc.log_model` does it
(create_logged_model, save_model into a temporary directory, log_model_artifacts, log_outputs,
finalize_logged_model), because log_model reads the global tracking URI and active experiment,
which dist-prune never sets (client.py). No weights are loaded: the signature is given, not
inferred, and there is no input example to run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path

SERVED = Path(__file__).with_name("served.py")
ARTIFACT = "export"  # the artifact key served.py loads (it imports nothing of dist-prune)
# What served.py imports to load a model and generate; MLflow adds mlflow itself. Their versions
# are the installed ones, which are requirements.lock's: make setup and the Dockerfile install
# exactly the lock (tests/test_registry.py checks the two agree).
NEEDS = ("torch", "transformers", "tokenizers", "safetensors")
MODEL_TYPE = "dist-prune"


def pip_requirements() -> list[str]:
    """NAME==VERSION of each package served.py needs. A local build label (torch's +cpu, +cu128)
    is dropped: it names the index a wheel came from, and any build of that version serves."""
    return [f"{name}=={importlib.metadata.version(name).split('+', 1)[0]}" for name in NEEDS]


def signature():
    """Input: a string column "prompt"; output: one string per prompt; param max_new_tokens."""
    from mlflow.models import ModelSignature  # lazy: mlflow takes about 2 s to import
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))


def log_pyfunc(client, run, export_dir: Path, *, params: dict[str, str], tags: dict[str, str]):
    """Log `export_dir` as the pyfunc LoggedModel of `run` (an mlflow Run), with `params` and
    `tags` (its lineage); return the LoggedModel, READY. On any failure it is deleted again."""
    import mlflow.pyfunc  # lazy, as in `signature`
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    run_id = run.info.run_id
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                       params=params, tags=tags, model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory(prefix="dist-prune-model-") as tmp, _quiet_save():
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local, python_model=str(SERVED), artifacts={ARTIFACT: str(export_dir)}, signature=signature(),
                pip_requirements=pip_requirements(),
                mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                                   run_id=run_id, model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.delete_logged_model(model.model_id)
        raise


@contextlib.contextmanager
def _quiet_save():
    """save_model without its "Downloading artifacts" bar (it copies a local directory) and its
    advice to add an input example (the signature is given on purpose)."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*input example", category=UserWarning)
            yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def export_path(mlmodel: Path) -> str:
    """Where the export directory lies inside a logged model, from its MLmodel file."""
    from mlflow.models import Model  # lazy, as in `signature`

    return Model.load(str(mlmodel)).flavors["python_function"]["artifacts"][ARTIFACT]["path"]
