"""The pruning methods, one module each (its maths beside its `Method` declaration), and the one
registry the pipeline looks them up in. Adding a method: write methods/<name>.py with its score
(or reconstruction) and `METHOD = Method(...)`, add its line here, and test it (ARCHITECTURE.md)."""

from __future__ import annotations

from dist_prune.methods import infogain, magnitude, movement, obd, ria, seven, sparsegpt, taylor, threshold, wanda
from dist_prune.methods.base import LocalSlice, Method, Stats

METHODS: dict[str, Method] = {
    "magnitude": magnitude.METHOD,
    "wanda": wanda.METHOD,
    "sparsegpt": sparsegpt.METHOD,
    "taylor": taylor.METHOD,
    "obd": obd.METHOD,
    "seven": seven.METHOD,
    "threshold": threshold.METHOD,
    "infogain": infogain.METHOD,
    "movement": movement.METHOD,
    "ria": ria.METHOD,
}

__all__ = ["METHODS", "LocalSlice", "Method", "Stats"]
