"""Structural pruning: whole attention heads, MLP channels or decoder layers, removed for real.

A Hugging Face Llama config.json states ONE head count and ONE intermediate size for all layers,
so that the export loads with plain `from_pretrained` every layer loses the same number of groups;
the scores decide which ones. The units (the registry `UNITS` below):

- heads: one KV group = a key/value head together with the n_rep = num_attention_heads /
  num_key_value_heads query heads that read it: its head_dim rows of k_proj and v_proj, its
  n_rep * head_dim rows of q_proj and the same columns of o_proj. Whole groups keep grouped-query
  attention valid for any n_rep (HF's repeat_kv maps query head h to KV head h // n_rep), plain
  multi-head attention included (n_rep = 1). The export has num_key_value_heads - k KV heads,
  (num_key_value_heads - k) * n_rep query heads and an explicit head_dim.
- channels: one MLP intermediate channel: a row of gate_proj and of up_proj, a column of down_proj.
- layers: one decoder layer; the remaining layers are renumbered.

prune.sparsity is the fraction of groups removed: k = floor(s * n + 0.5) of the n = KV heads (or
channels) of EVERY layer, or of the n = num_hidden_layers layers of the model; k must be in
[1, n - 1]. The fraction of parameters this removes is reported separately (metrics, manifest).

Group scores: each rank pools the element scores of its ZeRO-3 slices (any scorer) into float64
partial sums per group (or sums of squares for prune.norm l2), ONE all-reduce of the small vector,
rounded to float32; every rank then sorts the same vector (stable: ties by lower group index), so
the choice is exact and the same for every world size. Inside the job the removed groups are only
masked (zeros), which makes the model compute exactly what the shrunk export computes: a zero o_proj
column or down_proj column removes the group's contribution, and a layer whose o_proj and down_proj
are zero passes its residual stream through unchanged. The export (`ShrinkPlan`) then writes
index-selected tensors and an updated config.json.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.errors import UserError
from dist_prune.masking import Target, apply_mask, local_start
from dist_prune.sharding.partition import local_weight
from dist_prune.local import LocalSlice
from dist_prune.selection import CHUNK

_PROJECTION = re.compile(r"^(.*\.layers\.)(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                         r"\.(weight|bias)$")
_LAYER = re.compile(r"^(.*\.layers\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Structural:
    """`prune.structure` heads | channels | layers."""

    kind: str
    removes_parameters = True  # chosen by select_groups on the model's geometry, cut out of the export
    scores_in_pieces = False

    def __str__(self) -> str:
        return self.kind

    def check_shape(self, shape: tuple[int, int], name: str) -> None:
        """Whole groups are checked on the model (`check_model`), not tensor by tensor."""


@dataclass(frozen=True)
class Geometry:
    """The shapes structural pruning needs, from a Llama-style config (object or config.json dict)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> "Geometry":
        def get(key):
            return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

        heads = int(get("num_attention_heads"))
        return cls(int(get("num_hidden_layers")), heads, int(get("num_key_value_heads") or heads),
                   int(get("head_dim") or get("hidden_size") // heads), int(get("intermediate_size")))

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Member:
    """How one projection of a layer splits into groups."""

    axis: int  # 0: groups own rows (outputs); 1: groups own columns (inputs)
    width: Callable[[Geometry], int]  # rows or columns per group; 0: the whole tensor is one group
    masked: bool = True  # zeroed inside the job (layers: only what writes to the residual stream)


@dataclass(frozen=True)
class Unit:
    scope: str  # "layer": k groups in every layer; "global": k groups of the whole model
    groups: Callable[[Geometry], int]  # groups per layer
    members: Mapping[str, Member]  # projection inside a layer -> how it splits
    config: Callable[[Geometry, int], dict]  # config.json values after removing k (per layer)


def _q_width(g: Geometry) -> int:
    return g.head_dim * g.n_rep


def _kv_width(g: Geometry) -> int:
    return g.head_dim


def _one(g: Geometry) -> int:
    return 1


def _whole(g: Geometry) -> int:
    return 0


UNITS: dict[str, Unit] = {
    "heads": Unit("layer", lambda g: g.kv_heads,
                  {"self_attn.q_proj": Member(0, _q_width), "self_attn.k_proj": Member(0, _kv_width),
                   "self_attn.v_proj": Member(0, _kv_width), "self_attn.o_proj": Member(1, _q_width)},
                  lambda g, k: {"num_key_value_heads": g.kv_heads - k, "head_dim": g.head_dim,
                                "num_attention_heads": (g.kv_heads - k) * g.n_rep}),
    "channels": Unit("layer", lambda g: g.intermediate,
                     {"mlp.gate_proj": Member(0, _one), "mlp.up_proj": Member(0, _one),
                      "mlp.down_proj": Member(1, _one)},
                     lambda g, k: {"intermediate_size": g.intermediate - k}),
    "layers": Unit("global", lambda g: 1,
                   {"self_attn.q_proj": Member(0, _whole, False), "self_attn.k_proj": Member(0, _whole, False),
                    "self_attn.v_proj": Member(0, _whole, False), "self_attn.o_proj": Member(0, _whole),
                    "mlp.gate_proj": Member(0, _whole, False), "mlp.up_proj": Member(0, _whole, False),
                    "mlp.down_proj": Member(0, _whole)},
                   lambda g, k: {"num_hidden_layers": g.layers - k}),
}


def removed_count(kind: str, sparsity: float, geometry: Geometry) -> int:
    """Groups removed: per layer (heads, channels) or from the whole model (layers)."""
    unit = UNITS[kind]
    n = geometry.layers if unit.scope == "global" else unit.groups(geometry)
    return math.floor(sparsity * n + 0.5)


def projection(name: str) -> tuple[int, str, str] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> (3, 'self_attn.q_proj', 'weight')."""
    match = _PROJECTION.match(name)
    return None if match is None else (int(match.group(2)), match.group(3), match.group(4))


# --- checks (driver) and members (worker) --------------------------------------------------------


def check_model(kind: str, sparsity: float, config: dict, names: Sequence[str],
                excluded: Callable[[str], bool]) -> None:
    """One-line UserError unless the checkpoint can lose k whole groups of every layer (or k layers)."""
    try:
        g = Geometry.of(config)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"prune.structure {kind} needs a Llama-style config.json (num_hidden_layers, "
                        "num_attention_heads, num_key_value_heads, intermediate_size)") from None
    if kind == "heads" and (g.kv_heads < 1 or g.heads % g.kv_heads):
        raise UserError(f"prune.structure heads: num_attention_heads={g.heads} is not a multiple of "
                        f"num_key_value_heads={g.kv_heads}")
    unit = UNITS[kind]
    n = g.layers if unit.scope == "global" else unit.groups(g)
    k = removed_count(kind, sparsity, g)
    what = {"heads": "KV head groups per layer", "channels": "MLP channels per layer",
            "layers": "decoder layers"}[kind]
    if not 1 <= k <= n - 1:
        raise UserError(f"prune.sparsity={sparsity} removes {k} of {n} {what}; prune.structure {kind} "
                        f"needs between 1 and {n - 1} (sparsity {1 / n:.4g} to {(n - 1) / n:.4g})")
    present = set(names)
    for layer in range(g.layers):
        for proj in unit.members:
            name = f"model.layers.{layer}.{proj}.weight"
            if name not in present:
                raise UserError(f"prune.structure {kind} needs {name}, which the checkpoint lacks "
                                "(Llama-style q/k/v/o_proj and gate/up/down_proj expected)")
            if excluded(name):
                raise UserError(f"prune.structure {kind} removes whole groups from every layer, but "
                                f"prune.exclude matches {name}")


def member_targets(targets: Sequence[Target], kind: str, geometry: Geometry) -> list[Target]:
    """The targets this structure scores, every layer complete (UserError otherwise)."""
    unit = UNITS[kind]
    chosen = [t for t in targets if (p := projection(t.name)) and p[1] in unit.members and p[2] == "weight"]
    if len(chosen) != geometry.layers * len(unit.members):
        raise UserError(f"prune.structure {kind}: expected {len(unit.members)} projections in each of "
                        f"{geometry.layers} layers among the targets, found {len(chosen)} (prune.exclude?)")
    return chosen


# --- pooling and choosing (pure) -----------------------------------------------------------------


def group_ids(start: int, count: int, shape: Sequence[int], member: Member, geometry: Geometry) -> torch.Tensor:
    """Group (within its layer) of the flat elements [start, start + count) of a [out, in] tensor
    (a 1-D bias is [out, 1])."""
    width = member.width(geometry)
    if width == 0:
        return torch.zeros(count, dtype=torch.long)
    pos = torch.arange(start, start + count)
    columns = int(shape[1]) if len(shape) == 2 else 1
    index = pos // columns if member.axis == 0 else pos % columns
    return index // width


def pool_partial(values: torch.Tensor, start: int, shape: Sequence[int], member: Member, geometry: Geometry,
                 n_groups: int, square: bool = False) -> torch.Tensor:
    """float64 [n_groups] on the CPU: this slice's sum of `values` (or of their squares) per group.
    Pooled on the host wherever `values` are (a GPU's scores come over chunk by chunk): group sums
    are small, and they are all-reduced and chosen from there."""
    if start + values.numel() > math.prod(shape):
        raise ValueError(f"slice [{start}, {start + values.numel()}) exceeds a tensor of shape {list(shape)}")
    total = torch.zeros(n_groups, dtype=torch.float64)
    for lo in range(0, values.numel(), CHUNK):
        x = values[lo : lo + CHUNK].double().cpu()
        total.index_add_(0, group_ids(start + lo, x.numel(), shape, member, geometry), x * x if square else x)
    return total


def choose(scores: torch.Tensor, k: int, scope: str) -> torch.Tensor:
    """bool [layers, groups], True = removed: the k lowest scores of each layer (scope "layer") or
    of the whole matrix ("global"); equal scores go in index order (stable sort)."""
    if bool(torch.isnan(scores).any()):
        raise ValueError("group scores contain NaN; cannot choose the groups to remove")
    flat = scores if scope == "layer" else scores.reshape(1, -1)
    order = torch.argsort(flat, dim=1, stable=True)[:, :k]
    return torch.zeros(flat.shape, dtype=torch.bool).scatter_(1, order, True).view(scores.shape)


# --- the collective step: score, choose, mask ----------------------------------------------------


def select_groups(targets: Sequence[Target], stats: Mapping, method, kind: str, sparsity: float, norm: str,
                  geometry: Geometry) -> dict[str, torch.Tensor]:
    """Choose and mask the removed groups of the layers of `targets` (all members of each layer);
    returns the local masks. Collective: same targets, same order on every rank.

    Element scores come from `method.score`; a `method.group_loss` method (infogain) instead divides
    each group's measured loss increase (`stats[...]["group_loss"]`, dist_prune/infogain.py) by the L2 norm of
    the group's weights."""
    unit, infogain = UNITS[kind], method.group_loss
    layers = sorted({t.layer for t in targets})
    row, n_groups = {layer: i for i, layer in enumerate(layers)}, unit.groups(geometry)
    square = infogain or norm == "l2"
    partial = torch.zeros(len(layers), n_groups, dtype=torch.float64)
    for t in targets:
        local = LocalSlice(local_weight(t.param), local_start(t), t.shape)
        # infogain: the group's weight norm (|w| squared and summed, then the root)
        scores = local.weight.float().abs() if infogain else method.score(local, stats.get(t.name, {}))
        partial[row[t.layer]] += pool_partial(scores, local.start, t.shape, unit.members[projection(t.name)[1]],
                                              geometry, n_groups, square)
    pooled = all_reduce_(partial).sqrt() if square else all_reduce_(partial)
    if infogain:
        loss = torch.zeros_like(pooled)
        for t in targets:
            if "group_loss" in stats.get(t.name, {}):
                loss[row[t.layer]] = stats[t.name]["group_loss"]
        pooled = torch.where(pooled > 0, loss / pooled, torch.zeros_like(pooled))
    removed = choose(pooled.float(), removed_count(kind, sparsity, geometry), unit.scope)
    masks = {}
    for t in targets:
        member, start = unit.members[projection(t.name)[1]], local_start(t)
        count = local_weight(t.param).numel()
        if not member.masked:
            masks[t.name] = torch.zeros(count, dtype=torch.bool)
            continue
        masks[t.name] = removed[row[t.layer]][group_ids(start, count, t.shape, member, geometry)]
        apply_mask(t, masks[t.name])
        bias = getattr(t.module, "bias", None)
        if bias is not None and member.width(geometry) == 0 and bool(removed[row[t.layer], 0]):
            local_weight(bias).zero_()  # a removed layer adds nothing to the residual stream
    return masks


# --- the export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShrinkPlan:
    """Which groups are gone; renames and index-selects tensors and rewrites config.json."""

    kind: str
    geometry: Geometry
    removed: torch.Tensor  # bool [layers, groups per layer]

    @property
    def unit(self) -> Unit:
        return UNITS[self.kind]

    def removed_per_layer(self) -> int:
        return int(self.removed.sum()) if self.unit.scope == "global" else int(self.removed[0].sum())

    def _new_layer(self, layer: int) -> int | None:
        if bool(self.removed[layer, 0]):
            return None
        return layer - int(self.removed[:layer, 0].sum())

    def _kept(self, name: str) -> tuple[int, torch.Tensor] | None:
        """(axis, kept indices) of a tensor this plan shrinks; None for one it leaves alone."""
        found = projection(name)
        member = found and self.unit.members.get(found[1])
        if not member or (found[2] == "bias" and member.axis == 1):  # o/down bias: per output
            return None
        width = member.width(self.geometry)
        groups = (~self.removed[found[0]]).nonzero().view(-1)
        return member.axis, (groups[:, None] * width + torch.arange(width)).reshape(-1)

    def exported(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
        """(name, shape) in the export, or None for a tensor of a removed layer."""
        if self.kind == "layers":
            match = _LAYER.match(name)
            if match is None:
                return name, shape
            new = self._new_layer(int(match.group(2)))
            return None if new is None else (f"{match.group(1)}{new}.{match.group(3)}", shape)
        kept = self._kept(name)
        if kept is None:
            return name, shape
        out = list(shape)
        out[kept[0]] = kept[1].numel()
        return name, tuple(out)

    def kept_elements(self, name: str, shape: Sequence[int], start: int, stop: int) -> torch.Tensor | None:
        """Bool [stop - start]: which elements [start, stop) of the flattened tensor `shrink` keeps
        (a ZeRO-3 slice's share of the export); None for a tensor this plan leaves whole."""
        kept = None if self.kind == "layers" else self._kept(name)
        if kept is None:
            return None
        axis, index = kept
        keep = torch.zeros(shape[axis], dtype=torch.bool)
        keep[index] = True
        inner = math.prod(shape[axis + 1:])
        return keep[torch.arange(start, stop) // inner % shape[axis]]

    def shrink(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        kept = None if self.kind == "layers" else self._kept(name)
        return tensor if kept is None else tensor.index_select(kept[0], kept[1].to(tensor.device))

    def config(self, config: dict) -> dict:
        out = dict(config, **self.unit.config(self.geometry, self.removed_per_layer()))
        if self.kind == "layers" and isinstance(out.get("layer_types"), list):
            out["layer_types"] = [t for i, t in enumerate(out["layer_types"]) if not self.removed[i, 0]]
        return out

    def report(self, targets: Sequence[Target], shapes: Mapping[str, tuple[int, ...]]) -> dict:
        """Manifest entries: what each target lost, the whole tensors gone, parameter counts."""
        removed, dropped, counts = {}, {}, {}
        for t in targets:
            out = self.exported(t.name, t.shape)
            if out is None:
                dropped[t.name] = counts[t.name] = t.numel
            else:
                removed[out[0]] = counts[t.name] = t.numel - math.prod(out[1])
        before = sum(math.prod(s) for s in shapes.values())
        after = sum(math.prod(out[1]) for n, s in shapes.items() if (out := self.exported(n, s)))
        groups = {str(layer): row.nonzero().view(-1).tolist() for layer, row in enumerate(self.removed)
                  if bool(row.any())}
        return {"pruned_tensors": sorted(removed), "pruned_counts": counts, "removed_elements": removed,
                "dropped_tensors": dropped,
                "structural": {"unit": self.kind, "removed_groups": groups,
                               "config": self.unit.config(self.geometry, self.removed_per_layer()),
                               "parameters_before": before, "parameters_after": after,
                               "removed_fraction": (before - after) / before}}


def shrink_plan(kind: str, geometry: Geometry, targets: Sequence[Target], masks: Mapping[str, torch.Tensor]) -> ShrinkPlan:
    """The plan of what the masks removed; the masks stay the one record of the pruning. Collective:
    one all-reduce of masked and total element counts per group."""
    unit = UNITS[kind]
    n_groups = unit.groups(geometry)
    counts = torch.zeros(2, geometry.layers, n_groups, dtype=torch.float64)
    for t in targets:
        member = unit.members[projection(t.name)[1]]
        if member.masked:
            mask, start = masks[t.name], local_start(t)
            counts[0, t.layer] += pool_partial(mask.double(), start, t.shape, member, geometry, n_groups)
            counts[1, t.layer] += pool_partial(torch.ones(mask.numel()), start, t.shape, member, geometry, n_groups)
    masked, total = all_reduce_(counts)
    if bool(((masked > 0) & (masked < total)).any()):
        raise RuntimeError(f"masks do not cover whole {kind} groups")
    removed = (masked > 0) & (masked == total)
    if unit.scope == "layer" and len(set(removed.sum(1).tolist())) != 1:
        raise RuntimeError(f"structural {kind}: layers lost different numbers of groups")
    return ShrinkPlan(kind, geometry, removed)
