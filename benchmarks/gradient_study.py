"""Why the gradient methods (taylor, obd, seven) collapsed, and what fixes them: the cheap study
protocol of issue 18 (benchmarks/results/gradient_methods.md holds its table).

One process, plain PyTorch, no ranks: `collect` runs the first --windows calibration windows of
quality.py's protocol (WikiText-2 valid, seed 0, 512 tokens) through SmolLM2-135M one window per
backward, and keeps, for every decoder linear (the default targets: embeddings and lm_head dense),
every statistic a hypothesis needs, in /tmp/gradient_study/w<windows> at each --snapshots count:

    gsum4             sum over steps of the step gradient g_s, a step = 4 windows (the pipeline's
                      default data.calibration.batch_size); gsum4_f64 the same in fp64, layers
                      0, 15 and 29 only (`fp32` compares the two)
    gsq4              sum_s g_s^2 (OBD's Fisher before)
    gsq1              sum_w g_w^2, one sample per window
    fisher_tok        sum over every token t of (delta_t x_t)^2, one sample per token (delta = dL/d
                      output, x = the input: dist_prune.gradients.token_products)
    taylor_tok        sum_t |delta_t x_t|, the first-order term per token
    xsq               sum over tokens of x_j^2 per input column (Wanda's ||X_j||^2, dense model)

`evaluate` builds the mask of each named variant (score/selection, `list` names them) from one
snapshot, prunes a copy of the model and measures perplexity on the first --eval-windows x 512
tokens of WikiText-2 test and of benchmarks/data/fortunes.txt; `pipeline` runs the worker recipe on
2 gloo ranks with config overrides instead; both merge into benchmarks/results/gradient_study.json.

    python benchmarks/gradient_study.py collect --windows 16 --snapshots 8,16
    python benchmarks/gradient_study.py evaluate --windows 16 --eval-windows 8 taylor/row obdtok/global
    python benchmarks/gradient_study.py pipeline --windows 16 prune.method=seven prune.scope=row
    python benchmarks/gradient_study.py fp32 --windows 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _ranks import DATA, RESULTS, SECOND_TEXT

STORE = Path("/tmp/gradient_study")
OUT = RESULTS / "gradient_study.json"
F64_LAYERS = ("model.layers.0.", "model.layers.15.", "model.layers.29.")
STEP = 4  # windows per step of the pipeline's default data.calibration.batch_size


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_prune.io.checkpoint import resolve_model

    path = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def targets(model) -> dict[str, torch.nn.Linear]:
    return {f"{name}.weight": m for name, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, torch.nn.Linear)}


def collect(args) -> None:
    from safetensors.torch import save_file

    from dist_prune.data import calibration_windows, tokenize
    from dist_prune.gradients import new_stats, token_products, update_stats

    model, tokenizer = load_model()
    windows = calibration_windows(tokenize((DATA / "valid.txt").read_text(), tokenizer), args.windows, 512, 0,
                                  source="valid")
    linears = targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    shapes = {n: m.weight.shape for n, m in linears.items()}
    full = {n: {k: torch.zeros(s) for k in ("fisher_tok", "taylor_tok", "gsq1")}
            for n, s in shapes.items()}
    for n in shapes:  # fp64 beside fp32 in three layers: enough to see what fp32 accumulation costs
        if n.startswith(F64_LAYERS):
            full[n]["gsum4_f64"] = torch.zeros(shapes[n], dtype=torch.float64)
    xsq = {n: torch.zeros(s[1], dtype=torch.float64) for n, s in shapes.items()}
    step4 = {n: new_stats(m.weight.numel(), {"grad_sum", "grad_sq_sum"}) for n, m in linears.items()}
    pending = {n: torch.zeros(s) for n, s in shapes.items()}  # the 4-window step's gradient so far

    def forward_hook(name):
        def hook(module, args_, output):
            x = args_[0].detach().reshape(-1, args_[0].shape[-1])
            xsq[name] += x.double().square().sum(0)

            def on_grad(d):  # dL/d output: this linear's per-token terms
                products = token_products(x, d.detach(), ("token_sq", "token_abs"))
                full[name]["fisher_tok"].add_(products["token_sq"])
                full[name]["taylor_tok"].add_(products["token_abs"])
            output.register_hook(on_grad)
        return hook

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in linears.items()]
    snapshots = sorted(set(args.snapshots))
    started = time.perf_counter()
    for w in range(args.windows):
        ids = windows[w:w + 1]
        logits = model(ids).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])  # mean NLL of the window
        loss.backward()
        with torch.no_grad():
            for n, m in linears.items():
                g = m.weight.grad
                full[n]["gsq1"].addcmul_(g, g)
                pending[n].add_(g, alpha=1 / STEP)
                m.weight.grad = None
                if (w + 1) % STEP == 0:
                    if "gsum4_f64" in full[n]:
                        full[n]["gsum4_f64"].add_(pending[n].double())
                    update_stats(step4[n], pending[n].reshape(-1), m.weight.reshape(-1), w // STEP)
                    pending[n].zero_()
        print(f"window {w + 1}/{args.windows} loss {loss.item():.3f} {time.perf_counter() - started:.0f} s", flush=True)
        if w + 1 in snapshots:
            out = STORE / f"w{w + 1}"
            out.mkdir(parents=True, exist_ok=True)
            stats = {"gsum4": {n: a["grad_sum"].reshape(shapes[n]) for n, a in step4.items()},
                     "gsq4": {n: a["grad_sq_sum"].reshape(shapes[n]) for n, a in step4.items()},
                     "xsq": {n: x.float() for n, x in xsq.items()},
                     **{k: {n: f[k] for n, f in full.items() if k in f} for k in ("fisher_tok", "taylor_tok", "gsq1", "gsum4_f64")}}
            for key, tensors in stats.items():
                save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / f"{key}.safetensors"))
            (out / "info.json").write_text(json.dumps({"windows": w + 1, "steps4": (w + 1) // STEP,
                                                       "seconds": time.perf_counter() - started}))
            print(f"snapshot {out}", flush=True)
    for h in handles:
        h.remove()


class Stats:
    """Lazy access to one snapshot's statistics."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder, self.open, self.files = folder, safe_open, {}
        self.info = json.loads((folder / "info.json").read_text())

    def __call__(self, key: str, name: str) -> torch.Tensor:
        if key not in self.files:
            self.files[key] = self.open(str(self.folder / f"{key}.safetensors"), "pt")
        return self.files[key].get_tensor(name)


def _gblm(lam):
    """GBLM-Pruner (Das et al. 2023): |w| (||X_j||_2 + lambda ||G_ij||_2), G over windows."""
    return lambda w, s, n: w.abs() * (s("xsq", n).sqrt()[None] + lam * s("gsq1", n).sqrt())


# score(w, stats, name) -> tensor; higher = keep
SCORES = {
    "magnitude": lambda w, s, n: w.abs(),
    "wanda": lambda w, s, n: w.abs() * s("xsq", n).sqrt()[None],
    "taylor": lambda w, s, n: (w * s("gsum4", n)).abs(),              # taylor before, fp32 sum
    "obd4": lambda w, s, n: w.square() * s("gsq4", n),                # obd before
    "obd1": lambda w, s, n: w.square() * s("gsq1", n),                # per-window Fisher
    "obdtok": lambda w, s, n: w.square() * s("fisher_tok", n),        # per-token Fisher
    "taylortok": lambda w, s, n: w.abs() * s("taylor_tok", n),        # sum_t |w delta_t x_t|
    # SEVEN's |w a| m/v with a sample per token and plain means over the tokens for its moments:
    # m = mean_t a_t, v = sqrt(mean_t a_t^2), a_t = |delta_t x_t| (up to the constant 1/sqrt(tokens))
    "seventok": lambda w, s, n: w.abs() * s("taylor_tok", n).square() / s("fisher_tok", n).sqrt().clamp_min(1e-30),
    **{f"gblm{lam:g}": _gblm(lam) for lam in (1, 10, 100, 1000)},
}
SELECTIONS = ("global", "layer", "row", "global-norm", "2:4")


def select(scores: dict[str, torch.Tensor], how: str, sparsity: float) -> dict[str, torch.Tensor]:
    """Masks (True = pruned) of exactly round(s n) elements per group."""
    def lowest(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
        mask = torch.zeros_like(x, dtype=torch.bool)
        return mask.scatter_(dim, torch.topk(x, k, dim=dim, largest=False).indices, True)

    if how == "row":
        return {n: lowest(x, round(sparsity * x.shape[1])) for n, x in scores.items()}
    if how == "layer":
        return {n: lowest(x.reshape(-1), round(sparsity * x.numel())).reshape(x.shape) for n, x in scores.items()}
    if how == "2:4":
        return {n: lowest(x.reshape(x.shape[0], -1, 4), 2).reshape(x.shape) for n, x in scores.items()}
    if how == "global-norm":  # each tensor's scores over their mean: one unit for every layer
        scores = {n: x / x.double().mean().float() for n, x in scores.items()}
    flat = torch.cat([x.reshape(-1) for x in scores.values()])
    k = round(sparsity * flat.numel())
    threshold = torch.kthvalue(flat, k).values
    # ties at the threshold are broken by position, so exactly k go
    below = flat < threshold
    ties = (flat == threshold).nonzero().reshape(-1)[: k - int(below.sum())]
    below[ties] = True
    masks, at = {}, 0
    for n, x in scores.items():
        masks[n] = below[at: at + x.numel()].reshape(x.shape)
        at += x.numel()
    return masks


def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(total / count)


def evaluate(args) -> None:
    from dist_prune.data import eval_windows, tokenize

    model, tokenizer = load_model()
    count = args.eval_windows
    texts = {"wikitext": eval_windows(tokenize((DATA / "test.txt").read_text(), tokenizer), count, 512, source="test"),
             "fortunes": eval_windows(tokenize(SECOND_TEXT.read_text(), tokenizer), count, 512,
                                      source=SECOND_TEXT.name)}
    linears = targets(model)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    stats = Stats(STORE / f"w{args.windows}")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    command = shlex.join(["python", "benchmarks/gradient_study.py", *sys.argv[1:]])
    for variant in args.variants:
        score_name, how = variant.split("/", 1)
        key = f"w{args.windows}/{variant}/{args.sparsity:g}/e{count}"
        if key in results and not args.rerun:
            print(f"{key}: {results[key]} (already measured)")
            continue
        started = time.perf_counter()
        scores = {n: SCORES[score_name](w, stats, n).float() for n, w in dense.items()}
        masks = select(scores, how, args.sparsity)
        del scores
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(dense[n].masked_fill(masks[n], 0.0))
        pruned = sum(int(x.sum()) for x in masks.values()) / sum(x.numel() for x in masks.values())
        layer_sparsity = {n: float(x.float().mean()) for n, x in masks.items()}
        ppl = {text: perplexity(model, w) for text, w in texts.items()}
        results = _save(key, {**ppl, "pruned": pruned, "windows": args.windows, "command": command,
                              "min_layer_sparsity": min(layer_sparsity.values()),
                              "max_layer_sparsity": max(layer_sparsity.values())})
        print(f"{key}: wikitext {ppl['wikitext']:.2f} fortunes {ppl['fortunes']:.2f} pruned {pruned:.4f} "
              f"layer sparsity {min(layer_sparsity.values()):.3f}-{max(layer_sparsity.values()):.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(dense[n])
    if args.dense and f"dense/e{count}" not in results:
        results = _save(f"dense/e{count}", {text: perplexity(model, w) for text, w in texts.items()})
        print(f"dense: {results[f'dense/e{count}']}")


def fp32(args) -> None:
    """What accumulating the summed gradient in fp32 instead of fp64 changes: the largest relative
    difference, and the elements whose taylor row-scope mask differs, in layers 0, 15 and 29."""
    from safetensors.torch import load_file

    folder = STORE / f"w{args.windows}"
    single, double = load_file(str(folder / "gsum4.safetensors")), load_file(str(folder / "gsum4_f64.safetensors"))
    model, _ = load_model()
    weights = {n: m.weight.detach() for n, m in targets(model).items()}
    changed = total = 0
    worst = 0.0
    for name, exact in double.items():
        approx = single[name].double()
        worst = max(worst, float(((approx - exact).abs() / exact.abs().clamp_min(1e-30)).median()))
        masks = [select({name: (weights[name].double() * g).abs().float()}, "row", 0.5)[name] for g in (approx, exact)]
        changed += int((masks[0] != masks[1]).sum())
        total += masks[0].numel()
    summary = {"tensors": len(double), "elements": total, "mask_elements_changed": changed,
               "largest_median_relative_difference": worst}
    print(json.dumps(summary))
    _save(f"w{args.windows}/fp32-vs-fp64", {**summary, "command": shlex.join(
        ["python", "benchmarks/gradient_study.py", *sys.argv[1:]])})


def _pipeline_rank(rank: int, overrides: list[str], data: dict) -> dict:
    from _ranks import run_job

    return run_job(overrides, data)


def pipeline(args) -> None:
    """One job of the worker recipe on 2 gloo ranks (as quality.py) with `overrides`, calibrated on
    the first --windows windows of the protocol and measured on --eval-windows of each text."""
    from _ranks import run_ranks, tokens

    from dist_prune.io.checkpoint import resolve_model

    data = tokens(resolve_model(None), calibration=(args.windows, 512), evaluation=(args.eval_windows, 512))
    overrides = [f"data.calibration.num_samples={args.windows}", "data.calibration.seq_len=512",
                 f"eval.num_windows={args.eval_windows}", "eval.seq_len=512", "eval.dense=false", *args.overrides]
    metrics = run_ranks(_pipeline_rank, overrides, data, world=2)
    value = {"wikitext": metrics["perplexity_sparse"], "fortunes": metrics["perplexity_sparse.fortunes"],
             "pruned": metrics["pruned"] / metrics["prunable"], "seconds_calibrate": metrics.get("seconds_calibrate"),
             "command": shlex.join(["python", "benchmarks/gradient_study.py", *sys.argv[1:]])}
    key = f"pipeline/w{args.windows}/{' '.join(args.overrides)}/e{args.eval_windows}"
    _save(key, value)
    print(f"{key}: {value}")


def _save(key: str, value: dict) -> dict:
    """Merge one result into the file as it is now (several evaluate calls may run at once)."""
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results[key] = value
    tmp = OUT.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(OUT)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--windows", type=int, default=32)
    c.add_argument("--snapshots", type=lambda t: [int(x) for x in t.split(",")], default=[32])
    e = sub.add_parser("evaluate")
    e.add_argument("--windows", type=int, default=32, help="the snapshot")
    e.add_argument("--sparsity", type=float, default=0.5)
    e.add_argument("--eval-windows", type=int, default=16, help="512-token windows of each text (16)")
    e.add_argument("--rerun", action="store_true")
    e.add_argument("--dense", action="store_true")
    e.add_argument("variants", nargs="+", help="score/selection")
    sub.add_parser("list")
    pl = sub.add_parser("pipeline")
    pl.add_argument("--windows", type=int, default=16)
    pl.add_argument("--eval-windows", type=int, default=8)
    pl.add_argument("overrides", nargs="+", help="config overrides, e.g. prune.method=seven prune.scope=row")
    sub.add_parser("fp32").add_argument("--windows", type=int, default=16, help="the snapshot")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared: one thread each for collect and evaluate
    if args.command == "list":
        print("scores:", ", ".join(SCORES), "\nselections:", ", ".join(SELECTIONS))
    elif args.command == "pipeline":
        pipeline(args)
    elif args.command == "fp32":
        fp32(args)
    elif args.command == "collect":
        collect(args)
    else:
        bad = [v for v in args.variants if "/" not in v or v.split("/", 1)[0] not in SCORES
               or v.split("/", 1)[1] not in SELECTIONS]
        if bad:
            parser.error(f"unknown variant {bad[0]} (see `list`)")
        evaluate(args)


if __name__ == "__main__":
    main()
