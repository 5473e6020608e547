"""The pruning methods, one module each (its maths beside its `Method` declaration), and the one
registry the pipeline looks them up in. Adding a method: write methods/<name>.py with its score
(or reconstruction) and `METHOD = Method(...)`, add its line here, and test it (ARCHITECTURE.md)."""

from __future__ import annotations

from dist_prune.methods import admm, infogain, magnitude, movement, obd, ria, seven, sparsegpt, taylor, threshold, wanda
from dist_prune.methods.base import LocalSlice, Method, Stats

METHODS: dict[str, Method] = {
    "magnitude": magnitude.METHOD,
    "wanda": wanda.METHOD,
    "sparsegpt": sparsegpt.METHOD,
    "admm": admm.METHOD,
    "taylor": taylor.METHOD,
    "obd": obd.METHOD,
    "seven": seven.METHOD,
    "threshold": threshold.METHOD,
    "infogain": infogain.METHOD,
    "movement": movement.METHOD,
    "ria": ria.METHOD,
}



def describe_methods() -> list[str]:
    """One line per method for `dist-prune keys`: what it scores, its default scope, what it
    needs, and the config keys it sets when a YAML file and the overrides leave them unset."""
    lines = []
    for name, m in METHODS.items():
        parts = [m.summary]
        if m.scopes:
            cubic = m.scope_for("cubic")
            parts.append(f"scope {m.default_scope}" + (f" ({cubic} while fine-tuning)" if cubic != m.default_scope
                                                       and "cubic" in m.schedules else ""))
        if m.calibration != "none":
            parts.append(f"calibration {m.calibration}")
        if m.defaults:
            parts.append("defaults " + ", ".join(f"{k}={v}" for k, v in m.defaults.items()))
        lines.append(f"{name:<11} " + "; ".join(parts))
    return lines


__all__ = ["METHODS", "LocalSlice", "Method", "Stats", "describe_methods"]
