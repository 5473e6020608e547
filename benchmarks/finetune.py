"""Sparse-NEFT fine-tuning benchmarks on 2 gloo ranks (the worker recipe, without Ray).

    python benchmarks/finetune.py speed    [--steps 8 --rounds 3 --seq-len 256]
    python benchmarks/finetune.py profile  [--steps 4 --seq-len 256]
    python benchmarks/finetune.py quality  [--steps 120 --arms 'wanda 50%, alpha 0|...']

speed:   seconds per optimizer step of plain PyTorch (one process; DDP) and of dist-prune's
         dense, masked and masked+NEFTune training of SmolLM2-135M at each ZeRO stage, on the
         same tokens per step, side by side in one run: the arms are interleaved round by
         round, the first step of each run is dropped (warm-up), medians reported.
quality: the recovery benchmark (benchmarks/_recovery.py): one-shot Wanda and SparseGPT 50%,
         gradual cubic pruning from dense, with and without NEFTune noise and distillation, the
         dense model tuned alike, all with the same budget; perplexity on WikiText-2 test and on
         the out-of-domain fortunes text before, during and after tuning.
Results go to benchmarks/results/finetune_speed.{json,md} and recovery.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import _recovery as recovery
from _plain_torch import ddp_steps, matmul_gflops, plain_steps
from _ranks import RESULTS, machine, run_job, run_ranks, tokens

WORLD = 2
PARAMETERS = 134_515_008  # SmolLM2-135M
PLAIN = "plain PyTorch, 1 process x 2 threads"
DDP = "plain PyTorch DDP, 2 gloo ranks x 1 thread"

SPEED_ARMS = {  # dist-prune's arms, each at every ZeRO stage it supports (STAGES)
    "dense": ["prune.sparsity=0.0", "finetune.neftune.alpha=0"],
    "masked": ["prune.sparsity=0.5", "finetune.neftune.alpha=0"],
    "masked+neftune": ["prune.sparsity=0.5", "finetune.neftune.alpha=5"],
}
STAGES = (0, 2, 3)
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


def _timed_training(args) -> tuple[dict, list[str]]:
    """The windows and the config overrides of a run in which only the training is timed:
    magnitude (no calibration), no evaluation, every step logged."""
    from dist_prune.io.checkpoint import resolve_model

    data = tokens(resolve_model(None), training_seq_len=args.seq_len)
    data["calibration"] = data["evaluation"] = None
    data["more_evaluation"] = {}
    base = ["prune.method=magnitude", "prune.scope=layer", f"finetune.steps={args.steps}",
            f"finetune.data.seq_len={args.seq_len}", "finetune.log_interval=1", "finetune.lr=1e-4",
            "eval.num_windows=0", "eval.dense=false"]
    return data, base


def _ddp_main(rank: int, model_dir: str, windows, steps: int) -> list[float]:
    return ddp_steps(rank, model_dir, windows, steps)


def speed(args) -> None:
    """Seconds per optimizer step, side by side in one run on the same tokens per step (one
    window of --seq-len per rank, 2 per step): plain PyTorch in one process with 2 threads, plain
    PyTorch DDP on 2 gloo ranks x 1 thread, and dist-prune's arms at each ZeRO stage. Rounds are
    interleaved; the first step of each run is dropped (warm-up); medians over the rest."""
    from dist_prune.io.checkpoint import resolve_model

    model_dir = str(resolve_model(None))
    data, base = _timed_training(args)
    windows = data["training"]
    stages = [int(x) for x in args.stages.split(",")]
    chosen = [a for a in SPEED_ARMS if not args.arms or a in args.arms.split(",")]
    arms = {f"dist-prune {name}, ZeRO {stage}": [*SPEED_ARMS[name], f"finetune.zero_stage={stage}"]
            for stage in stages for name in chosen}
    # one worker with both cores: no gradient all-reduce at all; its 2 windows go in one forward
    single = {f"dist-prune {name}, 1 worker x {WORLD} threads, ZeRO 0": [
        *SPEED_ARMS[name], "finetune.zero_stage=0", f"finetune.micro_batch_size={WORLD}"]
        for name in chosen} if args.single_worker else {}
    steps: dict[str, list[float]] = {PLAIN: [], DDP: [], **{name: [] for name in [*arms, *single]}}
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        steps[PLAIN] += plain_steps(model_dir, windows, args.steps, WORLD, threads=WORLD)[1:]
        steps[DDP] += run_ranks(_ddp_main, model_dir, windows, args.steps, world=WORLD)[1:]
        measured = _run(arms, base, 1, data)
        if single:
            measured.update(run_ranks(_rank_main, single, base, 1, data, world=1, threads=WORLD))
        for name, runs in measured.items():
            steps[name] += [row["train/step_seconds"] for run in runs for row in run["rows"][1:]]
        print(f"round {round_index}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items()),
              flush=True)
    gflops = matmul_gflops(WORLD)
    floor = 6 * PARAMETERS * WORLD * args.seq_len / (gflops * 1e9)  # forward + backward FLOPs
    plain = statistics.median(steps[PLAIN])
    table = {name: {"median_step_seconds": statistics.median(v), "steps_measured": len(v),
                    "ratio_to_plain_pytorch": statistics.median(v) / plain,
                    "ratio_to_flop_floor": statistics.median(v) / floor} for name, v in steps.items()}
    report = {"machine": machine(WORLD), "model": "SmolLM2-135M-Instruct (fp32)", "seq_len": args.seq_len,
              "tokens_per_step": WORLD * args.seq_len, "rounds": args.rounds, "steps": args.steps,
              "load_average_1min_per_round": loads, "matmul_gflops_2_threads": gflops,
              "flop_floor_seconds": floor, "arms": table,
              "command": f"python benchmarks/finetune.py speed --steps {args.steps} --rounds {args.rounds} "
                         f"--seq-len {args.seq_len} --stages {args.stages}"
                         + (f" --arms {args.arms}" if args.arms else "")
                         + (" --single-worker" if args.single_worker else "") + f" --name {args.name}"}
    lines = [f"Machine: {report['machine']}; 1-minute load average at each round's start: "
             f"{', '.join(f'{x:.2f}' for x in loads)}. {report['model']}, {WORLD} windows x {args.seq_len} tokens "
             f"per step, AdamW, gradient clipping 1.0; {args.rounds} interleaved rounds x {args.steps} steps, "
             "the first step of each run dropped. FLOP floor: 6 x 135M x tokens at the "
             f"{gflops:.0f} GFLOP/s of a 2-thread 2048² fp32 matmul measured in the same run = {floor:.2f} s.", "",
             "| arm | median s/step | steps | ratio to plain PyTorch | ratio to the FLOP floor |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {row['median_step_seconds']:.3f} | {row['steps_measured']} | "
              f"{row['ratio_to_plain_pytorch']:.3f} | {row['ratio_to_flop_floor']:.2f} |"
              for name, row in table.items()]
    lines += ["", f"Command: `{report['command']}`"]
    _write(args.name, report, lines)


def _profile_main(rank: int, overrides: list[str], data: dict, rows: int) -> dict:
    """One dist-prune fine-tuning run under torch.profiler (CPU): the training loop only."""
    from torch.profiler import ProfilerActivity, profile

    import dist_prune.train.loop as loop
    from dist_prune.train.state import Hooks

    logged, out = [], {}
    plain_loop = loop._loop

    def profiled(*a, **k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            plain_loop(*a, **k)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
        out["ops"] = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
                       "calls": e.count} for e in top]
        out["self_cpu_s"] = total / 1e6

    loop._loop = profiled
    try:
        run_job(overrides, data, Hooks(log=lambda step, row: logged.append(row)))
    finally:
        loop._loop = plain_loop
    return {**out, "step_seconds": [row["train/step_seconds"] for row in logged]}


def profile_step(args) -> None:
    """Where a step's time goes: rank 0's CPU time per operator over --steps steps of
    masked+NEFTune training at each of --stages, written to finetune_speed_profile.md."""
    data, base = _timed_training(args)
    base += SPEED_ARMS["masked+neftune"]
    report = {"machine": machine(WORLD), "steps": args.steps, "seq_len": args.seq_len, "stages": {},
              "command": f"python benchmarks/finetune.py profile --steps {args.steps} --seq-len {args.seq_len}"
                         + (f" --stages {args.stages}" if args.stages != "2,3" else "")
                         + (f" --name {args.name}" if args.name != "finetune_speed_profile" else "")}
    lines = [f"Machine: {report['machine']}. Rank 0's self CPU time per operator (torch.profiler) over "
             f"{args.steps} steps of masked+NEFTune training of SmolLM2-135M, {WORLD} windows x {args.seq_len} "
             "tokens per step, the first (warm-up) step included.", ""]
    for stage in (int(x) for x in args.stages.split(",")):
        result = run_ranks(_profile_main, [*base, f"finetune.zero_stage={stage}"], data, 20, world=WORLD)
        report["stages"][stage] = result
        lines += [f"## ZeRO {stage}: {result['self_cpu_s']:.1f} s of CPU over the steps; seconds per step "
                  + ", ".join(f"{x:.2f}" for x in result["step_seconds"]), "",
                  "| operator | self CPU s | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_cpu_s']:.2f} | {o['share']:.1%} | {o['calls']} |" for o in result["ops"]]
        lines.append("")
    lines += [f"Command: `{report['command']}`"]
    _write(args.name, report, lines)


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
    s.add_argument("--stages", default=",".join(map(str, STAGES)), help="ZeRO stages (0 = plain data parallelism)")
    s.add_argument("--arms", default="", help=f"comma-separated among {', '.join(SPEED_ARMS)} (default: all)")
    s.add_argument("--single-worker", action="store_true",
                   help=f"also dist-prune on 1 worker x {WORLD} threads (stage 0, no all-reduce)")
    s.add_argument("--name", default="finetune_speed", help="results file name")
    pr = sub.add_parser("profile")
    pr.add_argument("--steps", type=int, default=4)
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--stages", default="2,3", help="ZeRO stages to profile (0 = plain data parallelism)")
    pr.add_argument("--name", default="finetune_speed_profile", help="results file name")
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=120)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--accumulation", type=int, default=1)
    q.add_argument("--eval-interval", type=int, default=20, help="perplexity on both texts every this many steps")
    q.add_argument("--arms", default="", help="'|'-separated arm names (default: all, in order)")
    q.add_argument("--name", default="recovery", help="results file name")
    q.add_argument("--table", action="store_true", help="only rebuild the table of the arms measured so far")
    q.add_argument("--tracking-uri", help="log the arms to this MLflow store (default: $MLFLOW_TRACKING_URI, "
                                          "if set)")
    args = parser.parse_args()
    {"speed": speed, "profile": profile_step, "quality": recovery.run}[args.part](args)


if __name__ == "__main__":
    main()
