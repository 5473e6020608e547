"""Does movement's score rank weights at a recovery budget? The cheap study of issue 17 §5
(benchmarks/results/movement_study.md holds its table).

One process, plain PyTorch, one thread: SmolLM2-135M fine-tuned as the recovery benchmark does
(AdamW, lr 1e-4, every parameter trained, each step 2 windows x 256 tokens of WikiText-2 valid in
quality.py's calibration order), while the movement score S = -sum_t w_t * dL/dw_t (Sanh et al.
2020; dist_prune/gradients.update_stats) accumulates for every decoder linear. At each --snapshots
step count the weights as they are then are pruned to --sparsity by movement at global, layer
(Sanh et al.'s per-matrix top-k) and row scope, and by magnitude per layer (Zhu & Gupta's
criterion, the cubic magnitude arm), and the perplexity of each pruned copy is measured on the
first --eval-windows x 512 tokens of WikiText-2 test and of the fortunes text, with no further
tuning: it isolates what the score itself knows at that point.

    python benchmarks/movement_study.py --snapshots 4,16,48
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from _ranks import DATA, RESULTS, SECOND_TEXT
from gradient_study import load_model, perplexity, select, targets

OUT = RESULTS / "movement_study"
VARIANTS = {  # name -> (score of (weight, movement), selection)
    "movement/global": (lambda w, s: s, "global"),
    "movement/layer": (lambda w, s: s, "layer"),
    "movement/row": (lambda w, s: s, "row"),
    "magnitude/layer": (lambda w, s: w.abs(), "layer"),
}


def study(args) -> dict:
    from dist_prune.data import calibration_windows, eval_windows, tokenize

    model, tokenizer = load_model()
    train = calibration_windows(tokenize((DATA / "valid.txt").read_text(), tokenizer),
                                2 * max(args.snapshots), args.seq_len, 0, source="valid")
    texts = {"wikitext": eval_windows(tokenize((DATA / "test.txt").read_text(), tokenizer), args.eval_windows, 512,
                                      source="test"),
             "fortunes": eval_windows(tokenize(SECOND_TEXT.read_text(), tokenizer), args.eval_windows, 512,
                                      source=SECOND_TEXT.name)}
    linears = targets(model)
    movement = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rows = {"dense": {t: perplexity(model, w) for t, w in texts.items()}}
    print(f"dense: {rows['dense']}", flush=True)
    started = time.perf_counter()
    for step in range(1, max(args.snapshots) + 1):
        ids = train[2 * step - 2: 2 * step]
        logits = model(ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with torch.no_grad():
            for n, m in linears.items():  # before the step, as the training loop accumulates it
                movement[n].addcmul_(m.weight, m.weight.grad, value=-1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - started:.0f} s", flush=True)
        if step in args.snapshots:
            rows[f"tuned {step} steps, dense"] = {t: perplexity(model, w) for t, w in texts.items()}
            print(f"step {step} dense: {rows[f'tuned {step} steps, dense']}", flush=True)
            weights = {n: m.weight.detach().clone() for n, m in linears.items()}
            for name, (score, how) in VARIANTS.items():
                masks = select({n: score(w, movement[n]) for n, w in weights.items()}, how, args.sparsity)
                with torch.no_grad():
                    for n, m in linears.items():
                        m.weight.masked_fill_(masks[n], 0.0)
                row = {t: perplexity(model, w) for t, w in texts.items()}
                share = [float(x.float().mean()) for x in masks.values()]
                rows[f"{step} steps, {name}"] = {**row, "layer_sparsity": [min(share), max(share)]}
                print(f"step {step} {name}: {rows[f'{step} steps, {name}']}", flush=True)
                with torch.no_grad():
                    for n, m in linears.items():
                        m.weight.copy_(weights[n])
            write(rows, args)  # each snapshot as it is measured: a long run keeps what it has
    return rows


def write(rows: dict, args) -> None:
    command = shlex.join(["python", "benchmarks/movement_study.py", *sys.argv[1:]])
    OUT.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    magnitude = {k.split(" steps")[0]: v for k, v in rows.items() if k.endswith("magnitude/layer")}
    lines = [
        "# Movement pruning at a recovery budget: what the score knows",
        "",
        f"SmolLM2-135M-Instruct (fp32), fine-tuned with AdamW lr {args.lr:g}, {2} x {args.seq_len} tokens of "
        f"WikiText-2 valid per step; after k steps pruned to {args.sparsity:.0%} of the decoder linears "
        f"(embeddings and lm_head dense) and measured with no further tuning on the first "
        f"{args.eval_windows} x 512 tokens of WikiText-2 test and of benchmarks/data/fortunes.txt. "
        "÷ magnitude: against magnitude per layer on the same weights at the same step.",
        "",
        "| after k steps | pruned by | WikiText-2 | fortunes | ÷ magnitude | layer sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        step, _, name = key.partition(" steps, ") if " steps, " in key else ("", "", key)
        step = step.replace("tuned ", "")
        ref = magnitude.get(step)
        ratio = (f"{_num(row['wikitext'] / ref['wikitext'])} / {_num(row['fortunes'] / ref['fortunes'])}"
                 if ref and "layer_sparsity" in row else "")
        share = "–".join(f"{x:.2f}" for x in row.get("layer_sparsity", []))
        lines.append(f"| {step} | {name} | {_num(row['wikitext'])} | {_num(row['fortunes'])} | {ratio} | {share} |")
    load = open("/proc/loadavg").read().split()[:3]
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
                  f"torch {torch.__version__}; load average at the end {' '.join(load)}.", "",
              f"Command: `{command}`"]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=lambda t: sorted({int(x) for x in t.split(",")}), default=[4, 16, 48])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared
    study(args)


if __name__ == "__main__":
    main()
