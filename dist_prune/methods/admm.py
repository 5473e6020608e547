"""admm (Boža 2024): per linear, the mask grows over ADMM iterations that update the kept weights
towards the dense layer's outputs, then the kept weights are solved exactly on the final mask by
conjugate gradients (the maths: dist_prune/admm.py). The same Hessians and sequential calibration
as sparsegpt: layers in order, each on the outputs of the already-pruned layers before it."""

from __future__ import annotations

from dist_prune.admm import admm_prune
from dist_prune.methods.base import Method
from dist_prune.methods.sparsegpt import hessians
from dist_prune.reconstruct import from_hessians


def _check(prune, structure) -> str | None:
    if prune.scope is not None:
        return "prune.method admm chooses each tensor's mask as a whole: leave prune.scope empty"
    return None


METHOD = Method("admm", calibration="layerwise", collector=hessians, reconstruct=from_hessians(admm_prune),
                scopes=(), structures=("unstructured", "n:m"), always_sequential=True,
                layer_sparsities=("uniform", "owl"), check=_check,
                summary="ADMM reconstruction, the mask grown over 15 iterations, CG on the final mask")
