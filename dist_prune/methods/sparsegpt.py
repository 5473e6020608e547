"""sparsegpt (Frantar & Alistarh 2023): per linear, the OBS saliency w^2 / [H^-1]_jj^2 chooses
the mask inside 128-column tiles while the remaining weights are updated to compensate (the maths:
dist_prune/sparsegpt.py). Layers are processed in order, each on the outputs of the already-pruned
layers before it; one Hessian per linear exists for one layer at a time."""

from __future__ import annotations

from dist_prune.methods.base import Method
from dist_prune.reconstruct import from_hessians
from dist_prune.sparsegpt import HessianCollector, sparsegpt_prune

TILE = 128  # columns per block of the reference implementation


def hessians(linears: dict, structure=None, geometry=None) -> HessianCollector:
    return HessianCollector(linears)


def _check(prune, structure) -> str | None:
    if prune.scope is not None:
        return f"prune.method sparsegpt chooses its masks per {TILE}-column tile: leave prune.scope empty"
    if structure.kind == "n:m" and TILE % structure.m:
        return f"prune.structure {structure}: sparsegpt needs M to divide its {TILE}-column tiles"
    return None


METHOD = Method("sparsegpt", calibration="layerwise", collector=hessians,
                reconstruct=from_hessians(sparsegpt_prune), layer_sparsities=("uniform", "owl"),
                scopes=(), structures=("unstructured", "n:m"), always_sequential=True, check=_check,
                summary="OBS reconstruction in 128-column tiles")
