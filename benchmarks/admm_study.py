"""What was tried to take ADMM (dist_prune/admm.py) further past SparseGPT (issue 18 §3), on
SmolLM2-135M with the default targets (decoder linears) and quality.py's calibration (32 x 512
tokens of WikiText-2 valid, seed 0). Results: benchmarks/results/admm_study.{json,md}.

One process, plain PyTorch. Two measurements:

    layers VARIANT SPARSITY       the relative output error tr(dW H dW^T) / tr(W H W^T) of every
                                  linear of decoder layers 3, 15 and 27, summed per layer, on the
                                  dense model's inputs (cached in /tmp/admm_study/hessians.pt)
    perplexity VARIANT SPARSITY   the whole model pruned layer by layer as the recipe does (each
                                  layer's Hessians from the outputs of the already-pruned layers
                                  before it), then perplexity on the first 16 x 512 tokens of
                                  WikiText-2 test and of benchmarks/data/fortunes.txt

A variant is a name from VARIANTS; with `-seq` the linears of a layer are pruned in four groups in
order (q/k/v, o, gate/up, down), each group's Hessians measured after the groups before it are
pruned, instead of all seven from one pass; with `-asym` (admm variants only) the kept weights
follow the dense model's outputs from the pruned model's inputs, min ||W X_pruned - W0 X_dense||,
instead of the pruned layer's own, min ||(W - W0) X_pruned||. With `--block-epochs E`, each
pruned layer is then tuned as a whole (dist_prune/block_tuning.py, what prune.block_tuning runs).

    python benchmarks/admm_study.py layers admm 0.7
    python benchmarks/admm_study.py perplexity admm-seq 0.7
    python benchmarks/admm_study.py perplexity admm 0.7 --block-epochs 5 --block-lr 3e-3 --block-target dense
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ranks import RESULTS, tokens  # noqa: E402

from dist_prune import admm  # noqa: E402
from dist_prune.sparsegpt import sparsegpt_prune  # noqa: E402

OUT = RESULTS / "admm_study"
CACHE = Path("/tmp/admm_study/hessians.pt")
STUDY_LAYERS = (3, 15, 27)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUPS = (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:])  # in the order a layer computes them
# name -> (what it changes against dist-prune's admm, keyword arguments of admm_variant)
VARIANTS = {
    "sparsegpt": ("SparseGPT (dist_prune/sparsegpt.py)", None),
    "admm": ("dist-prune's default: rho 0.5, 15 iterations, cubic growth, 10 CG steps, damping 0.01", {}),
    "admm-i30": ("30 iterations", {"iterations": 30}),
    "i30g20": ("30 iterations, the mask grown over the first 20", {"iterations": 30, "grow_until": 20}),
    "i30g20r1": ("as i30g20 with rho 1", {"iterations": 30, "grow_until": 20, "rho": 1.0}),
    "rows": ("every row pruned to the same share (Wanda's comparison group)", {"rows": True}),
    "grow13": ("rho from 0.1, x1.3 every 3 iterations, 20 iterations, mask grown over 15",
               {"rho": 0.1, "rho_growth": 1.3, "rho_every": 3, "iterations": 20, "grow_until": 15}),
    "grow12": ("rho from 0.1, x1.2 every iteration, 20 iterations, mask grown over 15",
               {"rho": 0.1, "rho_growth": 1.2, "iterations": 20, "grow_until": 15}),
    "grow12r25": ("as grow12 from rho 0.25", {"rho": 0.25, "rho_growth": 1.2, "iterations": 20, "grow_until": 15}),
    "fixmask": ("Boža's reference settings: the whole mask from iteration 1, re-chosen for 15, rho 1, "
                "damping 0.1, 20 iterations, no CG (the sparse copy Z is the result)",
                {"schedule": "none", "rho": 1.0, "percdamp": 0.1, "iterations": 20, "grow_until": 15, "final": "z"}),
    "cg30": ("30 CG steps", {"cg": 30}),
    "d03": ("damping 0.03", {"percdamp": 0.03}),
}


def admm_variant(weight, hessian, sparsity, *, iterations=15, rho=0.5, percdamp=0.01, cg=10, rho_growth=1.0,
                 rho_every=1, schedule="cubic", rows=False, final="cg", grow_until=None, cross=None):
    """dist_prune.admm.admm_prune (unstructured) with its fixed choices made arguments. `cross`:
    2/n X_dense^T X_pruned, for the asymmetric objective."""
    cols = weight.shape[1]
    Wn, Hn, scale, damp = admm.normalised(weight, hessian, percdamp)
    # the damping is a ridge towards W0 in both objectives, as W0 (H + damp I) makes it
    G = Wn @ Hn if cross is None else (weight.float() @ cross.diagonal_scatter(cross.diagonal() + damp)) / scale
    eye = torch.eye(cols)

    def inverse_of(r):
        return torch.cholesky_inverse(torch.linalg.cholesky(Hn + r * eye))

    if rows:
        per_row = round(sparsity * cols)

        def keep_of(V, share):
            mask, k = torch.ones_like(V, dtype=torch.bool), round(share * per_row)
            if k:
                mask.scatter_(1, V.abs().topk(k, dim=1, largest=False).indices, False)
            return mask
    else:
        keep_of = admm._projector(math.floor(sparsity * weight.numel() + 0.5), 0, 0)
    grow = grow_until or iterations
    W, U, r = Wn.clone(), torch.zeros_like(Wn), rho
    keep, inverse = keep_of(W, 1.0), inverse_of(r)
    for step in range(iterations):
        if step < grow:
            keep = keep_of(W + U, admm._cubic(step + 1, grow) if schedule == "cubic" else 1.0)
        Z = (W + U) * keep
        U += W - Z
        W = (G + r * (Z - U)) @ inverse
        if rho_growth != 1.0 and (step + 1) % rho_every == 0 and step + 1 < iterations:
            U /= rho_growth  # the scaled dual is y / rho
            r *= rho_growth
            inverse = inverse_of(r)
    W = admm.solve_on_support((W + U) * keep, Hn, G, keep, cg) if final == "cg" else (W + U) * keep
    return (W / scale).to(weight.dtype), ~keep


def pruner(variant: str, sparsity: float):
    """(weight, hessian, cross or None) -> (new weight, mask) of a VARIANTS name."""
    kwargs = VARIANTS[variant][1]
    if kwargs is None:
        return lambda w, h, c=None: sparsegpt_prune(w, h, sparsity)
    return lambda w, h, c=None: admm_variant(w, h, sparsity, cross=c, **kwargs)


def hessians(layer, batches, names=LINEARS, dense_hidden=None):
    """{name: 2/n X^T X} of each linear's inputs over `batches` (LayerRunner batches). With
    `dense_hidden` (the dense model's inputs to this layer, batch for batch), also {name: 2/n
    X_dense^T X} and the dense layer's outputs."""
    sums, cross, count, seen, hooks, dense_out = {}, {}, {}, {}, [], []
    dense_pass = [False]

    def hook(module, inputs, name):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        if dense_pass[0]:
            seen[name] = x
            return
        sums[name] = sums.get(name, 0) + x.T @ x
        count[name] = count.get(name, 0) + x.shape[0]
        if dense_hidden is not None:
            cross[name] = cross.get(name, 0) + seen[name].T @ x

    for name in names:
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(lambda m, i, name=name: hook(m, i, name)))
    try:
        with torch.no_grad():
            for index, b in enumerate(batches):
                if dense_hidden is not None:
                    dense_pass[0] = True
                    out = layer(dense_hidden[index], **b.layer_kwargs)
                    dense_out.append(out[0] if isinstance(out, tuple) else out)
                    dense_pass[0] = False
                layer(b.hidden, **b.layer_kwargs)
    finally:
        for h in hooks:
            h.remove()
    scaled = {n: 2 * sums[n] / count[n] for n in names}
    return scaled, {n: 2 * cross[n] / count[n] for n in cross}, dense_out


def load():
    from transformers import AutoModelForCausalLM

    from dist_prune.io.checkpoint import resolve_model

    model_dir = resolve_model(None)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokens(model_dir)


def runner_on(model, windows):
    from dist_prune.layerwise import LayerRunner

    runner = LayerRunner(model)
    return runner, runner.start(windows)


def layer_errors(variant: str, sparsity: float) -> dict:
    if not CACHE.is_file():
        model, data = load()
        runner, batches = runner_on(model, data["calibration"])
        saved = {}
        for index in range(max(STUDY_LAYERS) + 1):
            if index in STUDY_LAYERS:
                layer = runner.layers[index]
                saved[index] = {n: (layer.get_submodule(n).weight.detach().clone(), h)
                                for n, h in hessians(layer, batches)[0].items()}
            batches = runner.run_layer(index, batches)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, CACHE)
    prune, errors = pruner(variant, sparsity), {}
    for index, linears in torch.load(CACHE).items():
        error = total = 0.0
        for weight, hessian in linears.values():
            delta = prune(weight, hessian)[0] - weight
            error += float(((delta @ hessian) * delta).sum())
            total += float(((weight @ hessian) * weight).sum())
        errors[f"layer {index}"] = error / total
    return errors


def perplexities(variant: str, sparsity: float, block: dict | None = None) -> dict:
    """`block`: {"epochs", "lr", "target"}: after each layer's linears are pruned, the layer is tuned
    (dist_prune/block_tuning.py) towards the dense layer's outputs on the same inputs (target
    "layer") or on the dense model's own inputs (target "dense")."""
    base = variant.removesuffix("-seq").removesuffix("-asym")
    seq, asym = variant.endswith("-seq"), variant.endswith("-asym")
    model, data = load()
    prune, started = pruner(base, sparsity), time.perf_counter()
    runner, batches = runner_on(model, data["calibration"])
    dense = [b.hidden for b in batches]
    errors = []
    for index, layer in enumerate(runner.layers):
        if block:  # the dense layer's outputs, before it is pruned
            from dist_prune.layerwise import Batch
            from dist_prune.block_tuning import tune_layer
            source = batches if block["target"] == "layer" else [Batch(h, b.layer_kwargs) for h, b in zip(dense, batches)]
            targets = [b.hidden for b in runner.run_layer(index, source)]
        masks = {}
        for group in (GROUPS if seq else (LINEARS,)):
            h, cross, dense_out = hessians(layer, batches, group, dense if asym else None)
            for name in group:
                module = layer.get_submodule(name)
                new, masks[name + ".weight"] = prune(module.weight.data, h[name], cross.get(name))
                module.weight.data.copy_(new)
        if block:
            weights = {n: layer.get_submodule(n.removesuffix(".weight")).weight.data for n in masks}
            tuned = tune_layer(layer, weights, masks, batches, targets, epochs=block["epochs"], lr=block["lr"])
            for n, w in tuned.weights.items():
                layer.get_submodule(n.removesuffix(".weight")).weight.data.copy_(w)
            errors.append((round(tuned.error_before, 5), round(tuned.error_after, 5)))
            print(index, errors[-1], round(time.perf_counter() - started), flush=True)
            dense = targets if block["target"] == "dense" else dense
        dense = dense_out if asym else dense
        batches = runner.run_layer(index, batches)
    result = {"prune_s": round(time.perf_counter() - started, 1), **({"block": block, "block_error_sums": [
        round(sum(e[0] for e in errors), 5), round(sum(e[1] for e in errors), 5)]} if block else {})}
    for text, windows in {"wikitext": data["evaluation"], **data["more_evaluation"]}.items():
        r, b = runner_on(model, windows)
        for index in range(len(r.layers)):
            b = r.run_layer(index, b)
        total, count = r.nll(b, windows)
        result[text] = round(math.exp(total / count), 2)
    return result


def write(results: dict) -> None:
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["# ADMM variants against SparseGPT (issue 18 §3)", "",
             "SmolLM2-135M-Instruct (fp32), decoder linears, calibration 32 x 512 tokens of WikiText-2 valid "
             "(seed 0), one process (`benchmarks/admm_study.py`; what each variant changes is in its VARIANTS).", "",
             "## Layer errors", "",
             "tr(dW H dW^T) / tr(W H W^T) summed over the 7 linears of a layer, the dense model's inputs; "
             "÷ SparseGPT: the mean over the three layers of the ratio to SparseGPT's.", "",
             "| variant | sparsity | layer 3 | layer 15 | layer 27 | ÷ SparseGPT |", "|---|---|---|---|---|---|"]
    lines += _rows(results["layers"], lambda errors, ref: " | ".join(f"{errors[k]:.5f}" for k in errors) + " | " + (
        f"{sum(errors[k] / ref[k] for k in errors) / len(errors):.3f}" if ref else ""))
    lines += ["", "## Perplexity", "",
              "Pruned layer by layer on the outputs of the pruned layers before; first 16 x 512 tokens of "
              "WikiText-2 test and of benchmarks/data/fortunes.txt; ÷ SparseGPT at the same sparsity. "
              "`-block<E><t><lr>`: each pruned layer then tuned for E epochs by Adam at lr "
              "(dist_prune/block_tuning.py, `--block-epochs --block-target --block-lr`) towards "
              "the dense model's output of the layer (t = d, what prune.block_tuning does) or the dense "
              "layer's output on the pruned inputs (t = l).", "",
              "| variant | sparsity | WikiText-2 | fortunes | ÷ SparseGPT | prune s |", "|---|---|---|---|---|---|"]
    lines += _rows(results["perplexity"], lambda row, ref: f"{row['wikitext']:.2f} | {row['fortunes']:.2f} | " + (
        f"{row['wikitext'] / ref['wikitext']:.3f} / {row['fortunes'] / ref['fortunes']:.3f}" if ref else "")
        + f" | {row['prune_s']}")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                  f"{torch.__version__}; threads, load and command per measurement in the json.", ""]
    OUT.with_suffix(".md").write_text("\n".join(lines))


def _rows(measured: dict, cells) -> list[str]:
    """Table rows by sparsity, then variant; cells(value, SparseGPT's value at that sparsity or None)."""
    rows = []
    for key, value in sorted(measured.items(), key=lambda kv: (kv[0].split("/")[1], kv[0])):
        variant, sparsity = key.split("/")
        rows.append(f"| {variant} | {sparsity} | {cells(value, measured.get(f'sparsegpt/{sparsity}'))} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=["layers", "perplexity"])
    parser.add_argument("variant", help=f"one of {', '.join(VARIANTS)}; perplexity also takes -seq and -asym")
    parser.add_argument("sparsity", type=float)
    parser.add_argument("--block-epochs", type=int, default=0, help="perplexity: tune each pruned layer "
                        "this many passes over the calibration windows (dist_prune/block_tuning.py)")
    parser.add_argument("--block-lr", type=float, default=1e-4)
    parser.add_argument("--block-target", choices=["layer", "dense"], default="layer")
    args = parser.parse_args()
    base = args.variant.removesuffix("-seq").removesuffix("-asym")
    if base not in VARIANTS or (args.measure == "layers" and base != args.variant) or (
            args.variant.endswith("-asym") and VARIANTS[base][1] is None):
        parser.error(f"variant {args.variant!r}: not one this measurement takes")
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    block = {"epochs": args.block_epochs, "lr": args.block_lr, "target": args.block_target} \
        if args.block_epochs else None
    result = layer_errors(args.variant, args.sparsity) if args.measure == "layers" else \
        perplexities(args.variant, args.sparsity, block)
    result = {**result, "threads": torch.get_num_threads(), "load": open("/proc/loadavg").read().split()[:3],
              "command": shlex.join(["python", "benchmarks/admm_study.py", *sys.argv[1:]])} \
        if args.measure == "perplexity" else result
    print(json.dumps(result), flush=True)
    path = OUT.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {"layers": {}, "perplexity": {}}
    key = args.variant + (f"-block{args.block_epochs}{args.block_target[0]}{args.block_lr:g}" if block else "")
    results[args.measure][f"{key}/{args.sparsity:g}"] = result
    write(results)


if __name__ == "__main__":
    main()
