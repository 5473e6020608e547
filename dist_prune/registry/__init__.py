"""The MLflow registry: register a verified export as an MLflow model, pull a registered one back.

    names.py    registered model names, aliases and model URIs, by MLflow's rules
    client.py   the connection, MLflow's errors as one line, the job's run
    lineage.py  params, tags and metrics: the config, the export's lineage, no secrets
    recount.py  every claim of sparsity.json counted again on the tensors
    pyfunc.py   the export as a pyfunc MLflow model (served.py), logged as the run's LoggedModel
    register.py nothing created until everything is checked; undone if a later step fails
    pull.py     any models:/ URI back to the export's HF directory, verified

Imports run one way: this file imports the modules, and they import each other in the order above.
"""

from dist_prune.registry.client import (StepLogger, artifacts_next_to, check_registry, end_run,
                                        resolved_tracking_uri, set_terminated, start_run)
from dist_prune.registry.lineage import flatten_params
from dist_prune.registry.names import check_alias, check_model_name, parse_model_uri
from dist_prune.registry.pull import pull
from dist_prune.registry.register import RegisteredModel, register_directory, register_export, set_alias

__all__ = ["RegisteredModel", "StepLogger", "artifacts_next_to", "check_alias", "check_model_name", "check_registry",
           "end_run", "flatten_params", "parse_model_uri", "pull", "register_directory", "register_export",
           "resolved_tracking_uri", "set_alias", "set_terminated", "start_run"]
