"""OWL layer sparsities (dist_prune/owl.py): the formula on hand-made outlier ratios, exact integer
totals, and the recipe on 1 and 2 gloo ranks against a single-process hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_llama
from dist_prune.cli import main
from dist_prune.config import load_config, to_dict
from dist_prune.data import calibration_windows, tokenize
from dist_prune.owl import apportion, layer_budgets, layer_sparsities
from dist_prune.worker import WorkerJob, run_worker
from multirank import run_on_ranks

SEQ, M, LAMBDA, SPARSITY = 16, 2.0, 0.08, 0.5
CASES = {"row": ["prune.scope=row"], "layer": ["prune.scope=layer", "data.calibration.sequential=false"],
         # the reconstructions prune each tensor's share of its layer's budget
         "sparsegpt": ["prune.method=sparsegpt"], "admm": ["prune.method=admm"]}
RECONSTRUCTIONS = ("sparsegpt", "admm")  # Hessians summed in another order on 2 ranks: close, not equal


def test_layer_sparsities_known_answer():
    ratios = torch.tensor([0.01, 0.03, 0.02])  # normalized to 0, 1, 0.5; times 2 lambda: 0, .16, .08
    sizes = torch.tensor([100, 100, 100])
    assert layer_sparsities(ratios, sizes, 0.5, 0.08).tolist() == pytest.approx([0.58, 0.42, 0.50])
    assert layer_sparsities(torch.full((3,), 0.02), sizes, 0.5, 0.08).tolist() == [0.5, 0.5, 0.5]
    # unequal sizes: the size-weighted mean of the layer sparsities stays s
    uneven = layer_sparsities(ratios, torch.tensor([100, 300, 100]), 0.5, 0.08)
    assert float((uneven * torch.tensor([100.0, 300.0, 100.0])).sum()) == pytest.approx(250.0)


def test_apportion_is_exact_and_breaks_ties_by_index():
    caps = torch.tensor([10, 10, 10, 10])
    assert apportion(10, torch.tensor([3.4, 3.3, 3.3, 0.0]), caps).tolist() == [4, 3, 3, 0]
    assert apportion(2, torch.tensor([0.5, 0.5, 0.5, 0.5]), caps).tolist() == [1, 1, 0, 0]
    sizes = torch.tensor([7, 7, 7])
    budgets = layer_budgets(torch.tensor([0.0, 0.1, 0.05]), sizes, 0.5, 0.2)
    assert budgets.tolist() == [5, 2, 4]  # quotas 4.9, 2.1, 3.5: total round(10.5) = 11
    with pytest.raises(ValueError):
        apportion(5, torch.tensor([1.0, 1.0]), torch.tensor([2, 2]))


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("owl-llama"), layers=3, seed=3)


def _run(model_dir: str, out_dir: str, calib) -> dict:
    world = torch.distributed.get_world_size()
    for name, overrides in CASES.items():
        cfg = load_config(None, [f"model.path={model_dir}", "prune.method=wanda", "prune.layer_sparsity=owl",
                                 f"prune.owl_threshold={M}", f"prune.owl_lambda={LAMBDA}",
                                 f"prune.sparsity={SPARSITY}", f"data.calibration.seq_len={SEQ}", *overrides])
        run_worker(WorkerJob(to_dict(cfg), model_dir, calib, None, f"{out_dir}/w{world}-{name}", {}))


def _hand_budgets(model_dir, calib) -> list[int]:
    """OWL by hand on one process: dense input norms, outlier ratios, s_l, largest remainder."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def accumulate(name, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sums[name] += (x * x).sum(0)

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: accumulate(n, i)) for n, m in linears.items()]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    ratios, sizes = [], []
    for layer in range(3):
        names = [n for n in linears if f".layers.{layer}." in n]
        scores = torch.cat([(linears[n].weight.detach().abs() * sums[n].float().sqrt()).reshape(-1) for n in names])
        ratios.append(int((scores > M * float(scores.double().mean())).sum()) / scores.numel())
        sizes.append(scores.numel())
    assert len(set(ratios)) == 3, ratios  # the layers differ, so OWL has something to do
    lo, hi = min(ratios), max(ratios)
    keep = [(r - lo) / (hi - lo) * 2 * LAMBDA for r in ratios]
    keep = [k - sum(keep) / 3 + (1 - SPARSITY) for k in keep]  # equal layer sizes: the plain mean
    quotas = [(1 - k) * n for k, n in zip(keep, sizes)]
    total = math.floor(SPARSITY * sum(sizes) + 0.5)
    counts = [math.floor(q) for q in quotas]
    for i in sorted(range(3), key=lambda i: (-(quotas[i] - counts[i]), i))[: total - sum(counts)]:
        counts[i] += 1
    assert sorted(ratios, reverse=True) == [ratios[i] for i in sorted(range(3), key=lambda i: counts[i])]
    return counts


def test_owl_counts_match_hand_computation_on_one_and_two_ranks(three_layers, text_file, tmp_path):
    ids = tokenize(text_file.read_text(), AutoTokenizer.from_pretrained(three_layers))
    calib = calibration_windows(ids, 4, SEQ, seed=0, source="t")
    for world in (1, 2):
        run_on_ranks(_run, world, str(three_layers), str(tmp_path), calib)
    expected = _hand_budgets(three_layers, calib)
    prunable = sum(t.numel() for n, t in load_file(three_layers / "model.safetensors").items()
                   if ".layers." in n and t.ndim == 2)
    assert sum(expected) == math.floor(SPARSITY * prunable + 0.5)
    for case in CASES:
        one, two = load_file(tmp_path / f"w1-{case}" / "model.safetensors"), load_file(tmp_path / f"w2-{case}" / "model.safetensors")
        for name in one:
            if case in RECONSTRUCTIONS:
                assert ((one[name] == 0) != (two[name] == 0)).float().mean() < 0.01, (case, name)
            else:
                assert torch.equal(one[name], two[name]), (case, name)
        zeros = [sum(int((t == 0).sum()) for n, t in two.items() if f".layers.{layer}." in n and t.ndim == 2)
                 for layer in range(3)]
        assert zeros == expected, case
        if case == "row":  # every row of a layer prunes floor or ceil of s_l * row length
            for name, t in two.items():
                if ".layers." in name and t.ndim == 2:
                    per_row = (t == 0).sum(1)
                    assert int(per_row.max() - per_row.min()) <= 1, name


@pytest.mark.parametrize("overrides, expected", [
    (["prune.layer_sparsity=owl", "prune.method=magnitude"], "use prune.method wanda"),
    (["prune.layer_sparsity=owl", "prune.scope=global"], "prune.scope must be layer or row"),
    (["prune.layer_sparsity=owl", "prune.sparsity=0.05"], "prune.owl_lambda must be in [0, 0.05]"),
    (["prune.layer_sparsity=owl", "prune.structure=2:4"], "needs prune.structure unstructured"),
    (["prune.layer_sparsity=outliers"], "prune.layer_sparsity 'outliers' is unknown (allowed: uniform, owl)"),
])
def test_owl_config_mistakes_exit_2(overrides, expected, capsys):
    assert main(["run", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: config: ") and "\n" not in err and expected in err, err
