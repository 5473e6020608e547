"""wanda: |w_ij| * ||X_j||_2 (Sun et al. 2023), weights times the norm of their input column over
all calibration tokens; compared within each output row by default, as its paper found best for
LLMs."""

from __future__ import annotations

import torch

from dist_prune.calibrate import InputNormCollector
from dist_prune.methods.base import LocalSlice, Method, Stats


def wanda(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """`stats["input_sq_sum"][j]` = sum over tokens of x_j^2."""
    column_norm = stats["input_sq_sum"].to(local.weight.device).float().sqrt()
    return local.weight.float().abs() * column_norm[local.columns()]


def input_norms(linears: dict, structure=None, geometry=None) -> InputNormCollector:
    return InputNormCollector(linears)


METHOD = Method("wanda", calibration="layerwise", collector=input_norms, score=wanda, default_scope="row",
                layer_sparsities=("uniform", "owl"), summary="|w| * ||X_j||_2")
