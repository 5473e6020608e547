"""`dist-prune pull URI DIR`: a registered model's export, verified, in its Hugging Face layout.

Every MLflow model URI works: models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest (and
the deprecated models:/NAME/STAGE), and a logged model's own models:/MODEL_ID; MLflow parses them
(names.py). A registered version is an MLflow model (pyfunc.py): only the export directory inside
it is downloaded, the artifact its MLmodel file names; a version registered before dist-prune made
MLflow models holds the export itself.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from pathlib import Path

from dist_prune.errors import UserError
from dist_prune.io.destination import check_new_directory
from dist_prune.io.decompress import decompress_export
from dist_prune.io.formats import format_of
from dist_prune.io.verify import verify_export
from dist_prune.redact import redact_uri
from dist_prune.registry.client import connect, is_code, mlflow_errors
from dist_prune.registry.names import parse_model_uri
from dist_prune.registry.pyfunc import export_path

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _model_source(client, model_uri: str, where: str) -> str:
    """The artifact URI of the MLflow model `model_uri` names; UserError if there is none, or it is
    not READY."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version  # lazy: about 2 s

    parsed = parse_model_uri(model_uri)
    if parsed.model_id is not None:
        try:
            logged = client.get_logged_model(parsed.model_id)
        except Exception as e:
            if is_code(e, *_NOT_FOUND):
                raise UserError(f"no logged model {parsed.model_id!r} at {where} ({model_uri})") from None
            raise
        if str(logged.status) != "READY":
            raise UserError(f"{model_uri} is {logged.status}, not READY")
        return logged.artifact_location
    try:
        client.get_registered_model(parsed.name)
    except Exception as e:
        if is_code(e, *_NOT_FOUND):
            raise UserError(f"no registered model named {parsed.name!r} at {where}") from None
        raise
    try:
        mv = client.get_model_version(parsed.name, get_model_name_and_version(client, model_uri.strip())[1])
    except Exception as e:
        if is_code(e, *_NOT_FOUND) or "No versions of model" in str(e):
            what = (f"alias {parsed.alias!r}" if parsed.alias is not None else f"version {parsed.version}"
                    if parsed.version is not None else f"stage {parsed.stage!r}" if parsed.stage else "version")
            raise UserError(f"registered model {parsed.name!r} at {where} has no {what}") from None
        raise
    if mv.status != "READY":
        raise UserError(f"{model_uri} (version {mv.version}) is {mv.status}, not READY")
    return client.get_model_version_download_uri(parsed.name, str(mv.version))


def _download_export(source: str, into: Path, tracking_uri: str) -> Path:
    """The export directory of the MLflow model at `source`, downloaded into `into`."""
    import mlflow.artifacts  # lazy, as above

    names = {posixpath.basename(f.path) for f in mlflow.artifacts.list_artifacts(artifact_uri=source,
                                                                                  tracking_uri=tracking_uri)}
    if "MLmodel" in names:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/MLmodel",
                                                      dst_path=str(into / "mlmodel"), tracking_uri=tracking_uri)
        source = f"{source.rstrip('/')}/{export_path(Path(mlmodel))}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into / "export"),
                                                    tracking_uri=tracking_uri))


def pull(model_uri: str, dst: Path, *, tracking_uri: str | None = None, keep_compressed: bool = False) -> Path:
    """Download a registered dist-prune export into `dst` (must not exist or be empty), verified.
    An export in a format no loader reads (export.format sparse-*) is decompressed into the dense
    HF layout, unless `keep_compressed`."""
    parse_model_uri(model_uri)  # a malformed URI fails before anything is touched
    dst = check_new_directory(dst, empty_dir_ok=True)
    client, uri, _ = connect(tracking_uri)
    with mlflow_errors(uri, f"resolving {model_uri}"):
        source = _model_source(client, model_uri, redact_uri(uri))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.pull-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        with mlflow_errors(uri, f"downloading {model_uri} from {redact_uri(source)}"):
            local = _download_export(source, tmp, uri)
        if not local.is_dir():
            raise UserError(f"{model_uri} does not point at a directory of artifacts")
        try:
            meta = verify_export(local)
        except UserError as e:
            raise UserError(f"{model_uri} failed verification after download: {e}") from None
        if not (keep_compressed or format_of(meta).loadable):
            local = decompress_export(local, tmp / "dense", meta)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.rename(local, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
