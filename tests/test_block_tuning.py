"""Block tuning (dist_prune/block_tuning.py): a pruned decoder layer's kept weights follow the dense
layer's outputs, its masks stay exactly as chosen, and a bad config is one line."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_prune.block_tuning import in_steps, relative_error, tune_layer
from dist_prune.config import load_config
from dist_prune.errors import UserError
from dist_prune.layerwise import Batch, LayerRunner

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def layer_and_data():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    batches = LayerRunner(model).start(torch.randint(0, 64, (8, 16)))
    layer = model.model.layers[0]
    with torch.no_grad():
        targets = [layer(b.hidden, **b.layer_kwargs) for b in batches]
    targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    return layer, batches, targets


def _pruned_copy(layer, sparsity=0.5):
    """The layer with half of every linear's smallest weights zeroed, and its masks."""
    pruned_layer = copy.deepcopy(layer)
    masks = {}
    for name in LINEARS:
        w = pruned_layer.get_submodule(name).weight.data
        k = int(sparsity * w.numel())
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[w.abs().reshape(-1).argsort()[:k]] = True
        masks[f"{name}.weight"] = mask.view_as(w)
        w[masks[f"{name}.weight"]] = 0
    return pruned_layer, masks


def test_tuning_lowers_the_output_error_and_keeps_every_mask_exactly(layer_and_data):
    layer, batches, targets = layer_and_data
    pruned_layer, masks = _pruned_copy(layer)
    norm_before = {n: p.clone() for n, p in pruned_layer.named_parameters() if "norm" in n}
    weights = {name: pruned_layer.get_submodule(name.removesuffix(".weight")).weight.data for name in masks}
    tuned = tune_layer(pruned_layer, weights, masks, batches, targets, epochs=20, lr=1e-2)
    assert tuned.weights.keys() == masks.keys()
    # the dense layer's outputs are followed closer: at least 30% less error on the same windows
    assert tuned.error_after < 0.7 * tuned.error_before
    assert relative_error(pruned_layer, tuned.weights, batches, targets) == pytest.approx(tuned.error_after)
    for name, mask in masks.items():
        w = tuned.weights[name]
        assert torch.equal(w[mask], torch.zeros(int(mask.sum())))  # pruned: exactly zero
        assert not torch.equal(w[~mask], weights[name][~mask])  # kept: tuned
    # tune_layer returns the weights; it writes nothing into the layer, norms untouched
    for n, p in pruned_layer.named_parameters():
        if "norm" in n:
            assert torch.equal(p, norm_before[n])
    assert relative_error(pruned_layer, {}, batches, targets) == pytest.approx(tuned.error_before)


def test_no_steps_keep_the_reconstructions_weights(layer_and_data):
    layer, batches, targets = layer_and_data
    pruned_layer, masks = _pruned_copy(layer)
    weights = {name: pruned_layer.get_submodule(name.removesuffix(".weight")).weight.data for name in masks}
    tuned = tune_layer(pruned_layer, weights, masks, batches, targets, epochs=0, lr=1e-2)
    assert tuned.weights == {} and tuned.error_after == tuned.error_before > 0


def test_in_steps_recuts_windows_in_order_and_refuses_per_window_arguments(layer_and_data):
    _, batches, _ = layer_and_data  # 8 windows in micro-batches of 4
    steps = in_steps(batches, 3)
    assert [len(b.hidden) for b in steps] == [3, 3, 2]
    assert torch.equal(torch.cat([b.hidden for b in steps]), torch.cat([b.hidden for b in batches]))
    assert all(b.layer_kwargs is batches[0].layer_kwargs for b in steps)
    per_window = [Batch(b.hidden, {**b.layer_kwargs, "attention_mask": torch.ones(len(b.hidden), 1, 16, 16)})
                  for b in batches]
    with pytest.raises(RuntimeError, match="per-window arguments of shape"):
        in_steps(per_window, 2)
    assert in_steps([], 2) == []


@pytest.mark.parametrize("overrides, message", [
    (["prune.method=magnitude"], "prune.block_tuning tunes each layer as it is pruned, layer by layer: use "
                                 "prune.method"),
    (["prune.method=wanda", "prune.scope=global"], "prune.block_tuning needs sequential pruning"),
    (["prune.method=wanda", "data.calibration.sequential=false"], "prune.block_tuning needs sequential"),
    (["prune.method=wanda", "prune.structure=heads", "prune.sparsity=0.25"],
     "prune.structure heads removes whole parameters"),
    (["prune.method=sparsegpt", "cluster.num_workers=3"], "data.calibration.batch_size=4 (windows per block "
                                                          "tuning step) must be a multiple of cluster.num_workers=3"),
    (["prune.method=admm", "prune.block_tuning.lr=0"], "prune.block_tuning.lr must be in (0, 1]"),
    (["prune.method=admm", "prune.block_tuning.epochs=-1"], "prune.block_tuning.epochs must be >= 0, got -1"),
])
def test_block_tuning_config_mistakes_are_one_line(overrides, message):
    epochs = [] if any("epochs" in o for o in overrides) else ["prune.block_tuning.epochs=2"]
    with pytest.raises(UserError, match=re.escape(message)) as e:
        load_config(None, [*overrides, *epochs])
    assert "\n" not in str(e.value)


def test_block_tuning_is_accepted_on_every_layer_by_layer_method():
    for method in ("wanda", "sparsegpt", "admm", "ria"):
        cfg = load_config(None, [f"prune.method={method}", "prune.block_tuning.epochs=3"])
        assert cfg.prune.block_tuning.epochs == 3 and cfg.prune.block_tuning.lr == 3e-3


def test_the_summary_shows_the_summed_layer_errors_before_and_after():
    from dist_prune.report import summary_table

    metrics = {"perplexity_dense": 30.0, "perplexity_sparse": 40.0, "sparsity": 0.5, "pruned": 5, "prunable": 10,
               "block_error_before": [0.25, 0.5], "block_error_after": [0.125, 0.25]}
    assert "block tuning: layer output error  0.75 -> 0.375 (x0.500)" in summary_table(metrics, None, "out")
    del metrics["block_error_before"], metrics["block_error_after"]
    assert "block tuning" not in summary_table(metrics, None, "out")
