"""Stage 3-5, score -> select -> mask: which weights of every target go, agreed exactly by all ranks.

`prune` runs the method: it calibrates what the scorer needs (activations layer by layer,
gradients, Hessians), then `select_and_mask` scores each rank's slices, agrees on the exact
pruned set of every group by all-reduce (dist_prune/selection.py) and zeroes it. Scores
exist for one decoder layer at a time wherever the selection groups do not span layers, and
the local masks are kept only when something after pruning needs them (fine-tuning,
structural export): a plain export needs only how many each mask pruned.

Every function here is collective: all ranks call it in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

from dist_prune.block_tuning import tune_pruned_layer
from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.config import JobConfig, PruneConfig, scope_of
from dist_prune.errors import UserError
from dist_prune.gradients import accumulate_gradient_stats
from dist_prune.layerwise import LayerRunner
from dist_prune.masking import Target, apply_mask, local_start
from dist_prune.methods import LocalSlice, Method
from dist_prune.owl import group_counts, owl_budgets
from dist_prune.sharding.partition import local_weight
from dist_prune.report import StageTimer, progress
from dist_prune.structural import Geometry, select_groups
from dist_prune.structures import parse_structure


@dataclass
class Pruned:
    """What pruning decided: every target's local mask (True = pruned) when `keep_masks`,
    and always how many elements each local mask pruned."""

    keep_masks: bool
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    local_counts: dict[str, int] = field(default_factory=dict)
    # prune.block_tuning: decoder layer -> its relative output error before and after the tuning
    block_errors: dict[int, tuple[float, float]] = field(default_factory=dict)

    def add(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.local_counts[name] = int(mask.sum())
            if self.keep_masks:
                self.masks[name] = mask

    def counts(self, targets: list[Target]) -> dict[str, int]:
        """Pruned elements of each full tensor, all ranks summed (one all-reduce)."""
        counts = all_reduce_(torch.tensor([self.local_counts[t.name] for t in targets], dtype=torch.long))
        return {t.name: int(c) for t, c in zip(targets, counts)}


class LazyScores:
    """A target's local scores, computed piece by piece when selection reads them: at global scope
    one group spans every layer, so all scores take part in one selection, and holding them at once
    (float32) would be twice a bf16 model; at row scope each row is selected on its own, so a chunk
    of rows at a time is all there need be. Each pass of the selection recomputes the piece it reads."""

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor, start: int, shape: tuple[int, int], method: Method, stats: dict,
                 pruned_before: torch.Tensor | None = None):
        self.weight, self.start, self.shape = weight, start, shape
        self.method, self.stats, self.pruned_before = method, stats, pruned_before
        self.device = weight.device

    def dim(self) -> int:
        return 1

    def numel(self) -> int:
        return self.weight.numel()

    __len__ = numel

    def __getitem__(self, piece: slice) -> torch.Tensor:
        lo, hi, step = piece.indices(self.numel())
        if step != 1:
            raise IndexError("scores are read in contiguous pieces")
        # gradient statistics are per element, in the slice's layout (Method.stats): sliced alike
        per_element = {*self.method.stats, *self.method.training_stats}
        stats = {k: v[lo:hi] if k in per_element else v for k, v in self.stats.items()}
        scores = self.method.score(LocalSlice(self.weight[lo:hi], self.start + lo, self.shape), stats)
        if self.pruned_before is not None:  # gradual pruning: what went stays pruned
            scores = scores.masked_fill(self.pruned_before[lo:hi], -math.inf)
        return scores


def by_layer(targets: list[Target], scope: str) -> list[list[Target]]:
    """The targets in selection calls: all at once at global scope, where one group spans every
    layer; otherwise decoder layer by decoder layer (then the head), which selects exactly the
    same elements, since no group spans two tensors, while scores exist for one layer at a time."""
    if scope == "global":
        return [targets]
    layers: dict[int | None, list[Target]] = {}
    for t in targets:
        layers.setdefault(t.layer, []).append(t)
    return list(layers.values())


def prune(model: torch.nn.Module, targets: list[Target], method: Method, cfg: JobConfig,
          calibration: torch.Tensor | None, timer: StageTimer, show: bool, keep_masks: bool = True) -> Pruned:
    """Score, select and mask every target; returns the pruned counts, and the local masks
    (True = pruned) with `keep_masks`.

    Methods that need activations calibrate layer by layer. With `sequential`, each
    layer is pruned before its outputs feed the next layer, so later layers see the
    inputs they will see at inference (Wanda / SparseGPT reference behaviour).
    """
    scope = scope_of(cfg.prune)
    structure = parse_structure(cfg.prune.structure)
    geometry = Geometry.of(model.config) if structure.removes_parameters else None
    budgets = None  # OWL: weights to prune in each decoder layer, from a dense pass
    if cfg.prune.layer_sparsity == "owl":
        with timer("calibrate"):
            budgets = owl_budgets(model, targets, calibration, cfg.prune.owl_threshold, cfg.prune.sparsity,
                                  cfg.prune.owl_lambda)
    select = partial(select_and_mask, method=method, prune_cfg=cfg.prune, scope=scope, geometry=geometry,
                     budgets=budgets)
    pruned = Pruned(keep_masks)
    calls = [targets] if structure.removes_parameters else by_layer(targets, scope)

    def select_all(stats: dict) -> Pruned:
        for part in calls:
            pruned.add(select(part, stats))
        return pruned

    if method.mask_rule is not None:  # an absolute rule per element: no selection, no agreement needed
        with timer("score+select+mask"):
            for t in targets:
                mask = method.mask_rule(LocalSlice(local_weight(t.param), local_start(t), t.shape), cfg.prune)
                apply_mask(t, mask)
                pruned.add({t.name: mask})
            return pruned
    if method.calibration == "none":
        with timer("score+select+mask"):
            return select_all({})
    if method.calibration == "gradients":  # one backward over the whole model, not layer by layer
        with timer("calibrate"):
            # windows are dealt r::W, so micro-batches of G/W make step s = windows [sG, (s+1)G)
            micro_batch = cfg.data.calibration.batch_size // rank_and_world()[1]
            stats = accumulate_gradient_stats(model, calibration, targets, stats=method.stats,
                                              micro_batch=micro_batch)
        with timer("score+select+mask"):
            return select_all(stats)

    # e.g. SparseGPT keeps one Hessian per linear: only a layer's worth at a time
    sequential = method.always_sequential or (cfg.data.calibration.sequential and scope != "global")
    collector_of = partial(method.collector, structure=structure, geometry=geometry)
    runner = LayerRunner(model)
    layers: dict[int | None, list[Target]] = {}
    for t in targets:
        layers.setdefault(t.layer, []).append(t)
    head = model.get_output_embeddings()
    head_targets = layers.pop(None, [])
    if any(t.module is not head for t in head_targets):
        other = next(t for t in head_targets if t.module is not head)
        raise UserError(f"prune.method {cfg.prune.method} calibrates the decoder layers and the "
                        f"output head only; add {other.name} to prune.exclude")

    stats = {}
    tuning = cfg.prune.block_tuning
    bar = progress(len(runner.layers), f"calibrate+prune ({cfg.prune.method})", enabled=show)
    with timer("calibrate"):
        batches = runner.start(calibration)
    # Block tuning: the dense model's own hidden states, layer by layer beside the pruned ones. A
    # pruned layer follows the dense model's output of its layer, not the dense layer's output on
    # the pruned inputs, and so also corrects what the layers before it left: ADMM at 70% on
    # SmolLM2-135M, 5 epochs, 70.41 / 189.47 (WikiText-2 / fortunes) against 78.91 / 258.40 on the
    # pruned inputs, 90.38 / 330.44 untuned (benchmarks/results/admm_study.md).
    dense = batches if tuning.epochs > 0 and sequential else None
    for index in range(len(runner.layers)):
        layer_targets = layers.get(index, [])
        prune_now = sequential and bool(layer_targets)
        with timer("calibrate"):
            with collector_of({t.name: t.module for t in layer_targets}) as collector:
                if prune_now and collector.inputs_only:  # its outputs are computed once it is pruned
                    runner.feed_inputs(index, batches, [t.module for t in layer_targets])
                else:
                    outputs = runner.run_layer(index, batches)
            stats.update(collector.reduce())
            if dense is not None:  # before the layer is pruned
                dense = outputs if dense is batches and not prune_now else runner.run_layer(index, dense)
        if prune_now:
            with timer("score+select+mask"):
                masks = select(layer_targets, stats)
                pruned.add(masks)
            for t in layer_targets:
                stats.pop(t.name, None)  # a 7B layer's Hessians are gigabytes
            if dense is not None:
                with timer("block_tuning"):
                    tuned = tune_pruned_layer(runner.layers[index], layer_targets, masks, batches, dense,
                                              epochs=tuning.epochs, lr=tuning.lr,
                                              windows_per_step=cfg.data.calibration.batch_size)
                pruned.block_errors[index] = (tuned.error_before, tuned.error_after)
            with timer("calibrate"):
                outputs = runner.run_layer(index, batches)  # what the pruned layer passes on
        batches = outputs
        bar.update(1)
    if head_targets:  # the output head sees the final norm of the last layer's outputs
        with timer("calibrate"):
            collector = collector_of({t.name: t.module for t in head_targets})
            for x in runner.head_inputs(batches):
                for t in head_targets:
                    collector.add(t.name, x)
            stats.update(collector.reduce())
        if sequential:
            with timer("score+select+mask"):
                pruned.add(select(head_targets, stats))
    bar.close()
    if not sequential:
        with timer("score+select+mask"):
            select_all(stats)
    return pruned


def select_and_mask(targets: list[Target], stats: dict, method: Method, prune_cfg: PruneConfig,
                    scope: str, *, pruned_before: dict[str, torch.Tensor] | None = None,
                    weights: dict[str, torch.Tensor] | None = None,
                    geometry: Geometry | None = None,
                    budgets: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Score each local slice, agree on the exact pruned set of each group, zero it.

    Every call is collective, and the same targets come in the same order on all ranks.
    Gradual pruning passes the masks so far (`pruned_before`: they score -inf, so they
    stay pruned) and, when the weights being trained are not the partitions themselves
    (ZeRO stage 2), this rank's slices of them (`weights`). Whole heads, channels or
    layers need the model's `geometry` (dist_prune/structural.py); OWL gives each decoder
    layer its own number of weights to prune (`budgets`, dist_prune/owl.py).
    """
    training = weights is not None  # the training loop's own slices (ZeRO stage 2)
    weights = weights or {t.name: local_weight(t.param) for t in targets}
    if method.weight_stats is not None:  # collective: statistics of the full tensors, all-reduced
        derived = method.weight_stats(targets, weights)
        stats = {**stats, **{name: {**stats.get(name, {}), **more} for name, more in derived.items()}}
    structure = parse_structure(prune_cfg.structure)
    if structure.removes_parameters:
        if geometry is None or pruned_before or training:
            raise UserError(f"prune.structure {structure} is pruned once, before any fine-tuning")
        masks = select_groups(targets, stats, method, structure.kind, prune_cfg.sparsity, prune_cfg.norm,
                              geometry)  # chosen on the CPU; kept where the partitions are
        return {t.name: masks[t.name].to(local_weight(t.param).device) for t in targets}
    if method.reconstruct is not None:  # OWL: each tensor's share of its layer's budget
        counts = None if budgets is None else dict(zip([t.name for t in targets],
                                                       group_counts(budgets, targets, "layer").tolist()))
        return method.reconstruct(targets, stats, prune_cfg.sparsity, structure, counts=counts)
    starts = [local_start(t) for t in targets]
    # Global scope selects over every layer at once; row scope reads each score once, a chunk of rows
    # at a time. Neither needs the scores held: a layer's float32 scores are twice its bf16 weights.
    if scope in ("global", "row") and structure.scores_in_pieces:
        scores = [LazyScores(weights[t.name], start, t.shape, method, stats.get(t.name, {}),
                             pruned_before[t.name] if pruned_before else None)
                  for t, start in zip(targets, starts)]
    else:
        scores = [method.score(LocalSlice(weights[t.name], start, t.shape), stats.get(t.name, {}))
                  for t, start in zip(targets, starts)]
        if pruned_before:
            scores = [s.masked_fill(pruned_before[t.name], -math.inf) for s, t in zip(scores, targets)]
    counts = None if budgets is None else group_counts(budgets, targets, scope)
    pruned = structure.select(scores, starts, [t.shape for t in targets], prune_cfg.sparsity, scope,
                              pool="l2" if prune_cfg.norm == "l2" else "sum", counts=counts)
    for t, mask in zip(targets, pruned):
        apply_mask(t, mask)
    return {t.name: mask for t, mask in zip(targets, pruned)}

