"""Whole heads, channels and layers (dist_prune/structural.py, dist_prune/infogain.py): group scores
on hand-made matrices, the infogain loss against explicit ablations, and the worker recipe on 1 and
2 gloo ranks: identical choices, an export that `from_pretrained` loads with smaller shapes and an
updated config.json, and that computes what the masked model inside the job computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dist_prune.cli import main
from dist_prune.config import load_config, to_dict
from dist_prune.data import calibration_windows, eval_windows, tokenize
from dist_prune.errors import UserError
from dist_prune.infogain import GroupLossCollector
from dist_prune.job import prepare
from dist_prune.structural import UNITS, Geometry, Member, Structural, choose, pool_partial
from dist_prune.worker import WorkerJob, run_worker
from multirank import run_on_ranks
from test_worker import _hf_perplexity

SEQ = 16
# tiny_llama: 2 layers, hidden 64, 4 query heads and 2 KV heads of head_dim 16, intermediate 96
CASES = {  # name -> overrides
    "heads-magnitude-l2": ["prune.method=magnitude", "prune.structure=heads", "prune.norm=l2",
                           "prune.sparsity=0.5"],
    "channels-wanda": ["prune.method=wanda", "prune.structure=channels", "prune.sparsity=0.25"],
    "layers-taylor": ["prune.method=taylor", "prune.structure=layers", "prune.sparsity=0.5"],
    "heads-infogain": ["prune.method=infogain", "prune.structure=heads", "prune.sparsity=0.5"],
    "channels-infogain": ["prune.method=infogain", "prune.structure=channels", "prune.sparsity=0.3"],
    "layers-infogain": ["prune.method=infogain", "prune.structure=layers", "prune.sparsity=0.5"],
    # a method with statistics of the full tensors (weight_stats) ranking whole groups
    "channels-ria": ["prune.method=ria", "prune.structure=channels", "prune.sparsity=0.25"],
}
GEOMETRY = Geometry(layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96)


# --- pure functions --------------------------------------------------------------------------------


def test_group_scores_known_answer():
    g = Geometry(layers=1, heads=4, kv_heads=2, head_dim=1, intermediate=3)  # n_rep 2: 2 q rows per group
    q = torch.arange(12, dtype=torch.float32).view(4, 3)  # rows 0-1: group 0, rows 2-3: group 1
    rows = Member(0, lambda g: g.head_dim * g.n_rep)
    assert pool_partial(q.reshape(-1), 0, (4, 3), rows, g, 2).tolist() == [0 + 1 + 2 + 3 + 4 + 5, 6 + 7 + 8 + 9 + 10 + 11]
    # the same sums from two ZeRO-style slices, one of them splitting row 1
    parts = pool_partial(q.reshape(-1)[:5], 0, (4, 3), rows, g, 2) + pool_partial(q.reshape(-1)[5:], 5, (4, 3), rows, g, 2)
    assert parts.tolist() == [15, 51]
    o = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # columns 0-1: group 0
    cols = Member(1, lambda g: g.head_dim * g.n_rep)
    assert pool_partial(o.reshape(-1), 0, (2, 4), cols, g, 2, square=True).tolist() == [1 + 4 + 25 + 36, 9 + 16 + 49 + 64]
    down = torch.tensor([[1.0, -2.0, 3.0]])  # channels: one column each
    channel = Member(1, lambda g: 1)
    assert pool_partial(down.reshape(-1)[1:].abs(), 1, (1, 3), channel, g, 3).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="exceeds"):
        pool_partial(down.reshape(-1), 1, (1, 3), channel, g, 3)
    whole = Member(0, lambda g: 0)
    assert pool_partial(q.reshape(-1), 0, (4, 3), whole, g, 1).tolist() == [66]
    unit = UNITS["heads"].config(GEOMETRY, 1)
    assert unit == {"num_key_value_heads": 1, "num_attention_heads": 2, "head_dim": 16}


def test_choose_ties_by_index():
    scores = torch.tensor([[1.0, 0.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert choose(scores, 2, "layer").tolist() == [[False, True, True, False], [True, True, False, False]]
    layers = torch.tensor([[5.0], [1.0], [1.0], [0.0]])
    assert choose(layers, 2, "global").view(-1).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="NaN"):
        choose(torch.tensor([[float("nan"), 1.0]]), 1, "layer")


# --- infogain against explicit ablations --------------------------------------------------------


def _tiny_hf(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _captured(model, ids, module) -> torch.Tensor:
    """Output of `module` (or, for a decoder layer, output minus input) in a forward pass."""
    seen = {}

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen["y"] = out - args[0] if mod is model.model.layers[0] else out

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["y"].double()


@pytest.mark.parametrize("kind", ["heads", "channels", "layers"])
def test_infogain_loss_equals_explicit_ablation(kind):
    model, ids = _tiny_hf(), torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    geometry = Geometry.of(model.config)
    layer = model.model.layers[0]
    names = {f"model.layers.0.{proj}.weight": model.get_submodule(f"model.layers.0.{proj}")
             for proj in UNITS[kind].members}
    with GroupLossCollector(names, structure=Structural(kind), geometry=geometry) as collector:
        with torch.no_grad():
            model(ids)
    (loss,) = [v["group_loss"] for v in collector.reduce().values()]
    watched = {"heads": layer.self_attn.o_proj, "channels": layer.mlp.down_proj, "layers": layer}[kind]
    dense = _captured(model, ids, watched)
    expected = []
    for g in range(UNITS[kind].groups(geometry)):
        ablated = _tiny_hf()
        a = ablated.model.layers[0]
        with torch.no_grad():
            if kind == "heads":  # KV group g: q rows and o columns of its 2 query heads, k/v rows
                q = slice(g * 2 * geometry.head_dim, (g + 1) * 2 * geometry.head_dim)
                kv = slice(g * geometry.head_dim, (g + 1) * geometry.head_dim)
                a.self_attn.q_proj.weight[q] = 0
                a.self_attn.k_proj.weight[kv] = 0
                a.self_attn.v_proj.weight[kv] = 0
                a.self_attn.o_proj.weight[:, q] = 0
            elif kind == "channels":
                a.mlp.gate_proj.weight[g] = 0
                a.mlp.up_proj.weight[g] = 0
                a.mlp.down_proj.weight[:, g] = 0
            else:  # the layer adds nothing: its output is its input
                a.self_attn.o_proj.weight.zero_()
                a.mlp.down_proj.weight.zero_()
        watched_ablated = {"heads": a.self_attn.o_proj, "channels": a.mlp.down_proj, "layers": a}[kind]
        after = _captured(ablated, ids, watched_ablated)
        expected.append(((after - dense).square().sum() if kind != "layers" else dense.square().sum()).item())
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert len({f"{x:.6g}" for x in expected}) == len(expected) and min(expected) > 0  # groups differ


# --- the recipe on 1 and 2 ranks ------------------------------------------------------------------


def _run_cases(model_dir: str, out_dir: str, calib, evalw) -> dict:
    results = {}
    world = torch.distributed.get_world_size()
    for name, overrides in CASES.items():
        cfg = load_config(None, [f"model.path={model_dir}", *overrides, f"data.calibration.seq_len={SEQ}",
                                 f"eval.seq_len={SEQ}", "data.calibration.batch_size=2"])
        job = WorkerJob(to_dict(cfg), model_dir, calib, evalw, f"{out_dir}/w{world}-{name}",
                        {"method": cfg.prune.method, "structure": cfg.prune.structure})
        results[name] = run_worker(job)
    return results if torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def runs(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("structural")
    ids = tokenize(text_file.read_text(), AutoTokenizer.from_pretrained(tiny_llama))
    calib = calibration_windows(ids, 4, SEQ, seed=0, source="t")
    evalw = eval_windows(ids, 4, SEQ, source="t")
    metrics = {w: run_on_ranks(_run_cases, w, str(tiny_llama), str(out), calib, evalw)[0] for w in (1, 2)}
    return out, metrics, evalw


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _masked_reference(model_dir: Path, kind: str, removed: dict[str, list[int]]) -> LlamaForCausalLM:
    """The dense model with the removed groups zeroed, as the job masks them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = Geometry.of(model.config)
    with torch.no_grad():
        for layer, groups in removed.items():
            block = model.model.layers[int(layer)]
            for j in groups:
                if kind == "heads":
                    q = slice(j * g.n_rep * g.head_dim, (j + 1) * g.n_rep * g.head_dim)
                    kv = slice(j * g.head_dim, (j + 1) * g.head_dim)
                    for w, rows in ((block.self_attn.q_proj.weight, q), (block.self_attn.k_proj.weight, kv),
                                    (block.self_attn.v_proj.weight, kv)):
                        w[rows] = 0
                    block.self_attn.o_proj.weight[:, q] = 0
                elif kind == "channels":
                    block.mlp.gate_proj.weight[j] = 0
                    block.mlp.up_proj.weight[j] = 0
                    block.mlp.down_proj.weight[:, j] = 0
                else:
                    block.self_attn.o_proj.weight.zero_()
                    block.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_same_choice_on_one_and_two_ranks(runs, case):
    out, metrics, _ = runs
    one, two = _weights(out / f"w1-{case}"), _weights(out / f"w2-{case}")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    manifests = [json.loads((out / f"w{w}-{case}" / "sparsity.json").read_text()) for w in (1, 2)]
    assert manifests[0]["structural"] == manifests[1]["structural"]
    assert metrics[1][case]["pruned"] == metrics[2][case]["pruned"]
    assert metrics[1][case]["perplexity_sparse"] == pytest.approx(metrics[2][case]["perplexity_sparse"], rel=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_shrunk_and_matches_the_masked_model(runs, case, tiny_llama):
    out, metrics, evalw = runs
    kind = case.split("-")[0]
    directory = out / f"w2-{case}"
    manifest = json.loads((directory / "sparsity.json").read_text())
    removed = manifest["structural"]["removed_groups"]
    k = {"heads": 1, "channels": round(float(CASES[case][-1].split("=")[1]) * 96), "layers": 1}[kind]
    assert all(len(groups) == (k if kind != "layers" else 1) for groups in removed.values())
    assert len(removed) == (2 if kind != "layers" else k)

    model = AutoModelForCausalLM.from_pretrained(directory)
    c = model.config
    expected = {"heads": dict(num_key_value_heads=1, num_attention_heads=2, head_dim=16, intermediate_size=96,
                              num_hidden_layers=2),
                "channels": dict(num_key_value_heads=2, num_attention_heads=4, intermediate_size=96 - k,
                                 num_hidden_layers=2),
                "layers": dict(num_key_value_heads=2, num_attention_heads=4, intermediate_size=96,
                               num_hidden_layers=1)}[kind]
    assert {key: getattr(c, key) for key in expected} == expected
    layer = model.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (16 * c.num_attention_heads, 64)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (16 * c.num_key_value_heads, 64)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (64, 16 * c.num_attention_heads)
    assert tuple(layer.mlp.down_proj.weight.shape) == (64, c.intermediate_size)
    dense_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    removed_params = {"heads": 2 * (2 * 32 * 64 + 2 * 16 * 64),  # 2 layers: q rows + o columns, k + v rows
                      "channels": 2 * 3 * 64 * k,  # 2 layers: gate + up rows, down columns
                      # one layer: q, o (64x64), k, v (32x64), gate, up, down (96x64), two norms (64)
                      "layers": 2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64 + 2 * 64}[kind]
    assert sum(p.numel() for p in model.parameters()) == dense_params - removed_params
    assert metrics[2][case]["parameters_after"] == dense_params - removed_params
    assert metrics[2][case]["removed_fraction"] == pytest.approx(removed_params / dense_params)

    # the shrunk export computes what the masked model computes
    reference = _masked_reference(tiny_llama, kind, removed)
    ids = evalw[:2]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    assert _hf_perplexity(model, evalw) == pytest.approx(metrics[2][case]["perplexity_sparse"], rel=1e-5)

    # the manifest: pruned = removed elements of the targets, sparsity of the targets overall
    targets = sum(t["numel"] + t.get("removed", 0) for t in manifest["tensors"].values() if t["pruned"])
    dropped = sum(manifest["dropped_tensors"].values())
    assert metrics[2][case]["pruned"] == sum(manifest["pruned_counts"].values())
    assert manifest["overall_sparsity"] == pytest.approx(metrics[2][case]["pruned"] / (targets + dropped))
    assert metrics[2][case]["sparsity"] == pytest.approx(manifest["overall_sparsity"])


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["prune.structure=heads", "prune.sparsity=0.9"], "removes 2 of 2 KV head groups per layer"),
    (["prune.structure=channels", "prune.sparsity=0.001"], "removes 0 of 96 MLP channels per layer"),
    (["prune.structure=layers", "prune.method=magnitude", "prune.exclude=['*layers.1.mlp*']"],
     "prune.exclude matches model.layers.1.mlp.gate_proj.weight"),
])
def test_model_level_mistakes_are_one_line(tiny_llama, tmp_path, overrides, expected):
    cfg = load_config(None, [f"model.path={tiny_llama}", f"export.dir={tmp_path / 'x'}", *overrides])
    with pytest.raises(UserError, match=expected.replace("[", r"\[")) as error:
        prepare(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, expected", [
    (["prune.structure=heads", "prune.scope=row"], "prune.scope row does not apply to prune.structure heads"),
    (["prune.structure=layers", "prune.scope=layer"], "(allowed: global, or leave it empty)"),
    (["prune.method=infogain", "prune.structure=unstructured"], "prune.method infogain scores whole groups"),
    (["prune.structure=channels", "prune.method=sparsegpt"], "cannot rank whole channels"),
])
def test_config_mistakes_exit_2(overrides, expected, capsys):
    assert main(["run", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: config: ") and "\n" not in err and expected in err, err
