"""The GPU path's device plumbing, checked on a CPU machine.

Token windows come from the driver as CPU tensors; on a GPU worker the partitions live on
cuda:$LOCAL_RANK. The "meta" device stands in for the GPU here: like a CUDA device, it refuses
any op that mixes it with CPU tensors, so a window, statistic or mask left on the CPU raises.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dist_prune import layerwise
from dist_prune.calibrate import InputNormCollector
from dist_prune.layerwise import LayerRunner
from dist_prune.sharding.partition import model_device
from dist_prune.methods import LocalSlice
from dist_prune.methods.wanda import wanda
from dist_prune.structures import Block, _prune_lowest, block_mask, block_scores

META = torch.device("meta")


def test_meta_refuses_cpu_tensors():
    """The premise of this file: mixing the stand-in device with the CPU fails."""
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device=META) + torch.ones(3)


def test_model_device_is_where_the_partitions_are():
    assert model_device(torch.nn.Linear(2, 3)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 3, device=META)) == META
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    linear = torch.nn.Linear(2, 3)
    linear.weight.ds_tensor = torch.empty(3, device=META)  # a ZeRO-3 partition elsewhere than .data
    assert model_device(linear) == META


class _Layer(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, hidden, scale):
        return (self.proj(hidden) * scale,)


class _TinyLM(torch.nn.Module):
    """What LayerRunner needs of a causal LM: a decoder with .layers and .norm, an output head,
    and layer arguments the model's own forward computes (here `scale`, on the model's device)."""

    def __init__(self, vocab: int = 11, hidden: int = 6, layers: int = 2, device=None):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, device=device)
        self.layers = torch.nn.ModuleList(_Layer(hidden).to(device) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(hidden, device=device)
        self.head = torch.nn.Linear(hidden, vocab, device=device)

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=False):
        if input_ids.device != self.embed.weight.device:  # as a CUDA embedding refuses CPU ids
            raise RuntimeError(f"input_ids on {input_ids.device}, embeddings on {self.embed.weight.device}")
        hidden = self.embed(input_ids)
        scale = torch.ones((), device=hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, scale=scale)[0]
        return self.head(self.norm(hidden))


def test_layer_runner_moves_cpu_windows_to_the_model(monkeypatch):
    model = _TinyLM(device=META)
    windows = torch.randint(0, 11, (6, 5))  # two micro-batches (MICRO_BATCH = 4)
    runner = LayerRunner(model)
    batches = runner.start(windows)
    assert [b.hidden.shape for b in batches] == [(4, 5, 6), (2, 5, 6)]
    for index in range(len(runner.layers)):
        batches = runner.run_layer(index, batches)
    assert all(b.hidden.device == META for b in batches)
    assert runner.head_inputs(batches)[0].device == META

    seen = []  # nll's cross entropy: the window's ids must meet the logits on the model's device

    def cross_entropy(logits, target, reduction):
        seen.append((logits.device, target.device, tuple(target.shape)))
        return torch.tensor(1.0)
    monkeypatch.setattr(layerwise, "F", SimpleNamespace(cross_entropy=cross_entropy))
    assert runner.nll(batches, windows) == (6.0, 6 * 4)
    assert seen == [(META, META, (4,))] * 6


def test_layer_runner_on_the_cpu_is_unchanged():
    torch.manual_seed(0)
    model = _TinyLM()
    windows = torch.randint(0, 11, (3, 5))
    runner = LayerRunner(model)
    batches = runner.start(windows)
    for index in range(len(runner.layers)):
        batches = runner.run_layer(index, batches)
    with torch.no_grad():
        logits = model(windows)[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), windows[:, 1:].reshape(-1),
                                                     reduction="sum")
    total, count = runner.nll(batches, windows)
    assert count == 3 * 4
    assert total == pytest.approx(expected.item(), rel=1e-5)


def test_wanda_scores_where_the_weights_are():
    weight = torch.empty(12, device=META)  # rows 1-3 of a [4, 4] weight, on the "GPU"
    stats = {"input_sq_sum": torch.arange(4, dtype=torch.float64)}  # as read back on the CPU
    local = LocalSlice(weight, 4, (4, 4))
    assert local.columns().device == META
    scores = wanda(local, stats)
    assert scores.device == META and scores.shape == (12,)
    cpu = wanda(LocalSlice(torch.full((6,), -2.0), 2, (2, 4)), {"input_sq_sum": torch.tensor([0.0, 1, 4, 9])})
    assert cpu.tolist() == [4.0, 6.0, 0.0, 2.0, 4.0, 6.0]  # |w| * sqrt(sum x^2) of columns 2 3 0 1 2 3


def test_input_norm_sums_stay_on_the_modules_device():
    linear = torch.nn.Linear(3, 2, device=META)
    with InputNormCollector({"w": linear}) as collector:
        linear(torch.empty(4, 3, device=META))
    stats = collector.reduce()
    assert stats["w"]["input_sq_sum"].device == META
    assert stats["w"]["input_sq_sum"].dtype == torch.float64


def test_structure_masks_stay_on_the_scores_device():
    scores = torch.empty(2, 4, device=META)
    assert _prune_lowest(scores, 2).device == META
    block = Block(2, 2)
    flat = torch.empty(16, device=META)
    assert block_scores(flat, 0, (4, 4), block).device == META
    decisions = torch.tensor([True, False, False, True])  # agreed on the CPU
    assert block_mask(flat, 0, (4, 4), block, decisions).device == META
    cpu_mask = block_mask(torch.zeros(8), 8, (4, 4), block, decisions)  # rows 2-3: blocks 2, 3
    assert cpu_mask.tolist() == [False, False, True, True] * 2
