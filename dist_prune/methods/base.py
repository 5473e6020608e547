"""What a pruning method is: one object that declares what it needs and what it supports, beside
the pure maths of its own module. The pipeline (pruning.py, config validation, job.prepare, the
training loop) asks these fields and never tests a method's name.

A method decides through exactly one of:
- `score(slice, stats)`: one score per local element (higher = keep), then the exact distributed
  selection of dist_prune/selection.py picks the pruned set;
- `reconstruct(targets, stats, sparsity, structure, counts=)`: chooses masks while it updates the
  kept weights, layer by layer (SparseGPT, ADMM); `counts` (OWL) gives each tensor's pruned count;
- `mask_rule(slice, prune_cfg)`: an absolute rule on each element, no selection (threshold);
- `group_loss`: whole heads / channels / layers ranked by the loss their ablation costs (infogain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from dist_prune.local import LocalSlice, Stats  # noqa: F401  (what a method's score reads)

SCOPES = ("global", "layer", "row")
ELEMENT_STRUCTURES = ("unstructured", "n:m", "block")  # Structure.kind of dist_prune/structures.py
GROUP_STRUCTURES = ("heads", "channels", "layers")     # dist_prune/structural.py
CALIBRATIONS = ("none", "layerwise", "gradients", "training")




@dataclass(frozen=True)
class Method:
    name: str
    # How its statistics come: "none" (the weights alone), "layerwise" (forward hooks of
    # `collector` while calibration windows pass one decoder layer at a time), "gradients"
    # (backward passes over calibration batches, dist_prune/gradients.py), "training" (the
    # fine-tuning steps themselves, with prune.schedule cubic).
    calibration: str = "none"
    # layerwise: (linears by weight name, structure, geometry) -> an InputCollector
    collector: Callable[..., Any] | None = None
    # gradients / training: per-element statistics accumulated in the slice's layout
    stats: tuple[str, ...] = ()
    # what the fine-tuning steps accumulate instead while re-scoring (prune.schedule cubic), where
    # `stats` are per-token statistics only the calibration pass's hooks produce; () = `stats`
    training_stats: tuple[str, ...] = ()
    score: Callable[[LocalSlice, Stats], torch.Tensor] | None = None
    # collective, before scoring a selection call's targets: statistics derived from the weights
    # themselves across every rank's slice (RIA's full-row and full-column sums, all-reduced)
    weight_stats: Callable[[list, dict[str, torch.Tensor]], dict[str, dict]] | None = None
    reconstruct: Callable[..., dict[str, torch.Tensor]] | None = None
    mask_rule: Callable[[LocalSlice, Any], torch.Tensor] | None = None
    group_loss: bool = False  # ranks whole groups by measured loss per unit of weight norm
    default_scope: str = "layer"
    training_scope: str | None = None  # the default while fine-tuning (prune.schedule cubic); None = default_scope
    scopes: tuple[str, ...] = SCOPES  # () = it chooses its own groups: prune.scope stays empty
    structures: tuple[str, ...] = ELEMENT_STRUCTURES + GROUP_STRUCTURES
    schedules: tuple[str, ...] = ("oneshot",)  # "cubic": re-scored while fine-tuning
    layer_sparsities: tuple[str, ...] = ("uniform",)
    always_sequential: bool = False  # layer by layer whatever data.calibration.sequential says
    # config keys ("section.key") set otherwise than the job defaults; each applies when neither the
    # YAML file nor an override names it, so `prune.method=X` on any config gives X's own defaults
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # further checks of the prune section: (prune config, parsed structure) -> error or None
    check: Callable[[Any, Any], str | None] | None = None
    summary: str = ""  # one line for `dist-prune keys`

    @property
    def needs_calibration_data(self) -> bool:
        return self.calibration in ("layerwise", "gradients")

    def stats_for(self, schedule: str) -> tuple[str, ...]:
        """The per-element statistics its score reads under prune.schedule `schedule`."""
        return (self.training_stats or self.stats) if schedule == "cubic" else self.stats

    def scope_for(self, schedule: str) -> str:
        return (self.training_scope or self.default_scope) if schedule == "cubic" else self.default_scope

    @property
    def reads_gradient_partitions(self) -> bool:
        """Its statistics while fine-tuning come from each rank's gradient partition (ZeRO stage 3 only)."""
        return bool(self.stats_for("cubic"))
