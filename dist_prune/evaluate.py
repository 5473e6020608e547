"""Stage 8, evaluate: perplexity of the (partitioned) model on held-out windows.

Each rank scores its share of the windows layer by layer; the summed negative
log-likelihood and token counts are all-reduced, so every rank returns the same
number, equal to the single-process perplexity over all windows.
"""

from __future__ import annotations

import math

import torch

from dist_prune.collectives import all_reduce_

from dist_prune.layerwise import LayerRunner


def perplexity(model: torch.nn.Module, windows: torch.Tensor, progress=None) -> float:
    """exp(mean next-token NLL) over every predicted token of this rank's `windows` and
    the other ranks' (collective: every rank calls it, possibly with no windows)."""
    runner = LayerRunner(model)
    batches = runner.start(windows)
    for index in range(len(runner.layers)):
        batches = runner.run_layer(index, batches)
        if progress is not None:
            progress.update(1)
    nll, count = runner.nll(batches, windows)
    totals = all_reduce_(torch.tensor([nll, float(count)], dtype=torch.float64))
    return math.exp(totals[0].item() / totals[1].item()) if totals[1] > 0 else float("nan")
