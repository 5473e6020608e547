"""Is a model with whole heads / channels removed faster? Forward latency, dense vs shrunk.

Builds SmolLM2-135M's shape from a LlamaConfig (30 layers, hidden 576, 9 query / 3 KV heads of 64,
intermediate 1536, vocabulary 49152, tied embeddings) with random weights; chooses the groups to
remove with dist-prune's own pooling and selection (magnitude scores, L2 per group:
`structural.pool_partial` + `structural.choose`) and shrinks the weights and config with the
`ShrinkPlan` that the export uses. Variants:

  dense
  heads            1 of 3 KV groups per layer (9 -> 6 query heads, 3 -> 2 KV heads)
  channels         35% of the MLP channels (1536 -> 998)
  heads+channels   both: 1 of 3 KV groups and 20% of the channels (1536 -> 1229)

Timing: `model(input_ids)` under inference_mode, batch 1 x --seq tokens (prefill), fp32, --threads
torch threads; one warm-up, then --repeats rounds in which every variant runs once (round-robin,
so that load from other processes hits all variants alike); medians reported.

    .venv/bin/python benchmarks/structural_speed.py [--seq 256] [--repeats 7] [--threads 1]

Writes benchmarks/results/structural_speed.json and structural_speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_prune.structural import UNITS, Geometry, ShrinkPlan, choose, pool_partial, projection, removed_count
from threshold import cpu_seconds, machine

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0)
VARIANTS = {"dense": [], "heads": [("heads", 1 / 3)], "channels": [("channels", 0.35)],
            "heads+channels": [("heads", 1 / 3), ("channels", 0.2)]}


def shrink(state: dict[str, torch.Tensor], config: dict, kind: str, sparsity: float) -> tuple[dict, dict]:
    """Remove the lowest-L2 groups of `kind` from a full state dict, as a one-rank job would."""
    geometry, unit = Geometry.of(config), UNITS[kind]
    scores = torch.zeros(geometry.layers, unit.groups(geometry), dtype=torch.float64)
    for name, tensor in state.items():
        found = projection(name)
        if found and found[2] == "weight" and found[1] in unit.members:
            scores[found[0]] += pool_partial(tensor.reshape(-1).abs(), 0, tensor.shape, unit.members[found[1]],
                                             geometry, scores.shape[1], square=True)
    plan = ShrinkPlan(kind, geometry, choose(scores.sqrt().float(), removed_count(kind, sparsity, geometry),
                                             unit.scope))
    shrunk = {plan.exported(n, tuple(t.shape))[0]: plan.shrink(n, t) for n, t in state.items()
              if plan.exported(n, tuple(t.shape))}
    return shrunk, plan.config(config)


def build(steps: list[tuple[str, float]], dense: LlamaForCausalLM) -> LlamaForCausalLM:
    state, config = dense.state_dict(), dense.config.to_dict()
    for kind, sparsity in steps:
        state, config = shrink(state, config, kind, sparsity)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k in SMOLLM2_135M}))
    model.load_state_dict(state, strict=True)  # tied lm_head is absent from neither side
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    models = {name: build(steps, dense) if steps else dense for name, steps in VARIANTS.items()}
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in models}
    (busy0, own0), start = cpu_seconds(), time.perf_counter()
    with torch.inference_mode():
        for model in models.values():
            model(ids)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(ids)
                times[name].append(time.perf_counter() - t0)
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - start
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rows = [{"variant": name, "config": {k: models[name].config.to_dict()[k] for k in
                                         ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
             "parameters": params[name], "removed_fraction": 1 - params[name] / params["dense"],
             "median_s": statistics.median(t), "min_s": min(t), "seconds": t,
             "speedup": statistics.median(times["dense"]) / statistics.median(t)} for name, t in times.items()]
    info = dict(machine(), torch_threads=args.threads, seq_len=args.seq, batch=1, repeats=args.repeats,
                other_processes_cpu_seconds=round((busy1 - busy0) - (own1 - own0), 1), timed_wall_s=round(wall, 1))
    info.pop("torch_threads_1_process", None), info.pop("torch_threads_per_rank", None)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structural_speed.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = ["| variant | heads (q/kv) | intermediate | parameters | removed | median s | min s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        lines.append(f"| {r['variant']} | {c['num_attention_heads']}/{c['num_key_value_heads']} | "
                     f"{c['intermediate_size']} | {r['parameters']:,} | {r['removed_fraction']:.1%} | "
                     f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['speedup']:.2f}x |")
    text = (f"# Forward latency, dense vs structurally pruned (SmolLM2-135M shape, random weights)\n\n"
            f"`.venv/bin/python benchmarks/structural_speed.py --seq {args.seq} --repeats {args.repeats} "
            f"--threads {args.threads}`: batch 1 x {args.seq} tokens, fp32, median of {args.repeats} "
            f"round-robin rounds.\n\n" + "\n".join(lines) + "\n\nMachine: " + json.dumps(info) + "\n")
    (RESULTS / "structural_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
