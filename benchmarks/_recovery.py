"""The recovery benchmark (`python benchmarks/finetune.py quality`): one-shot and gradual pruning
of SmolLM2-135M to 50%, then Sparse-NEFT tuning with the same budget in every arm, perplexity on
WikiText-2 test AND on the out-of-domain fortunes text (nothing is calibrated or tuned on it)
before tuning, every --eval-interval steps and after.

Every arm is one job of the worker recipe on 2 spawned gloo ranks (benchmarks/_ranks.py, no Ray)
with dist-prune's default targets (embeddings and lm_head dense), saved as soon as it ends, so a
long run can be continued: arms already measured with the same settings are skipped. Then the
table, the curves (one panel per text, one line per arm) and, with --tracking-uri or
$MLFLOW_TRACKING_URI, an MLflow run per arm (the curves as step metrics) under one parent run
holding the table and the plot.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from _ranks import RESULTS, SECOND_TEXT, LoadSampler, machine, run_job, run_ranks, tokens, with_sampled_windows

WORLD = 2
SECOND = SECOND_TEXT.stem  # the metric suffix of the second text: perplexity_sparse.fortunes
TEXTS = {"": "WikiText-2 test", f".{SECOND}": "fortunes (out of domain)"}
REFERENCE = "dense, alpha 5 (reference)"
# the mixed recipe: each step half WikiText-2 valid on cross-entropy, half windows the dense model
# sampled itself (200 of them), distilled from it (beta 1, T 1; finetune.distill.windows=sampled)
MIX = ["finetune.data.generated_windows=200", "finetune.data.generated_share=0.5"]
MIX_DISTILLED = [*MIX, "finetune.distill.beta=1.0", "finetune.distill.temperature=1.0",
                 "finetune.distill.windows=sampled"]


def seven_by(end_step: int, interval: int | None = None, *more: str) -> list[str]:
    """Gradual SEVENdyn from dense to 50% by `end_step`, re-selected every `interval` steps, alpha 5,
    tuned on the distilled mix."""
    every = [] if interval is None else [f"prune.interval={interval}"]
    return ["prune.method=seven", "prune.schedule=cubic", *more, f"prune.end_step={end_step}", *every,
            "finetune.neftune.alpha=5", *MIX_DISTILLED]


ARMS = {  # name -> overrides; the reference first: every other arm is judged against it
    REFERENCE: ["prune.method=magnitude", "prune.sparsity=0.0", "finetune.neftune.alpha=5"],
    # the dense model tuned with the mixed recipe below (half WikiText-2 valid on cross-entropy, half
    # sampled windows distilled): what that recipe gives without pruning, its arms' like-for-like reference
    "dense, alpha 5, WikiText-2 + sampled text distilled": [
        "prune.method=magnitude", "prune.sparsity=0.0", "finetune.neftune.alpha=5", *MIX_DISTILLED],
    "wanda 50%, alpha 0": ["prune.method=wanda", "finetune.neftune.alpha=0"],
    "wanda 50%, alpha 5": ["prune.method=wanda", "finetune.neftune.alpha=5"],
    "wanda 50%, dynamic alpha 5": ["prune.method=wanda", "finetune.neftune.alpha=5", "finetune.neftune.dynamic=true"],
    "sparsegpt 50%, alpha 5": ["prune.method=sparsegpt", "finetune.neftune.alpha=5"],
    "sparsegpt 50%, alpha 5, distilled (beta 0.5)": ["prune.method=sparsegpt", "finetune.neftune.alpha=5",
                                                     "finetune.distill.beta=0.5"],
    # the reconstruction that starts closest to dense on both texts, tuned towards the dense model's
    # outputs only (no cross-entropy on the tuning text): what it fits is the teacher, not WikiText
    "admm 50%, alpha 5, distilled (beta 1)": ["prune.method=admm", "finetune.neftune.alpha=5",
                                              "finetune.distill.beta=1.0"],
    # the best one-shot start: ADMM with each pruned layer tuned towards the dense model's outputs
    "admm 50% block-tuned, alpha 5": ["prune.method=admm", "prune.block_tuning.epochs=5", "finetune.neftune.alpha=5"],
    # the same start, tuned towards the dense model on text the dense model sampled itself instead of
    # WikiText-2 valid (finetune.data.generated_windows): one epoch of 200 windows, as the other arms
    "admm 50% block-tuned, alpha 5, distilled on sampled text": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "finetune.neftune.alpha=5", "finetune.distill.beta=1.0",
        "finetune.distill.temperature=1.0", "finetune.data.generated_windows=200"],
    # the same start, each step half WikiText-2 valid and half the sampled text, cross-entropy on
    # both (finetune.data.generated_share): the text fits WikiText-2, the samples hold the rest
    "admm 50% block-tuned, alpha 5, WikiText-2 + sampled text": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "finetune.neftune.alpha=5", *MIX],
    # the same mix, the sampled windows distilled (beta 1, T 1) and WikiText-2 valid's kept on
    # cross-entropy (finetune.distill.windows=sampled): the teacher where it knows best
    "admm 50% block-tuned, alpha 5, WikiText-2 + sampled text distilled": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "finetune.neftune.alpha=5", *MIX_DISTILLED],
    # the same, the sampled windows also matched layer by layer to the dense model's outputs
    # (finetune.distill.hidden, SquareHead): 30 targets per token instead of one distribution.
    # Measured at 100 steps: worse on both texts (25.29 / 47.81 against 24.12 / 47.36)
    "admm 50% block-tuned, alpha 5, WikiText-2 + sampled text distilled with layer outputs": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "finetune.neftune.alpha=5", *MIX_DISTILLED,
        "finetune.distill.hidden=1.0"],
    "cubic magnitude 0 -> 50%, alpha 5": ["prune.method=magnitude", "prune.schedule=cubic",
                                          "finetune.neftune.alpha=5"],
    "cubic SEVENdyn 0 -> 50%, alpha 5": ["prune.method=seven", "prune.schedule=cubic", "finetune.neftune.alpha=5"],
    # the same recovery from the start calibrated on text the dense model sampled itself
    # (data.calibration.generated, self-calibration): one-shot 45.24 / 44.21 against 37.29 / 50.96
    # (quality.md), a start nearer the dense model on the text nothing is tuned on
    "admm 50% block-tuned on sampled text, alpha 5, WikiText-2 + sampled text distilled": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "data.calibration.generated=true",
        "finetune.neftune.alpha=5", *MIX_DISTILLED],
    # the same recovery from ADMM calibrated on both: 16 windows of WikiText-2 valid, 16 sampled
    # (data.calibration.generated_share=0.5)
    "admm 50% block-tuned on WikiText-2 + sampled text, alpha 5, WikiText-2 + sampled text distilled": [
        "prune.method=admm", "prune.block_tuning.epochs=5", "data.calibration.generated=true",
        "data.calibration.generated_share=0.5", "finetune.neftune.alpha=5", *MIX_DISTILLED],
    # gradual SEVENdyn on the mix above: the mask is chosen while the model is tuned on both texts,
    # not on WikiText-2 calibration alone (the ablation's best method at 30%, experiment_design.md)
    "cubic SEVENdyn 0 -> 50%, alpha 5, WikiText-2 + sampled text distilled": [
        "prune.method=seven", "prune.schedule=cubic", "finetune.neftune.alpha=5", *MIX_DISTILLED],
    # the same, 50% reached at step 300 whatever the steps: with 600 (the 60-minute budget's
    # worth at 5.1 s a step) half the tuning runs at the final mask, with the learning rate still high
    "cubic SEVENdyn 0 -> 50% by step 300, alpha 5, WikiText-2 + sampled text distilled": seven_by(300),
    # the same, 50% reached at step 200 (re-selected every 50 steps): measured at 600 steps, the
    # arm above ends 0.2 above 1.25x the dense arm of the same recipe (20.86 against 16.53) and is
    # still falling when the learning rate runs out; this one gives the final mask 400 steps
    "cubic SEVENdyn 0 -> 50% by step 200, alpha 5, WikiText-2 + sampled text distilled": seven_by(200, 50),
    # the same, 50% reached at step 150 in six smaller cuts (re-selected every 25 steps): the final
    # mask tunes 450 steps, and each cut is chosen from statistics of the weights left by the last
    "cubic SEVENdyn 0 -> 50% by step 150, alpha 5, WikiText-2 + sampled text distilled": seven_by(150, 25),
    # the by-step-200 arm with one threshold per layer (prune.scope=layer) instead of one over the
    # model: every layer ends at 50%. Measured at 600 steps: worse on both texts (21.29 / 45.04
    # against 20.80 / 42.70), behind from its first cut on
    "cubic SEVENdyn 0 -> 50% per layer by step 200, alpha 5, WikiText-2 + sampled text distilled":
        seven_by(200, 50, "prune.scope=layer"),
    # the by-step-150 arm moved earlier again, in as many cuts (every 20 steps to step 100).
    # Measured at 600 steps: 20.78 / 42.43, behind by-150 on WikiText-2, ahead on fortunes
    "cubic SEVENdyn 0 -> 50% by step 100, alpha 5, WikiText-2 + sampled text distilled": seven_by(100, 20),
    # the by-step-150 arm in 15 smaller cuts (every 10 steps) instead of 6. Measured at 600 steps:
    # 20.77 / 42.38, the lowest fortunes, 0.06 behind every-25 on WikiText-2
    "cubic SEVENdyn 0 -> 50% by step 150 every 10, alpha 5, WikiText-2 + sampled text distilled": seven_by(150, 10),
    # no movement arm: prune.method movement refuses a warm-up under 5,400 steps, ten times this
    # budget (its scores pruned the largest weights after 4-100 steps: results/movement_study.md)
}


def settings_of(args) -> dict:
    return {"steps": args.steps, "seq_len": args.seq_len, "lr": args.lr, "accumulation": args.accumulation,
            "eval_interval": args.eval_interval}


def base_overrides(s: dict) -> list[str]:
    """The budget every arm shares: steps x 2 windows x seq_len tokens of WikiText-2 valid in the
    same order, the same learning rate; cubic arms reach 50% at 3/4 of the steps, re-selecting 8
    times on the way."""
    return ["prune.sparsity=0.5", f"finetune.steps={s['steps']}", f"finetune.data.seq_len={s['seq_len']}",
            f"finetune.lr={s['lr']}", "finetune.warmup_steps=5", "finetune.log_interval=5",
            f"finetune.gradient_accumulation_steps={s['accumulation']}", f"finetune.eval_interval={s['eval_interval']}",
            f"prune.end_step={int(s['steps'] * 0.75)}", f"prune.interval={max(1, s['steps'] // 8)}",
            "eval.num_windows=16", "eval.seq_len=512", "eval.dense=false"]


def _rank_main(rank: int, overrides: list[str], data: dict) -> dict:
    from dist_prune.train.state import Hooks

    rows, zeros = [], {}
    metrics = run_job(overrides, data, Hooks(log=lambda step, row: rows.append({"step": step, **row})),
                      inspect=lambda export: zeros.update(exported_zeros(export)))
    metrics.pop("finetune_history", None)
    return {"metrics": metrics, "rows": rows, "export": zeros}


def exported_zeros(export: Path) -> dict:
    """Zeros in the exported target tensors against the pruned count sparsity.json states: every
    pruned weight must still be exactly 0 after tuning (zeros >= pruned; a kept weight that is
    exactly 0 in fp32 after training is possible but has not been seen)."""
    from safetensors import safe_open

    manifest = json.loads((export / "sparsity.json").read_text())
    counts = manifest["pruned_counts"]
    zeros = 0
    for shard in sorted(export.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if name in counts:
                    zeros += int((f.get_tensor(name) == 0).sum())
    return {"zeros_in_targets": zeros, "pruned": sum(counts.values())}


def run(args) -> None:
    from dist_prune.io.checkpoint import resolve_model

    settings = settings_of(args)
    tag = "_".join(f"{k}{v}" for k, v in settings.items())
    arm_dir = RESULTS / "recovery" / tag
    chosen = {k: v for k, v in ARMS.items() if not args.arms or k in args.arms.split("|")}
    data = None
    for name, overrides in chosen.items():
        if args.table:
            break
        path = arm_dir / f"{_slug(name)}.json"
        if path.exists():
            print(f"{name}: already measured ({path.relative_to(RESULTS)})")
            continue
        data = data or tokens(resolve_model(None), training_seq_len=args.seq_len)
        every = [*base_overrides(settings), *overrides]
        with_sampled_windows(data, every)  # sampled here once, read from the cache by the ranks
        with LoadSampler() as load:
            result = run_ranks(_rank_main, every, data, world=WORLD)
        arm_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"arm": name, "overrides": every, **settings, **result,
                                    "load_average_1min_per_minute": load.samples,
                                    "other_cpu_share_per_minute": load.other_cpu}, indent=2, default=str))
        print(f"{name}: {json.dumps(_ends(result['metrics']))}", flush=True)
    arms = load_arms(arm_dir)
    lines = table(arms, settings, f"{args.name}.png")
    plot(arms, settings, RESULTS / f"{args.name}.png")
    report = {"machine": machine(WORLD), "model": "SmolLM2-135M-Instruct (fp32)", **settings, "arms": arms,
              "command": command(settings)}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        log_to_mlflow(tracking_uri, arms, settings, RESULTS / f"{args.name}.md", RESULTS / f"{args.name}.png")


def _ends(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("perplexity") or k in ("sparsity", "seconds_finetune")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def load_arms(arm_dir: Path) -> dict:
    found = {a["arm"]: a for a in (json.loads(p.read_text()) for p in sorted(arm_dir.glob("*.json")))}
    return {k: found[k] for k in ARMS if k in found}  # the order of ARMS


def command(s: dict) -> str:
    return (f"python benchmarks/finetune.py quality --steps {s['steps']} --seq-len {s['seq_len']} --lr {s['lr']} "
            f"--accumulation {s['accumulation']} --eval-interval {s['eval_interval']}")


def reference_values(arms: dict, stage: str) -> dict[str, float]:
    """The reference arm's perplexity per text: "pruned" = the dense model before tuning, "sparse" =
    the dense model tuned with the same budget. Before tuning every dense arm is the same model, so
    "pruned" falls back to any arm that prunes nothing when the reference is not measured."""
    dense_arms = [a for a in arms.values() if "prune.sparsity=0.0" in a.get("overrides", [])]
    source = arms.get(REFERENCE) or (dense_arms[0] if stage == "pruned" and dense_arms else {})
    m = source.get("metrics", {})
    return {suffix: m.get(f"perplexity_{stage}{suffix}", float("nan")) for suffix in TEXTS}


def _dense_line(arms: dict, dense: dict[str, float], tuned: dict[str, float]) -> str:
    untuned = f"Dense model: {dense['']:.2f} (WikiText-2), {dense['.' + SECOND]:.2f} (fortunes); "
    missing = f"reference arm ({REFERENCE}) is not measured with these settings."
    if REFERENCE in arms:
        return untuned + f"tuned alike (the reference arm): {tuned['']:.2f}, {tuned['.' + SECOND]:.2f}."
    return "The " + missing if math.isnan(dense[""]) else untuned + "the " + missing  # nan: no dense arm at all


def same_recipe(arm: dict, arms: dict) -> dict | None:
    """The dense arm tuned on the same data with the same loss as `arm` (its finetune.data.* and
    finetune.distill.* overrides equal), or None: the like-for-like reference of a recipe that is
    not WikiText-2 alone, since the recipe alone moves the dense model on both texts."""
    def recipe(a: dict) -> set[str]:
        return {o for o in a.get("overrides", []) if o.startswith(("finetune.data.", "finetune.distill."))}

    return next((a for a in arms.values() if "prune.sparsity=0.0" in a.get("overrides", [])
                 and recipe(a) == recipe(arm)), None)


def curve(arm: dict, suffix: str, dense: dict[str, float]) -> list[tuple[int, float]]:
    """(step, perplexity) on one text: the start (the pruned model; the dense one for the arms
    that start dense), every evaluation while tuning, the end."""
    m = arm["metrics"]
    start = m.get(f"perplexity_pruned{suffix}", dense[suffix])
    points = [(0, start)] if start is not None else []
    points += [(r["step"], r[f"eval/perplexity{suffix}"]) for r in arm["rows"] if f"eval/perplexity{suffix}" in r]
    return points


def table(arms: dict, s: dict, curves: str = "recovery.png") -> list[str]:
    """The markdown table of the measured arms. Without the reference arm (settings it was not run
    with) the dense model's perplexities are unknown here: its columns and the targets are '—'."""
    dense, tuned = reference_values(arms, "pruned"), reference_values(arms, "sparse")
    tokens_total = s["steps"] * WORLD * s["accumulation"] * s["seq_len"]
    lines = [f"Machine: {machine(WORLD)}. SmolLM2-135M-Instruct (fp32), dist-prune's default targets (embeddings "
             "and lm_head dense), 50% of the targets pruned. Budget, the same for every arm: "
             f"{s['steps']} steps x {WORLD * s['accumulation']} windows x {s['seq_len']} tokens = {tokens_total:,} "
             f"tokens of WikiText-2 valid in the same order, lr {s['lr']}, AdamW; one-shot arms calibrate on 32 x 512 "
             "tokens of WikiText-2 valid. Perplexity on the first 16 x 512 tokens of WikiText-2 test and of the "
             "fortunes text (benchmarks/data/fortunes.txt, Debian fortunes: quotations and verse; nothing is "
             "calibrated or tuned on it).",
             "", _dense_line(arms, dense, tuned), "",
             "| arm | WikiText-2: before | after | × dense tuned | × dense, same recipe | fortunes: before | after | "
             "half-gap target | exported zeros = pruned | sparsity | tune s | s/step | load, other CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    second = "." + SECOND
    starts = {name: {suffix: curve(arm, suffix, dense)[0][1] for suffix in TEXTS} for name, arm in arms.items()}
    # an arm that starts dense has no one-shot gap of its own: it is held to the best one-shot start's
    one_shot = [s[second] for s in starts.values() if s[second] > dense[second] * 1.0001]
    for name, arm in arms.items():
        m = arm["metrics"]
        before = starts[name]
        after = {suffix: m[f"perplexity_sparse{suffix}"] for suffix in TEXTS}
        starts_dense = not before[second] > dense[second] * 1.0001  # not <=: nan without the reference
        gap_of = min(one_shot) if starts_dense and one_shot and m["sparsity"] > 0 else before[second]
        half = dense[second] + 0.5 * (gap_of - dense[second])  # closes half of the one-shot gap
        met = "—" if m["sparsity"] == 0 or not gap_of > dense[second] * 1.0001 else (
            f"{half:.2f}{' (best one-shot)' if starts_dense else ''} {'met' if after[second] <= half else 'missed'}")
        like = same_recipe(arm, arms)
        like_ratio = "—" if like is None or like is arm else f"{after[''] / like['metrics']['perplexity_sparse']:.3f}"
        zeros = arm.get("export", {})
        exact = "—" if not zeros else ("yes" if zeros["zeros_in_targets"] >= zeros["pruned"] else "NO") + \
            f" ({zeros['zeros_in_targets']:,} / {zeros['pruned']:,})"
        step_s = [r["train/step_seconds"] for r in arm["rows"] if "train/step_seconds" in r]
        ratio = "—" if REFERENCE not in arms else f"{after[''] / tuned['']:.3f}"
        lines.append(f"| {name} | {_ppl(before[''])} | {after['']:.2f} | {ratio} | {like_ratio} | "
                     f"{_ppl(before[second])} | {after[second]:.2f} | {met} | {exact} | {m['sparsity']:.4f} | "
                     f"{m.get('seconds_finetune', 0):.0f} | {_median(step_s):.2f} | {_load(arm)} |")
    lines += ["", "Targets for the best 50% arm: WikiText-2 ≤ 1.25 × the dense model tuned alike; fortunes ≤ dense + "
              "½ (before − dense), i.e. tuning closes at least half of the one-shot model's gap on a text it never "
              "saw; cubic arms start dense and are held to half the gap of the best one-shot start in the table. "
              "\"Same recipe\" divides by the dense arm tuned on the same data with the same loss (WikiText-2 "
              "alone: the reference). Tune seconds include the evaluations every "
              f"{s['eval_interval']} steps and whatever else ran on this 2-core machine at the time; s/step is the "
              "median of the logged step times; load is the median of the 1-minute load average sampled every minute "
              "of the arm (its 2 ranks count: 2.2-2.9 on the quiet machine), other CPU the median share of both "
              "cores' time that processes outside the benchmark took per minute (— where not recorded).", "",
              "Command (repeat until every arm is measured): "
              f"`{command(s)}{'' if curves == 'recovery.png' else ' --name ' + Path(curves).stem}`; curves: "
              f"`{Path(RESULTS.name) / curves}`"]
    return lines


def _ppl(x: float) -> str:
    """A perplexity, or '—' where it is unknown (nan: an arm that starts dense, with no dense arm
    in the table to give the dense model's value)."""
    return "—" if math.isnan(x) else f"{x:.2f}"


def _load(arm: dict) -> str:
    load, other = arm.get("load_average_1min_per_minute"), arm.get("other_cpu_share_per_minute")
    return "—" if not load else f"{_median(load):.2f}, " + (f"{_median(other):.0%}" if other else "—")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return float("nan") if not xs else (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2


def plot(arms: dict, s: dict, path: Path) -> None:
    import matplotlib  # lazy: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = reference_values(arms, "pruned")
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(13, 4.8))
    for ax, (suffix, title) in zip(axes, TEXTS.items()):
        for name, arm in arms.items():
            points = curve(arm, suffix, dense)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=name,
                    linestyle="--" if name == REFERENCE else "-")
        ax.set_yscale("log")
        ax.set_xlabel(f"optimizer step ({WORLD * s['accumulation']} x {s['seq_len']} tokens)")
        ax.set_ylabel("perplexity (16 x 512 tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M at 50%: recovery by Sparse-NEFT, the same budget per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(tracking_uri: str, arms: dict, s: dict, table_path: Path, plot_path: Path) -> None:
    """A parent run with the table and the plot, a child run per arm with its curves as step
    metrics (MLflow's chart view overlays them) and its final metrics."""
    import mlflow

    from dist_prune.registry import artifacts_next_to, resolved_tracking_uri

    uri = resolved_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    name = "dist-prune-recovery"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifacts_next_to(uri))
    mlflow.set_experiment(name)
    dense = reference_values(arms, "pruned")
    with mlflow.start_run(run_name=f"recovery {s['steps']} steps") as parent:
        mlflow.log_params(s)
        mlflow.log_artifact(str(table_path))
        mlflow.log_artifact(str(plot_path))
        for arm_name, arm in arms.items():
            with mlflow.start_run(run_name=arm_name, nested=True):
                mlflow.log_param("overrides", " ".join(arm["overrides"])[:6000])
                for suffix, _ in TEXTS.items():
                    for step, value in curve(arm, suffix, dense):
                        mlflow.log_metric(f"eval/perplexity{suffix}", value, step=step)
                mlflow.log_metrics({k: v for k, v in _ends(arm["metrics"]).items() if isinstance(v, (int, float))})
        print(f"logged to MLflow: experiment {name}, run {parent.info.run_id}")

