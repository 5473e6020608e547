"""LayerRunner's measuring pass: a layer run only as far as the inputs being measured."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_prune.calibrate import InputNormCollector
from dist_prune.layerwise import LayerRunner


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _linears(layer: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}


def _ran(modules: dict[str, torch.nn.Module]):
    """Names of the modules whose forward completed, in order, and the hooks that record them."""
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: ran.append(n)) for n, m in modules.items()]
    return ran, hooks


def test_feed_inputs_measures_what_a_full_pass_measures(llama):
    windows = torch.randint(0, 32, (6, 8))  # two micro-batches
    runner = LayerRunner(llama)
    batches = runner.start(windows)
    layer = runner.layers[1]
    linears = _linears(layer)
    with InputNormCollector(linears) as full:
        runner.run_layer(1, batches)
    modules = dict(layer.named_modules())
    ran, hooks = _ran({n: m for n, m in modules.items() if n})
    with InputNormCollector(linears) as fed:
        assert runner.feed_inputs(1, batches, list(linears.values())) is None
    for h in hooks:
        h.remove()
    for name in linears:
        assert torch.equal(fed.reduce()[name]["input_sq_sum"], full.reduce()[name]["input_sq_sum"]), name
    # down_proj is the last linear: its input is measured, its matmul and the residual add skipped
    assert "mlp.down_proj" not in ran and "mlp" not in ran and "mlp.up_proj" in ran
    assert ran.count("mlp.up_proj") == len(batches)
    assert not any(m._forward_pre_hooks for m in linears.values())  # feed_inputs' hooks are gone


def test_feed_inputs_stops_after_the_last_measured_linear(llama):
    runner = LayerRunner(llama)
    batches = runner.start(torch.randint(0, 32, (2, 8)))
    layer = runner.layers[0]
    attention = _linears(layer, "self_attn.")
    ran, hooks = _ran(dict(layer.named_modules()))
    with InputNormCollector(attention) as collector:
        runner.feed_inputs(0, batches, list(attention.values()))
    for h in hooks:
        h.remove()
    assert set(collector.reduce()) == set(attention)
    assert "self_attn.v_proj" in ran and "self_attn.o_proj" not in ran
    assert not any(n.startswith("mlp") or n == "post_attention_layernorm" for n in ran)
