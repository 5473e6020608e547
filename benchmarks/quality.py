"""Pruning quality of every method on SmolLM2-135M: perplexity and prune seconds (tracker issue 3).

Protocol of llm-compressor's published numbers: calibration 32 windows x 512 tokens of WikiText-2
valid (random offsets, seed 0), perplexity on the first 16 x 512 tokens of WikiText-2 test. A run
is one job of the worker recipe on --world spawned gloo ranks of one thread (benchmarks/_ranks.py,
no Ray), one model load per run; the dense model is evaluated once, in the first run that finds
no dense perplexity in the results.

    python benchmarks/quality.py --max-runs 1          # the next run of the whole table; repeat
    python benchmarks/quality.py --methods wanda,magnitude --structures unstructured
    python benchmarks/quality.py --methods wanda --structures unstructured --sparsities 0.3,0.4

Methods are the scorers plus `wanda-1pass`: Wanda with data.calibration.sequential=false, which
measures every layer's inputs in one pass over the dense model (two passes per layer otherwise:
one to measure, one to feed the pruned layer's outputs on).

The plan: --methods x (unstructured at each of --sparsities, 2:4), heads and channels ranked by
--group-method, and, with no --methods given, the plot's sweep (30-70%) of the three best methods
at 50% once all have their 50% run (or of --plot-methods). Each finished run is merged at once
into benchmarks/results/<name>.json under its key targets/method/structure/sparsity; runs already
there are skipped (--rerun measures them again), so the table fills up over several short calls.
<name>.md and the plot <name>_sparsity.png are redrawn from the whole file after every call.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import _quality_report as report
from _ranks import DATA, RESULTS, machine, run_job, run_ranks, tokens, with_sampled_windows

from dist_prune.methods import METHODS as REGISTRY  # noqa: E402

# Every method that prunes one-shot to a sparsity by its scores or reconstruction, in registry
# order, with the variants after the method they vary
ONE_SHOT = [name for name, m in REGISTRY.items()
            if "oneshot" in m.schedules and m.mask_rule is None and not m.group_loss]
# Rows that run a method with other settings: Wanda calibrated in one pass over the dense model
# (every layer's statistics before any pruning) instead of two per layer on the pruned outputs;
# the reconstructions with OWL's per-layer sparsities (unstructured, decoder layers only: the
# default targets).
OWL = "prune.layer_sparsity=owl"
VARIANTS = {"wanda-1pass": ("wanda", ["data.calibration.sequential=false"]),
            "sparsegpt-owl": ("sparsegpt", [OWL]), "admm-owl": ("admm", [OWL]),
            # each pruned layer tuned towards the dense layer's outputs (dist_prune/block_tuning.py)
            "admm-tuned": ("admm", ["prune.block_tuning.epochs=5"]),
            # the same, calibrated on text the dense model sampled itself (data.calibration.generated)
            "admm-tuned-sampled": ("admm", ["prune.block_tuning.epochs=5", "data.calibration.generated=true"]),
            # half of each: WikiText-2 valid's windows, then the dense model's samples
            "admm-tuned-mixed": ("admm", ["prune.block_tuning.epochs=5", "data.calibration.generated=true",
                                          "data.calibration.generated_share=0.5"])}
METHODS = tuple(m for name in ONE_SHOT for m in (name, *[v for v, (base, _) in VARIANTS.items() if base == name]))
STRUCTURES = ("unstructured", "2:4", "heads", "channels")
GROUP_METHODS = tuple(name for name, m in REGISTRY.items() if "channels" in m.structures)  # rank groups
# Whole groups are removed in every layer. SmolLM2-135M has 3 KV groups per layer: removing 2
# (13.2% of the parameters) is the nearest `heads` comes to 20%; 34% of its 1536 MLP channels is 20.1%.
GROUP_SPARSITY = {"heads": 0.67, "channels": 0.34}
PLOT_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
TARGETS = {"llm-compressor": ["prune.exclude=['*norm*','*.bias']"],  # every Linear; lm_head = tied embeddings
           "dist-prune": []}  # the default exclude: embeddings and lm_head kept dense
# llm-compressor 0.14 on this protocol with its own targets: (perplexity, seconds).
REFERENCE = {"dense": (29.60, None), "wanda/unstructured/0.5": (72.21, 58),
             "sparsegpt/unstructured/0.5": (63.00, 100), "wanda/2:4/0.5": (518.0, 56)}
REFERENCE.update({k.replace("wanda/", "wanda-1pass/"): v for k, v in REFERENCE.items() if k.startswith("wanda/")})
SMOLLM2 = "SmolLM2-135M-Instruct (fp32)"
CALIBRATION = "{} x {} tokens of WikiText-2 valid (seed 0)"
EVALUATION = "the first {} x {} tokens of WikiText-2 test"
# the out-of-domain text nothing is calibrated or tuned on (benchmarks/second_text.py)
SECOND_EVALUATION = "the first {} x {} tokens of benchmarks/data/fortunes.txt (Debian fortunes)"
SECOND = "perplexity_{}.fortunes"
PRUNE_STAGES = ("seconds_calibrate", "seconds_score+select+mask", "seconds_block_tuning")
TABLE_HEADER = ("| method | structure | sparsity | pruned | perplexity | fortunes | llm-compressor | ratio | prune s "
                "| llm-compressor s | ratio | total s |")


def plan(args, results: dict) -> list[dict]:
    """The runs this call asks for, in order, each with its key and config overrides."""
    pairs = []
    for structure in args.structures:
        if structure in GROUP_SPARSITY:
            pairs.append((args.group_method, structure, GROUP_SPARSITY[structure]))
        else:
            sparsities = args.sparsities if structure == "unstructured" else [0.5]  # 2:4 is 50%
            pairs += [(m, structure, s) for m in args.methods for s in sparsities]
    if not args.skip_plot and "unstructured" in args.structures and (args.plot_methods or (
            not args.methods_given and set(METHODS) <= set(half_perplexities(results, args.targets)))):
        pairs += [(m, "unstructured", s) for m in plot_methods(args, results) for s in PLOT_SPARSITIES]
    pairs = [(m, structure, s) for m, structure, s in pairs if _applies(m, structure, args.targets)]
    base = [*TARGETS[args.targets], f"data.calibration.num_samples={args.calib_samples}",
            f"data.calibration.seq_len={args.seq_len}", f"eval.num_windows={args.eval_windows}",
            f"eval.seq_len={args.seq_len}", f"cluster.num_workers={args.world}"]
    runs = {}
    for method, structure, sparsity in pairs:
        key = f"{args.targets}/{method}/{structure}/{sparsity:g}"
        runs.setdefault(key, {"key": key, "targets": args.targets, "method": method, "structure": structure,
                              "sparsity": sparsity, "overrides": [
                                  *base, *_method_overrides(method), f"prune.structure={structure}",
                                  f"prune.sparsity={sparsity}"]})
    return list(runs.values())


def _applies(method: str, structure: str, targets: str) -> bool:
    """OWL spreads an unstructured sparsity over the decoder layers: not 2:4, not lm_head."""
    return OWL not in _method_overrides(method) or (structure == "unstructured" and targets == "dist-prune")


def _method_overrides(method: str) -> list[str]:
    scorer, extra = VARIANTS.get(method, (method, []))
    return [f"prune.method={scorer}", *extra]


def plot_methods(args, results: dict) -> list[str]:
    """--plot-methods, or the three best methods at 50% unstructured so far."""
    at_half = half_perplexities(results, args.targets)
    return args.plot_methods or sorted(at_half, key=at_half.get)[:3]


def half_perplexities(results: dict, targets: str) -> dict[str, float]:
    return {r["method"]: r["metrics"]["perplexity_sparse"] for r in results["runs"].values()
            if r["targets"] == targets and r["structure"] == "unstructured" and r["sparsity"] == 0.5}


def _rank_main(rank: int, runs: list[dict], data: dict, path: str, header: dict, need_dense: bool) -> None:
    for index, run in enumerate(runs):
        dense = need_dense and index == 0  # the dense perplexity, once
        metrics = run_job([*run["overrides"], f"eval.dense={str(dense).lower()}"], data)
        if rank != 0:
            continue
        results = load(Path(path), header)
        entry = {k: run[k] for k in ("key", "targets", "method", "structure", "sparsity")}
        results["runs"][run["key"]] = {**entry, "metrics": metrics, "dense_evaluated": dense,
                                       "first_in_call": index == 0, "machine": header["machine"],
                                       "command": header["command"], "date": time.strftime("%Y-%m-%d %H:%M")}
        if dense:
            results["dense"] = {"perplexity": metrics["perplexity_dense"], "run": run["key"],
                                "perplexity_fortunes": metrics[SECOND.format("dense")]}
        save(Path(path), results)
        refs = references(results, run["targets"])
        print(f"[{index + 1}/{len(runs)}] {line(results['runs'][run['key']], refs)}", flush=True)


def load(path: Path, header: dict) -> dict:
    results = json.loads(path.read_text()) if path.is_file() else {"protocol": header["protocol"], "runs": {}}
    if {**results["protocol"], "second_evaluation": header["protocol"]["second_evaluation"]} == header["protocol"]:
        results["protocol"] = header["protocol"]  # runs from before the second text: blank there, --rerun fills
    if results["protocol"] != header["protocol"]:
        fail(f"{path} holds runs of another protocol ({results['protocol']}); choose another --name")
    return results


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)  # a chunk killed mid-write leaves the previous file whole


def references(results: dict, targets: str) -> dict:
    """llm-compressor's numbers where they measured the same: its targets, this protocol, SmolLM2."""
    p = results["protocol"]
    same = (p["model"], p["calibration"], p["evaluation"]) == (SMOLLM2, CALIBRATION.format(32, 512),
                                                               EVALUATION.format(16, 512))
    return REFERENCE if same and targets == "llm-compressor" else {}


def row(run: dict, refs: dict) -> dict:
    """What the table shows of one run, with llm-compressor's numbers where they exist."""
    m = run["metrics"]
    ref = refs.get(run["key"].split("/", 1)[1])
    prune_s = sum(m.get(k, 0.0) for k in PRUNE_STAGES)
    pruned = (f"{m['removed_fraction']:.1%} of params" if "removed_fraction" in m
              else f"{m['sparsity']:.4f} of targets")
    return {"ppl": m["perplexity_sparse"], "ppl2": m.get(SECOND.format("sparse")), "ref_ppl": ref and ref[0], "prune_s": prune_s, "ref_s": ref and ref[1],
            "total_s": m["seconds_total"], "pruned": pruned}


def line(run: dict, refs: dict) -> str:
    r = row(run, refs)
    ref = f" (llm-compressor {r['ref_ppl']:g}, x{r['ppl'] / r['ref_ppl']:.3f})" if r["ref_ppl"] else ""
    dense = f", dense {run['metrics']['perplexity_dense']:.2f}" if run["dense_evaluated"] else ""
    return (f"{run['targets']} {run['method']} {run['structure']} {run['sparsity']:g}: perplexity "
            f"{r['ppl']:.2f}{ref}{dense}, fortunes {_num(r['ppl2'], '.2f')}, pruned {r['pruned']}, prune {r['prune_s']:.1f} s, "
            f"total {r['total_s']:.1f} s")


def _order(run: dict) -> tuple:
    method = METHODS.index(run["method"]) if run["method"] in METHODS else len(METHODS)
    return STRUCTURES.index(run["structure"]), run["sparsity"], method


def markdown(results: dict) -> list[str]:
    p = results["protocol"]
    lines = [f"# Pruning quality: {p['model']}", "",
             (f"Calibration {p['calibration']}; perplexity on {p['evaluation']} and, in the fortunes column, "
              f"on {p.get('second_evaluation', '(not measured)')}, a text from another domain that nothing is "
              f"calibrated or tuned on; the worker recipe on "
              f"{p['world']} gloo ranks x 1 thread (`benchmarks/quality.py`). Prune s = calibrate + score + "
              "select + mask; total s = the whole recipe (load, prune, evaluate, export to a temporary "
              "directory). Ratios are ours / llm-compressor's."), ""]
    dense = results.get("dense", {}).get("perplexity")
    for targets in TARGETS:
        runs = sorted((r for r in results["runs"].values() if r["targets"] == targets), key=_order)
        if not runs:
            continue
        refs = references(results, targets)
        what = "every Linear, lm_head = the tied embeddings included" if targets == "llm-compressor" else \
            "decoder linears; embeddings and lm_head kept dense"
        lines += [f"## Targets: {targets} ({what})", "",
                  TABLE_HEADER, "|---" * TABLE_HEADER.count(" | ") + "|---|"]
        if dense is not None:
            ref = refs.get("dense", (None,))[0]
            second = _num(results["dense"].get("perplexity_fortunes"), ".2f")
            lines.append(f"| dense | | | | {dense:.2f} | {second} | {_num(ref)} | {_ratio(dense, ref)} | | | | |")
        for run in runs:
            r = row(run, refs)
            star = " *" if run.get("first_in_call") else ""
            lines.append(f"| {run['method']} | {run['structure']} | {run['sparsity']:g} | {r['pruned']} | "
                         f"{r['ppl']:.2f} | {_num(r['ppl2'], '.2f')} | {_num(r['ref_ppl'])} | {_ratio(r['ppl'], r['ref_ppl'])} | "
                         f"{r['prune_s']:.1f} | {_num(r['ref_s'])} | {_ratio(r['prune_s'], r['ref_s'])} | "
                         f"{r['total_s']:.1f}{star} |")
        grid = report.sparsity_grid(results, targets, METHODS)
        lines += ["", f"Perplexity against unstructured sparsity, WikiText-2 test / fortunes ({targets} targets):",
                  "", *grid, ""] if grid else [""]
    if any(r.get("first_in_call") for r in results["runs"].values()):
        lines += [("\\* first run of its call: total includes the one-time warm-up (in load) and, in the run "
                  "that measured the dense perplexity, its evaluation."), ""]
    machines = sorted({r["machine"] for r in results["runs"].values()})
    commands = list(dict.fromkeys(r["command"] for r in results["runs"].values()))
    lines += [f"Machine: {'; '.join(machines)}.", "", "Commands:", *[f"- `{c}`" for c in commands]]
    return lines


def _num(x, spec: str = "g") -> str:
    return "" if x is None else format(x, spec)


def _ratio(ours, ref) -> str:
    return f"{ours / ref:.3f}" if ref else ""


def plot(results: dict, args, path: Path) -> None:
    """Perplexity vs unstructured sparsity of the three best methods at 50% (or --plot-methods)."""
    fill = (f"python benchmarks/quality.py --methods {{method}} --structures unstructured --sparsities {{todo}} "
            f"--name {args.name} --targets {args.targets}")
    report.plot(results, plot_methods(args, results), args.targets, path, PLOT_SPARSITIES, fill)


def fail(message: str):
    """One line and exit code 2, as dist-prune's own errors."""
    print(f"quality.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        fail(message)


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(allowed)}" if bad
                                             else f"empty list (allowed: {', '.join(allowed)})")
        return items
    return parse


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every sparsity must be in (0, 1), got {text}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", type=_choices(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    add("--structures", type=_choices(STRUCTURES), default=list(STRUCTURES), help=f"default: {','.join(STRUCTURES)}")
    add("--sparsities", type=_sparsities, default=[0.5], help="of the unstructured runs (0.5)")
    add("--group-method", choices=GROUP_METHODS, default="wanda", help="ranks whole heads / channels (wanda)")
    add("--targets", choices=tuple(TARGETS), default="llm-compressor",
        help="llm-compressor (default; every Linear, lm_head and tied embeddings too) or dist-prune's default")
    add("--world", type=int, default=2, help="gloo ranks, one thread each (2)")
    add("--name", default="quality", help="results file stem in benchmarks/results (quality)")
    add("--max-runs", type=int, help="measure at most this many runs not yet in the results")
    add("--rerun", action="store_true", help="measure runs that are already in the results again")
    add("--plot-methods", type=_choices(METHODS), default=[], help="default: the three best at 50%%")
    add("--skip-plot", action="store_true", help="no sparsity sweep, no plot")
    add("--calib-samples", type=int, default=32, help="calibration windows (32)")
    add("--seq-len", type=int, default=512, help="tokens per window (512)")
    add("--eval-windows", type=int, default=16, help="perplexity windows (16)")
    add("--model", help=argparse.SUPPRESS)  # a tiny checkpoint, for smoke tests
    args = parser.parse_args(argv)
    for key in ("world", "max_runs", "calib_samples", "seq_len", "eval_windows"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            fail(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    args.methods_given = args.methods is not None
    args.methods = args.methods or list(METHODS)
    if not re.fullmatch(r"[\w.-]+", args.name):
        fail(f"--name {args.name!r}: use letters, digits, '.', '_' or '-'")
    if not (DATA / "valid.txt").is_file() or not (DATA / "test.txt").is_file():
        fail(f"WikiText-2 not found in {DATA} (set DIST_PRUNE_DATA to the data root)")
    return args


def main() -> None:
    args = parse_args()
    from dist_prune.io.checkpoint import open_checkpoint, resolve_model
    from dist_prune.config import load_config
    from dist_prune.errors import UserError
    from dist_prune.job import check_target_shapes

    try:
        model_dir = resolve_model(args.model)
    except UserError as e:
        fail(str(e))
    path = RESULTS / f"{args.name}.json"
    protocol = {"model": SMOLLM2 if args.model is None else str(model_dir),
                "calibration": CALIBRATION.format(args.calib_samples, args.seq_len),
                "evaluation": EVALUATION.format(args.eval_windows, args.seq_len), "world": args.world,
                "second_evaluation": SECOND_EVALUATION.format(args.eval_windows, args.seq_len)}
    header = {"protocol": protocol, "machine": machine(args.world),
              "command": shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])}
    results = load(path, header)
    planned = plan(args, results)
    runs = [r for r in planned if args.rerun or r["key"] not in results["runs"]]
    done = [r["key"] for r in planned if r not in runs]
    if done:
        print(f"already measured (--rerun measures again): {', '.join(done)}")
    if len(runs) > (args.max_runs or len(runs)):
        print(f"{len(runs) - args.max_runs} more run(s) after these: repeat the command")
        runs = runs[:args.max_runs]
    checkpoint = open_checkpoint(model_dir)
    for run in runs:  # every mistake before the first run, not an hour into the table
        try:
            check_target_shapes(load_config(None, [f"model.path={model_dir}", *run["overrides"]]), checkpoint)
        except UserError as e:
            fail(f"{run['key']}: {e}")
    if runs:
        print(f"{len(runs)} run(s): {', '.join(r['key'] for r in runs)}", flush=True)
        data = tokens(model_dir, calibration=(args.calib_samples, args.seq_len),
                      evaluation=(args.eval_windows, args.seq_len))
        for run in runs:  # sampled once here; the ranks read the cache
            with_sampled_windows(data, run["overrides"])
        try:
            run_ranks(_rank_main, runs, data, str(path), header,
                      "perplexity_fortunes" not in results.get("dense", {}), world=args.world)
        finally:  # what finished is in the JSON: redraw the table even after a failure
            _write(load(path, header), args)
    else:
        print("nothing left to measure in this plan")
        _write(results, args)


def _write(results: dict, args) -> None:
    if not results["runs"]:
        return
    lines = markdown(results)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.skip_plot:
        suffix = "" if args.targets == "llm-compressor" else f"_{args.targets}"
        plot(results, args, RESULTS / f"{args.name}_sparsity{suffix}.png")


if __name__ == "__main__":
    main()
