"""dist-prune against llm-compressor 0.14, side by side in one run (tracker issue 3's targets).

llm-compressor pins its own transformers, so it runs from its own virtualenv (.venv-llmc):

    make bench-vs-llmcompressor     # creates .venv-llmc once, then runs this with the defaults
    .venv/bin/python benchmarks/vs_llmcompressor.py --llmc-python .venv-llmc/bin/python --repeats 1

Every case (Wanda 50%, SparseGPT 50%, Wanda 2:4 by default) runs --repeats times, alternating
llm-compressor and dist-prune so that both see the same machine state. Both get the same token
windows (quality.py's protocol: 32 x 512 tokens of WikiText-2 valid for calibration, the first
16 x 512 of test for perplexity), llm-compressor's targets (every Linear, lm_head included) and
the machine's cores: llm-compressor is one process with --threads torch threads, dist-prune
--world gloo ranks of one thread each (benchmarks/_ranks.py, the worker recipe without Ray).

Prune seconds: llm-compressor's `oneshot` call (tracing, two passes per layer, compression);
dist-prune's calibrate + score/select/mask stages. Neither includes loading the model.
Results: benchmarks/results/vs_llmcompressor.{json,md}, medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _ranks import RESULTS, machine, run_job, run_ranks, tokens
from quality import PRUNE_STAGES, TARGETS, VARIANTS

HERE = Path(__file__).resolve().parent
CASES = {  # name -> (llm-compressor modifier, structure, the dist-prune methods it is compared with)
    "wanda 50%": ("wanda", "unstructured", ("wanda", "wanda-1pass")),
    "sparsegpt 50%": ("sparsegpt", "unstructured", ("sparsegpt",)),
    "wanda 2:4": ("wanda", "2:4", ("wanda", "wanda-1pass")),
}


def ours(rank: int, overrides: list[str], data: dict) -> dict:
    return run_job(overrides, data)


def run_ours(method: str, structure: str, data: dict, world: int) -> dict:
    scorer, extra = VARIANTS.get(method, (method, []))
    calibration, evaluation = data["calibration"], data["evaluation"]
    overrides = [*TARGETS["llm-compressor"], f"prune.method={scorer}", *extra, f"prune.structure={structure}",
                 "prune.sparsity=0.5", f"data.calibration.num_samples={len(calibration)}",
                 f"data.calibration.seq_len={calibration.shape[1]}", f"eval.num_windows={len(evaluation)}",
                 f"eval.seq_len={evaluation.shape[1]}", f"cluster.num_workers={world}", "eval.dense=false"]
    metrics = run_ranks(ours, overrides, data, world=world)
    stages = {k.removeprefix("seconds_"): metrics[k] for k in PRUNE_STAGES if k in metrics}  # block tuning: opt-in
    return {"seconds": sum(stages.values()), "perplexity": metrics["perplexity_sparse"], "stages": stages}


def run_llmcompressor(python: str, model: str, windows: Path, modifier: str, structure: str, threads: int) -> dict:
    command = [python, str(HERE / "_llmcompressor_run.py"), model, str(windows), modifier, structure, "0.5",
               str(threads)]
    with tempfile.TemporaryFile("w+") as log:  # its progress bars: kept out of our output, shown on failure
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=HERE)
        if done.returncode != 0:
            log.seek(0)
            sys.exit(f"llm-compressor failed ({done.returncode}): {log.read()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "perplexity": statistics.median(r["perplexity"] for r in runs), "runs": runs}


def markdown(results: dict) -> list[str]:
    lines = [f"# dist-prune vs llm-compressor {results['llmcompressor_versions']['llmcompressor']}", "",
             f"Machine: {results['machine']}. Medians of {results['repeats']} alternating runs per case. "
             f"Command: `{results['command']}`.", "",
             "| case | dist-prune method | llm-compressor ppl | dist-prune ppl | ppl ratio | llm-compressor s "
             "| dist-prune s | time ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, case in results["cases"].items():
        theirs = case["llm-compressor"]
        for method, mine in case["dist-prune"].items():
            lines.append(f"| {name} | {method} | {theirs['perplexity']:.2f} | {mine['perplexity']:.2f} | "
                         f"{mine['perplexity'] / theirs['perplexity']:.3f} | {theirs['seconds']:.1f} | "
                         f"{mine['seconds']:.1f} | {mine['seconds'] / theirs['seconds']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llmc-python", required=True, help="python of a virtualenv with llmcompressor 0.14")
    parser.add_argument("--cases", nargs="+", default=list(CASES),
                        choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="dist-prune ranks (one thread each)")
    parser.add_argument("--threads", type=int, default=2, help="llm-compressor's torch threads")
    parser.add_argument("--name", default="vs_llmcompressor")
    args = parser.parse_args()
    if not Path(args.llmc_python).is_file():
        sys.exit(f"--llmc-python {args.llmc_python}: no such file (see the module docstring for the venv)")
    python = str(Path(args.llmc_python).absolute())  # it runs in benchmarks/; not resolve(): the venv's link

    from dist_prune.io.checkpoint import resolve_model

    model = resolve_model(None)
    data = tokens(model)
    results = {"machine": machine(args.world) + f"; llm-compressor: 1 process x {args.threads} threads",
               "command": " ".join(["python", "benchmarks/vs_llmcompressor.py", *sys.argv[1:]]),
               "repeats": args.repeats, "cases": {}, "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as tmp:
        windows = Path(tmp) / "windows.pt"
        torch.save({"calibration": data["calibration"], "evaluation": data["evaluation"]}, windows)
        for name in args.cases:
            modifier, structure, methods = CASES[name]
            theirs: list[dict] = []
            mine: dict[str, list[dict]] = {method: [] for method in methods}
            for repeat in range(args.repeats):
                theirs.append(run_llmcompressor(python, str(model), windows, modifier, structure,
                                                args.threads))
                for method in methods:
                    mine[method].append(run_ours(method, structure, data, args.world))
                print(f"{name} [{repeat + 1}/{args.repeats}] llm-compressor: {theirs[-1]['perplexity']:.2f} ppl "
                      f"{theirs[-1]['seconds']:.1f} s; " + "; ".join(
                          f"{m}: {r[-1]['perplexity']:.2f} ppl {r[-1]['seconds']:.1f} s" for m, r in mine.items()),
                      flush=True)
            results["llmcompressor_versions"] = theirs[0]["versions"]
            results["cases"][name] = {"llm-compressor": summary(theirs),
                                      "dist-prune": {m: summary(r) for m, r in mine.items()}}
            (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
            (RESULTS / f"{args.name}.md").write_text("\n".join(markdown(results)) + "\n")
    print("\n".join(markdown(results)))


if __name__ == "__main__":
    main()
