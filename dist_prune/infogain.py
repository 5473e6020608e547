"""`infogain`: the score of a structural group G is (L(theta without G) - L(theta)) / ||w_G||_2.

What L is, so that it stays affordable. One decoder layer at a time, on the calibration windows this
rank holds (the inputs the layer sees in the job: the dense model's, or with sequential calibration
the outputs of the already-pruned layers before it), L is the squared error, summed over tokens, of
the output that G writes into the residual stream, against the unablated output. So L(theta) = 0 and
L(theta without G) = sum_t ||c_G(t)||^2, where c_G(t) is G's contribution at token t, which is
exactly what ablating G alone changes in that output:

- heads (a KV group): c_G = o_proj[:, cols_G] a_G(t), the attention output of the group's n_rep query
  heads through their o_proj columns. Zeroing the group's q/k/v rows and o_proj columns removes
  exactly this term and leaves the other heads' outputs unchanged.
- channels: c_j = down_proj[:, j] h_j(t), so L = ||down_proj[:, j]||^2 * sum_t h_j(t)^2 (h = the
  input of down_proj).
- layers: c = y - x, the layer's whole residual update (o_proj output + down_proj output): a
  removed layer passes its input through.

All three come from ONE forward pass per layer, measured by hooks on o_proj / down_proj while the
layer is gathered (the hooks see the full weights); no forward pass per group. Not measured: how
the MLP of the same layer reacts to a removed head, and effects on later layers; this is a
layer-local loss, like the reconstruction errors of SparseGPT or FLAP. ||w_G||_2 is the L2 norm of
all of G's weights (dist_prune/structural.select_groups).

Distributed: each rank sums over its own windows in float64; `reduce` is one all-reduce per layer.
"""

from __future__ import annotations

import torch

from dist_prune.calibrate import InputCollector
from dist_prune.structural import UNITS, Geometry, Structural, projection

# Projections whose hooks see what each unit writes into the residual stream; the loss is kept
# under the last one (the layer's down_proj for `layers`).
_HOOKED = {"heads": ("self_attn.o_proj",), "channels": ("mlp.down_proj",),
           "layers": ("self_attn.o_proj", "mlp.down_proj")}


class GroupLossCollector(InputCollector):
    """`reduce()` gives {name: {"group_loss": float64 [groups per layer]}} for the o_proj (heads) or
    down_proj (channels, layers) weight of every layer in `linears`."""

    def __init__(self, linears: dict[str, torch.nn.Module], *, structure: Structural, geometry: Geometry):
        self.kind, self.geometry = structure.kind, geometry
        hooked = {n: m for n, m in linears.items() if projection(n)[1] in _HOOKED[self.kind]}
        super().__init__(hooked)
        groups = UNITS[self.kind].groups(geometry)
        self.loss = {n: torch.zeros(groups, dtype=torch.float64) for n in hooked
                     if projection(n)[1] == _HOOKED[self.kind][-1]}
        self._attention: dict[int, torch.Tensor] = {}  # layers: o_proj output until down_proj runs

    inputs_only = False  # the loss needs each projection's output

    def _register(self, name: str, module: torch.nn.Module):
        def measure(module, inputs, output):
            self.measure(name, module.weight, inputs[0], output)
        return module.register_forward_hook(measure)

    def measure(self, name: str, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Account for one batch: `x` and `y` are the input and output of the hooked projection."""
        layer, proj, _ = projection(name)
        if self.kind == "layers":
            if proj == "self_attn.o_proj":
                self._attention[layer] = y.detach()
                return
            update = self._attention.pop(layer) + y.detach()
            self.loss[name] += update.double().square().sum().cpu()
            return
        x, w = x.detach().reshape(-1, x.shape[-1]).double(), weight.detach().double()
        if self.kind == "channels":
            self.loss[name] += (w.square().sum(0) * x.square().sum(0)).cpu()
            return
        width = self.geometry.head_dim * self.geometry.n_rep  # o_proj columns of one KV group
        for g in range(self.geometry.kv_heads):
            cols = slice(g * width, (g + 1) * width)
            self.loss[name][g] += (x[:, cols] @ w[:, cols].T).square().sum().cpu()

    def reduce(self) -> dict[str, dict[str, torch.Tensor]]:
        """All-reduce the sums across ranks (one collective) and return the stats."""
        self.loss = self.all_reduce_parts(self.loss)
        return {name: {"group_loss": loss} for name, loss in self.loss.items()}
