"""Gradient statistics under a short-lived ZeRO-3 engine equal plain autograd on one
process, on 1 and 2 ranks, and the model comes back exactly as it went in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tokenizer, sample_text
from multirank import run_on_ranks

BETAS = (0.8, 0.9)
NUM_WINDOWS, SEQ_LEN = 5, 12
# gate/up/down are 37x33: odd sizes, so on 2 ranks the last partition ends in padding
CHECKED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
           "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight",
           "lm_head.weight"]


def _model_hooks(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            if getattr(m, d, None):
                found.append(f"{name or '<root>'}.{d}")
    for name, p in model.named_parameters():
        if getattr(p, "_post_accumulate_grad_hooks", None) or getattr(p, "_backward_hooks", None):
            found.append(f"{name}.grad_hooks")
    return found


def _layer0_outputs(model, windows):
    from dist_prune.layerwise import LayerRunner

    runner = LayerRunner(model)
    return [b.hidden.clone() for b in runner.run_layer(0, runner.start(windows))]


def _gradient_stats(model_dir: str, windows: torch.Tensor, micro_batch: int, calls: int) -> dict:
    from dist_prune.io.checkpoint import open_checkpoint
    from dist_prune.collectives import rank_and_world
    from dist_prune.data import shard
    from dist_prune.gradients import accumulate_gradient_stats
    from dist_prune.masking import find_targets
    from dist_prune.sharding.partition import build_partitioned_model, local_range, local_weight

    rank, world = rank_and_world()
    mine = shard(windows, rank, world)
    model = build_partitioned_model(Path(model_dir), open_checkpoint(Path(model_dir)), torch.float32)
    targets = find_targets(model, [])
    before = {n: local_weight(p).clone() for n, p in model.named_parameters()}
    hooks_before = _model_hooks(model)
    layer0_before = _layer0_outputs(model, mine)
    results = [accumulate_gradient_stats(model, mine, targets, seven_betas=BETAS, micro_batch=micro_batch)
               for _ in range(calls)]
    return {
        "stats": [{n: r[n] for n in CHECKED} for r in results],
        "lengths": {t.name: {k: v.numel() for k, v in results[0][t.name].items() if k != "steps"}
                    for t in targets},
        "ranges": {t.name: local_range(t.param) for t in targets},
        "partition_sizes": {t.name: t.param.ds_tensor.numel() for t in targets},
        "unchanged": all(torch.equal(local_weight(p), before[n]) for n, p in model.named_parameters()),
        "hooks_before": hooks_before,
        "hooks_after": _model_hooks(model),
        "ds_attrs_after": sorted({k for m in model.modules() for k in vars(m)
                                  if k.startswith(("ds_", "_original_parameters", "pre_bwd", "post_bwd"))}
                                 | {k for p in model.parameters() for k in vars(p) if k == "_z3_optimizer"}),
        "plain_parameters": all(type(m._parameters) is dict for m in model.modules()),
        "requires_grad": all(p.requires_grad for p in model.parameters()),
        "training": model.training,
        "layer0_same": all(torch.equal(a, b) for a, b in zip(layer0_before, _layer0_outputs(model, mine))),
    }


def _reference(model_dir: Path, windows: torch.Tensor, world: int, micro_batch: int) -> dict:
    """Plain transformers autograd on one process: step s is the s-th micro-batch of every
    rank's shard together, loss = mean next-token NLL per token of that global batch."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    weights = [params[n] for n in CHECKED]
    shards = [windows[r::world] for r in range(world)]
    steps = max(-(-len(s) // micro_batch) for s in shards)
    b1, b2 = BETAS
    acc = {n: {k: torch.zeros(params[n].numel()) for k in ("grad_sum", "grad_sq_sum", "seven", "m", "v",
                                                             "token_sq", "token_abs", "token_sum")}
           for n in CHECKED}
    modules = dict(model.named_modules())
    seen = {}  # per step: each checked linear's input x and output y, whole batch
    for n in CHECKED:
        modules[n.removesuffix(".weight")].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, (i[0].reshape(-1, i[0].shape[-1]), o)))
    for s in range(steps):
        batch = torch.cat([sh[s * micro_batch: (s + 1) * micro_batch] for sh in shards])
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        outputs = [seen[n][1] for n in CHECKED]
        *grads, = torch.autograd.grad(loss, weights + outputs)
        grads, deltas = grads[:len(CHECKED)], grads[len(CHECKED):]
        for n, delta in zip(CHECKED, deltas):  # one token at a time, by hand
            x, delta = seen[n][0].detach(), delta.reshape(-1, delta.shape[-1])
            for t in range(x.shape[0]):
                per_token = torch.outer(delta[t], x[t]).reshape(-1)
                acc[n]["token_sq"] += per_token.square()
                acc[n]["token_abs"] += per_token.abs()
                acc[n]["token_sum"] += per_token
        for n, w, g in zip(CHECKED, weights, grads):
            g, w, a = g.reshape(-1), w.detach().reshape(-1), acc[n]
            a["grad_sum"] += g
            a["grad_sq_sum"] += g * g
            a["m"] = b1 * a["m"] + (1 - b1) * g.abs()
            a["v"] = b2 * a["v"] + (1 - b2) * g * g
            m_hat = a["m"] / (1 - b1 ** (s + 1))
            v_hat = (a["v"] / (1 - b2 ** (s + 1))).sqrt() + 1e-9
            a["seven"] += (w * g.abs() * m_hat / v_hat).abs()
    for n in CHECKED:  # the per-token terms add up to the step gradients: the deltas are the loss's
        assert torch.allclose(acc[n]["token_sum"], acc[n]["grad_sum"], rtol=1e-4, atol=1e-7), n
    return {"steps": steps, "stats": acc}


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 33, MLP 37x33: odd numels, padded partitions on 2 ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("odd-llama")
    tokenizer = make_tokenizer(directory, sample_text()[:20_000])  # a small vocabulary is enough
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=33, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def windows(odd_llama) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(odd_llama)(sample_text()[:4000])["input_ids"]
    return torch.tensor(ids[: NUM_WINDOWS * SEQ_LEN]).reshape(NUM_WINDOWS, SEQ_LEN)


# world 1: micro-batches of 2 -> steps of 2, 2, 1 windows; world 2: 1 window per rank and
# step -> rank 0 has 3 windows, rank 1 has 2 and runs one zero-loss padding step.
@pytest.mark.parametrize("world,micro_batch,calls", [(1, 2, 1), (2, 1, 2)])
def test_gradient_stats_match_autograd(odd_llama, windows, world, micro_batch, calls):
    results = run_on_ranks(_gradient_stats, world, str(odd_llama), windows, micro_batch, calls)
    ref = _reference(odd_llama, windows, world, micro_batch)
    padded = 0
    for rank, res in enumerate(results):
        assert res["unchanged"], "the lr=0 optimizer changed a partition"
        assert res["hooks_before"] == [] and res["hooks_after"] == []
        assert res["ds_attrs_after"] == [] and res["plain_parameters"]
        assert res["requires_grad"] and not res["training"] and res["layer0_same"]
        for name, (start, stop) in res["ranges"].items():
            assert set(res["lengths"][name].values()) == {stop - start}, name
            padded += res["partition_sizes"][name] - (stop - start)
        for call in res["stats"]:
            for name in CHECKED:
                start, stop = res["ranges"][name]
                got, want = call[name], ref["stats"][name]
                assert int(call[name]["steps"]) == ref["steps"]
                for key in ("grad_sum", "grad_sq_sum", "seven", "token_sq", "token_abs"):
                    expected = want[key][start:stop]
                    scale = expected.abs().max().item()
                    assert torch.allclose(got[key], expected, rtol=1e-4, atol=1e-6 * scale), (world, rank, name, key)
        if len(res["stats"]) > 1:  # a second engine on the restored model gives the same numbers
            for name in CHECKED:
                for key in ("grad_sum", "grad_sq_sum", "seven", "token_sq", "token_abs"):
                    assert torch.allclose(res["stats"][0][name][key], res["stats"][1][name][key],
                                          rtol=1e-6, atol=0)
    assert (padded > 0) == (world == 2)  # the padded tails were cut off the gradients


def test_step_plan():
    from dist_prune.gradients import step_plan

    # ranks with 3 and 2 windows of 12 tokens, 1 per step: the last step has only rank 0's
    assert step_plan([3, 2], [12, 12], 1) == [22, 22, 11]
    assert step_plan([5], [12], 2) == [22, 22, 11]
    assert step_plan([0, 1], [12, 12], 4) == [11]
    assert step_plan([0, 0], [12, 12], 1) == []
