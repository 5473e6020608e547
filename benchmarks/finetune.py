"""Sparse-NEFT fine-tuning benchmarks on 2 gloo ranks (the worker recipe, without Ray).

    python benchmarks/finetune.py speed    [--steps 8 --rounds 3 --seq-len 256]
    python benchmarks/finetune.py quality  [--steps 60 --arms wanda-a0,wanda-a5,...]

speed:   seconds per optimizer step of dense vs masked vs masked+NEFTune training of
         SmolLM2-135M on the same data, side by side in one run: the arms are interleaved
         round by round, the first step of each run is dropped (warm-up), medians reported.
quality: one-shot Wanda 50% (llm-compressor's targets: every Linear, lm_head and the tied
         embeddings included) then Sparse-NEFT fine-tuning on WikiText-2 valid for a fixed
         number of steps; perplexity on the 16 x 512 test windows before and after; gradual
         cubic pruning from dense with movement and SEVENdyn; the dense model tuned alike.
Results go to benchmarks/results/finetune_{speed,quality}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics

from _ranks import RESULTS, machine, run_job, run_ranks, tokens

WORLD = 2

SPEED_ARMS = {
    "dense": ["prune.sparsity=0.0", "finetune.neftune.alpha=0"],
    "masked": ["prune.sparsity=0.5", "finetune.neftune.alpha=0"],
    "masked+neftune": ["prune.sparsity=0.5", "finetune.neftune.alpha=5"],
}
PARITY = ["prune.exclude=['*norm*','*.bias']"]  # llm-compressor's Wanda targets (lm_head too)
QUALITY_ARMS = {
    "wanda50 + tune, alpha 0": ["prune.method=wanda", *PARITY, "finetune.neftune.alpha=0"],
    "wanda50 + tune, alpha 5": ["prune.method=wanda", *PARITY, "finetune.neftune.alpha=5"],
    "wanda50 + tune, dynamic alpha 5": ["prune.method=wanda", *PARITY, "finetune.neftune.alpha=5",
                                        "finetune.neftune.dynamic=true"],
    # The cubic arms re-select from scores gathered over a few steps. With llm-compressor's targets
    # they prune the tied embedding/lm_head too, and rows of tokens not yet seen score 0: that arm
    # collapsed (kept as measured). The others keep dist-prune's default targets.
    "cubic movement 0 -> 50%, embedding and lm_head pruned too": [
        "prune.method=movement", "prune.schedule=cubic", *PARITY, "finetune.neftune.alpha=5"],
    "cubic movement 0 -> 50%": ["prune.method=movement", "prune.schedule=cubic", "finetune.neftune.alpha=5"],
    "cubic SEVENdyn 0 -> 50%": ["prune.method=seven", "prune.schedule=cubic", "finetune.neftune.alpha=5"],
    "dense + tune (reference)": ["prune.method=magnitude", "prune.sparsity=0.0", "finetune.neftune.alpha=5"],
}


def _rank_main(rank: int, arms: dict, base: list[str], rounds: int, data: dict) -> dict:
    from dist_prune.train.state import Hooks

    results = {name: [] for name in arms}
    for round_index in range(rounds):
        for name, overrides in arms.items():
            rows = []
            metrics = run_job([*base, *overrides], data,
                              Hooks(log=lambda step, row: rows.append({"step": step, **row})))
            metrics.pop("finetune_history", None)
            results[name].append({"metrics": metrics, "rows": rows})
            if rank == 0:
                print(f"round {round_index} {name}: {json.dumps({k: v for k, v in metrics.items() if 'perplexity' in k or k.startswith('seconds')})}", flush=True)
    return results


def _run(arms: dict, base: list[str], rounds: int, data: dict) -> dict:
    return run_ranks(_rank_main, arms, base, rounds, data, world=WORLD)


def speed(args) -> None:
    from dist_prune.io.checkpoint import resolve_model

    data = tokens(resolve_model(None), training_seq_len=args.seq_len)
    data["calibration"] = data["evaluation"] = None  # magnitude, no evaluation: only the training is timed
    base = ["prune.method=magnitude", "prune.scope=layer", f"finetune.steps={args.steps}",
            f"finetune.data.seq_len={args.seq_len}", "finetune.log_interval=1", "finetune.lr=1e-4",
            "eval.num_windows=0", "eval.dense=false"]
    results = _run(SPEED_ARMS, base, args.rounds, data)
    table = {}
    for name, runs in results.items():
        per_step = [row["train/step_seconds"] for run in runs for row in run["rows"][1:]]  # drop warm-up
        table[name] = {"median_step_seconds": statistics.median(per_step), "steps_measured": len(per_step),
                       "runs": len(runs)}
    dense = table["dense"]["median_step_seconds"]
    for row in table.values():
        row["ratio_to_dense"] = row["median_step_seconds"] / dense
    report = {"machine": machine(WORLD), "model": "SmolLM2-135M-Instruct (fp32)", "seq_len": args.seq_len,
              "global_batch": f"{WORLD} windows (1 per rank)", "rounds": args.rounds, "steps": args.steps,
              "arms": table, "command": f"python benchmarks/finetune.py speed --steps {args.steps} "
                                        f"--rounds {args.rounds} --seq-len {args.seq_len}"}
    lines = [f"Machine: {report['machine']}. {report['model']}, {args.seq_len} tokens/window, "
             f"global batch {report['global_batch']}, {args.rounds} interleaved rounds x {args.steps} steps "
             "(first step of each run dropped).", "",
             "| arm | median s/step | ratio to dense |", "|---|---|---|"]
    lines += [f"| {name} | {row['median_step_seconds']:.3f} | {row['ratio_to_dense']:.3f} |"
              for name, row in table.items()]
    lines += ["", f"Command: `{report['command']}`"]
    _write("finetune_speed", report, lines)


def quality(args) -> None:
    """One arm per call of the recipe, each saved as soon as it ends (a long run can be
    continued: arms already measured with the same settings are skipped), then the table
    of every arm measured with these settings."""
    from dist_prune.io.checkpoint import resolve_model

    settings = {"steps": args.steps, "seq_len": args.seq_len, "lr": args.lr, "accumulation": args.accumulation}
    tag = "_".join(f"{k}{v}" for k, v in settings.items())
    arm_dir = RESULTS / "finetune_quality" / tag
    chosen = {k: v for k, v in QUALITY_ARMS.items() if not args.arms or k in args.arms.split("|")}
    # The dense model's perplexity is the reference arm's "after pruning" (its sparsity is 0),
    # so the other arms skip the dense evaluation (3 minutes each here).
    base = ["prune.sparsity=0.5", f"finetune.steps={args.steps}", f"finetune.data.seq_len={args.seq_len}",
            f"finetune.lr={args.lr}", "finetune.warmup_steps=5", "finetune.log_interval=5",
            f"finetune.gradient_accumulation_steps={args.accumulation}",
            f"prune.end_step={int(args.steps * 0.75)}", f"prune.interval={max(1, args.steps // 8)}",
            "eval.num_windows=16", "eval.seq_len=512", "eval.dense=false"]
    data = None
    for name, overrides in chosen.items():
        if args.table:
            break
        path = arm_dir / f"{_slug(name)}.json"
        if path.exists():
            print(f"{name}: already measured ({path.relative_to(RESULTS)})")
            continue
        data = data or tokens(resolve_model(None), training_seq_len=args.seq_len)
        run = _run({name: overrides}, base, 1, data)[name][0]
        arm_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"arm": name, "overrides": [*base, *overrides], **settings,
                                    "metrics": run["metrics"], "rows": run["rows"]}, indent=2, default=str))
    _quality_table(arm_dir, settings, args.name)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _quality_table(arm_dir, settings: dict, name: str) -> None:
    arms = {a["arm"]: a for a in (json.loads(p.read_text()) for p in sorted(arm_dir.glob("*.json")))}
    arms = {k: arms[k] for k in QUALITY_ARMS if k in arms}  # the order of QUALITY_ARMS
    reference_arm = arms.get("dense + tune (reference)", {})
    reference = reference_arm.get("metrics", {})
    dense = reference.get("perplexity_pruned", float("nan"))
    tuned = reference.get("perplexity_sparse", float("nan"))  # the dense model, tuned alike
    report = {"machine": machine(WORLD), "model": "SmolLM2-135M-Instruct (fp32)", **settings,
              "perplexity_dense": dense, "arms": arms}
    lines = [f"Machine: {report['machine']}. Budget: {settings['steps']} steps x "
             f"{WORLD * settings['accumulation']} windows x {settings['seq_len']} tokens of WikiText-2 valid, "
             f"lr {settings['lr']}; perplexity on 16 x 512 test windows. Dense model: {dense:.2f}.",
             "", "| arm | after pruning | after tuning | gap recovered | of the gap to dense tuned | sparsity | "
                 "tune seconds |", "|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        m = a["metrics"]
        before, after = m.get("perplexity_pruned", dense), m["perplexity_sparse"]  # cubic: starts dense
        shares = [(before - after) / (before - ref) if before - ref > 1e-6 and a is not reference_arm and "perplexity_pruned" in m
                  else float("nan") for ref in (dense, tuned)]
        lines.append(f"| {arm} | {before:.2f} | {after:.2f} | "
                     + " | ".join("—" if x != x else f"{x:.0%}" for x in shares) + " | "
                     f"{m['sparsity']:.4f} | {m.get('seconds_finetune', 0):.0f} |")
    report["command"] = (f"python benchmarks/finetune.py quality --steps {settings['steps']} "
                         f"--seq-len {settings['seq_len']} --lr {settings['lr']} "
                         f"--accumulation {settings['accumulation']}")
    lines += ["", "\"Gap recovered\" is (after pruning − after tuning) / (after pruning − dense); \"of the gap to "
              "dense tuned\" divides by (after pruning − the dense model tuned with the same budget) instead, "
              "since tuning on WikiText-2 also adapts the instruct model to WikiText. The cubic arms start "
              "dense, so neither applies to them. Tune seconds include the machine's other load at the time "
              "(this 2-core machine was shared with other jobs during some arms).",
              "", f"Command (repeat until every arm is measured): `{report['command']}`"]
    _write(name, report, lines)


def _write(name: str, report: dict, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--seq-len", type=int, default=256)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=60)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--accumulation", type=int, default=1)
    q.add_argument("--arms", default="", help="'|'-separated arm names (default: all)")
    q.add_argument("--name", default="finetune_quality", help="results file name")
    q.add_argument("--table", action="store_true", help="only rebuild the table of the arms measured so far")
    args = parser.parse_args()
    {"speed": speed, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
