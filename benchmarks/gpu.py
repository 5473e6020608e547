"""The GPU path measured on one CUDA GPU, three measurements side by side in one run:

  (a) selection   N float32 scores |normal| on the GPU (1e9 if memory allows, else 5e8): `x.sum()`,
                  one read pass at HBM bandwidth, against `select_pruned` (one process, scope
                  global, sparsity 0.5, masks included). GB/s is 4N bytes over the median time.
  (b) Wanda 50%   a 7B-shaped synthetic bf16 Llama checkpoint (benchmarks/make_checkpoint.py
                  --params 7e9, written once into --cache) through the worker recipe on one GPU:
                  a single-rank nccl process group, no Ray. Seconds per stage and peak GPU memory.
  (c) 2:4 matmul  linear layers [out, in] = 4096x11008 and 11008x4096 on 2048 tokens, fp16 and
                  bf16: the 2:4 mask from dist_prune.structures.nm_mask on |W|, the pruned weight
                  converted with torch.sparse.to_sparse_semi_structured; time against the dense
                  masked layer, speedup, and the max abs difference of the two outputs.

Times are medians of --repeats calls after one warm-up, measured with CUDA events.

    .venv/bin/python benchmarks/gpu.py [--repeats 10] [--cache DIR] [--skip-wanda] [--require-cuda]

Writes benchmarks/results/gpu.json and gpu.md, naming the GPU. Without CUDA it runs what a CPU can
check on small sizes (the 2:4 mask and its pattern, the selection, the 7B checkpoint's shape,
computed and not written), prints one line naming the skipped measurements and exits 0 (1 with
--require-cuda); it writes no results then.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _ranks import RESULTS, _free_port, run_job  # noqa: E402
from make_checkpoint import llama_config, tensor_specs  # noqa: E402

from dist_prune import selection  # noqa: E402
from dist_prune.selection import Segment, prune_counts, select_pruned  # noqa: E402
from dist_prune.structures import NM, nm_mask  # noqa: E402

SPARSITY = 0.5
SELECT_SIZES = (1_000_000_000, 500_000_000)
# Bytes per score at the peak: the float32 scores and select_pruned's bool mask (its chunked passes
# and the few candidates near the threshold add little), then the exactness check's copies of the
# pruned and the kept scores and the inverted mask: 4 + 1 + 4 + 1.
SELECT_BYTES_PER_SCORE = 10
LINEARS = ((4096, 11008), (11008, 4096))  # [out, in]: Llama-7B down_proj and up/gate_proj
TOKENS = 2048
BACKENDS = ("cusparselt", "cusparselt-searched", "cutlass")
# select_pruned settings timed side by side with the defaults in (a)
SELECT_VARIANTS = {
    "top-16-bit histogram in one copy (the CPU's way)": {"HIST_LANES": {"cuda": 1}},
    **{f"{chunk:,} scores per step": {"CUDA_CHUNK": chunk} for chunk in (1 << 22, 1 << 24, 1 << 28)},
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CALIBRATION = (128, 2048)  # windows x tokens, as in the Wanda paper
EVALUATION = (8, 2048)
SKIPPED = ("(a) selection on the GPU", "(b) Wanda 50% on the 7B-shaped checkpoint", "(c) 2:4 sparse matmul")


# --- pure helpers ----------------------------------------------------------------------------------


def select_size(free_bytes: int, sizes: tuple[int, ...] = SELECT_SIZES) -> int:
    """The first of `sizes` whose selection fits in `free_bytes`, else the last one."""
    return next((n for n in sizes if n * SELECT_BYTES_PER_SCORE <= free_bytes), sizes[-1])


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Bool [out, in], True = pruned: the 2 smallest |w| of every 4 consecutive inputs of a row."""
    scores = weight.detach().abs().float().reshape(-1)
    return nm_mask(scores, 0, tuple(weight.shape), NM(2, 4)).view(weight.shape)


def nm_pattern_ok(weight: torch.Tensor, mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Every m consecutive inputs of every row have exactly n pruned, and no pruned |w| exceeds a
    kept one of its group."""
    if mask.shape != weight.shape or weight.shape[-1] % m:
        return False
    groups, magnitude = mask.reshape(-1, m), weight.detach().abs().float().reshape(-1, m)
    if not bool((groups.sum(1) == n).all()):
        return False
    pruned_max = magnitude.masked_fill(~groups, -torch.inf).amax(1)
    kept_min = magnitude.masked_fill(groups, torch.inf).amin(1)
    return bool((pruned_max <= kept_min).all())


def checkpoint_facts(params: float, vocab: int = 32000) -> dict:
    """Shape and size of the synthetic bf16 checkpoint make_checkpoint.py writes for `params`."""
    cfg = llama_config(params, vocab)
    specs = tensor_specs(cfg, torch.bfloat16)
    return {"parameters": sum(s.numel for s in specs), "bytes": sum(s.nbytes for s in specs),
            "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
            "intermediate": cfg["intermediate_size"], "vocab": vocab}


def gb_per_s(n: int, seconds: float) -> float:
    return 4 * n / seconds / 1e9


# --- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Seconds per call after one warm-up: CUDA events on a GPU (host syncs inside `fn` count,
    the time between the events is wall time on the stream), the wall clock on the CPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


# --- (a) selection ---------------------------------------------------------------------------------


def measure_selection(n: int, device: torch.device, repeats: int, variants: dict[str, dict] | None = None) -> dict:
    """x.sum() and select_pruned on N scores |normal| on `device`; the selection checked exact.
    `variants`: also time select_pruned with these dist_prune.selection settings, by label."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, device=device).normal_(generator=generator).abs_()
    counts = prune_counts(SPARSITY, [n])
    k = int(counts)
    [mask] = select_pruned([Segment(x, 0, 0)], [n], counts)
    exact = int(mask.sum()) == k and bool(x[mask].max() <= x[~mask].min())
    del mask
    if not exact:
        raise AssertionError("select_pruned did not prune exactly the k smallest scores")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sums = timed(lambda: x.sum(), repeats, device)
    selects = timed(lambda: select_pruned([Segment(x, 0, 0)], [n], counts), repeats, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    s_sum, s_select = statistics.median(sums), statistics.median(selects)
    by_variant = {}
    for label, values in (variants or {}).items():
        saved = {name: getattr(selection, name) for name in values}
        try:
            for name, value in values.items():
                setattr(selection, name, value)
            by_variant[label] = statistics.median(
                timed(lambda: select_pruned([Segment(x, 0, 0)], [n], counts), repeats, device))
        finally:
            for name, value in saved.items():
                setattr(selection, name, value)
    return {"n": n, "k": k, "exact": exact, "sum_s": s_sum, "select_s": s_select, "sum_times_s": sums,
            "select_times_s": selects, "sum_gb_per_s": gb_per_s(n, s_sum),
            "select_gb_per_s": gb_per_s(n, s_select), "of_bandwidth": s_sum / s_select,
            "peak_gpu_bytes": peak, "select_s_by_variant": by_variant}


# --- (c) 2:4 sparse matmul -------------------------------------------------------------------------


def measure_sparse_matmul(out_features: int, in_features: int, dtype: torch.dtype, repeats: int,
                          backend: str) -> dict:
    """A 2:4-pruned linear layer as a semi-structured sparse tensor (`backend`: cusparselt or
    cutlass) against the masked dense one, in both operand orders: F.linear(x, W) = x Wᵀ as a model
    calls it, and (W xᵀ)ᵀ with the sparse operand first, which the kernels take without a transpose."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(out_features, in_features, device=device, generator=generator).to(dtype)
    pruned = two_four_mask(weight)
    if not nm_pattern_ok(weight, pruned):
        raise AssertionError("nm_mask did not give a 2:4 pattern of the smallest |w|")
    dense = weight.masked_fill(pruned, 0)
    semi = torch.sparse.SparseSemiStructuredTensor
    semi._FORCE_CUTLASS = backend == "cutlass"
    try:
        sparse = torch.sparse.to_sparse_semi_structured(dense)
    finally:
        semi._FORCE_CUTLASS = False
    x = torch.randn(TOKENS, in_features, device=device, generator=generator).to(dtype)
    xt = x.t().contiguous()
    if backend == "cusparselt-searched":  # cuSPARSELt's own search for this product's fastest algorithm
        sparse.alg_id_cusparselt = torch._cslt_sparse_mm_search(sparse.packed, xt)
    reference = F.linear(x, dense)
    error = max((F.linear(x, sparse).float() - reference.float()).abs().max().item(),
                (torch.mm(sparse, xt).t().float() - reference.float()).abs().max().item())
    dense_s = statistics.median(timed(lambda: F.linear(x, dense), repeats, device))
    linear_s = statistics.median(timed(lambda: F.linear(x, sparse), repeats, device))
    first_s = statistics.median(timed(lambda: torch.mm(sparse, xt), repeats, device))
    flops = 2 * TOKENS * out_features * in_features  # of the dense product
    return {"weight": [out_features, in_features], "tokens": TOKENS, "dtype": str(dtype).removeprefix("torch."),
            "backend": backend, "dense_s": dense_s, "sparse_linear_s": linear_s,
            "sparse_first_s": first_s, "speedup_linear": dense_s / linear_s, "speedup_first": dense_s / first_s,
            "dense_tflops": flops / dense_s / 1e12, "max_abs_error": error,
            "reference_max_abs": reference.abs().max().item()}


# --- (b) Wanda on the 7B-shaped checkpoint ---------------------------------------------------------


def ensure_checkpoint(cache: Path, params: float) -> Path:
    """The synthetic checkpoint (benchmarks/scale.py's cache layout), written on first use."""
    directory = cache / f"llama-{params:.1e}"
    if not (directory / "config.json").exists():  # written last: a complete checkpoint
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoint.py"), str(directory),
                        "--params", str(params)], check=True)
    return directory


def wanda_data(model_dir: Path) -> dict:
    """Calibration and evaluation windows of the built-in corpus, tokenized by the checkpoint's
    tokenizer (timing only: the weights are random, so the perplexity means nothing)."""
    from transformers import AutoTokenizer

    from dist_prune.data import calibration_windows, read_text, tokenize

    ids = tokenize(read_text(None, role="calibration"), AutoTokenizer.from_pretrained(model_dir))
    return {"model": str(model_dir),
            "calibration": calibration_windows(ids, *CALIBRATION, 0, source="built-in corpus"),
            "evaluation": calibration_windows(ids, *EVALUATION, 1, source="built-in corpus")}


def measure_wanda(model_dir: Path) -> dict:
    """The worker recipe (load, calibrate, score+select+mask, evaluate, export) on a single-rank
    nccl process group on GPU 0."""
    from dist_prune.io.checkpoint import configure_jit_builds

    configure_jit_builds()
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    data = wanda_data(model_dir)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        metrics = run_job(["prune.method=wanda", f"prune.sparsity={SPARSITY}", "cluster.use_gpu=true",
                           "eval.dense=false", f"eval.seq_len={EVALUATION[1]}"], data)
    finally:
        torch.distributed.destroy_process_group()
    keep = ("seconds_load", "seconds_calibrate", "seconds_score+select+mask", "seconds_evaluate",
            "seconds_export", "seconds_total", "sparsity", "model_bytes_per_worker")
    return {"checkpoint": str(model_dir), "calibration": list(CALIBRATION), "evaluation": list(EVALUATION),
            **{k: metrics[k] for k in keep if k in metrics},
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved()}


# --- report ----------------------------------------------------------------------------------------


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return {"name": torch.cuda.get_device_name(0), "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cusparselt": bool(cusparselt and cusparselt.is_available())}


def markdown(results: dict) -> str:
    gpu, lines = results["gpu"], []
    lines += ["# The GPU path on one GPU", "",
              f"{gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB, compute capability {gpu['capability']}), "
              f"torch {gpu['torch']}, CUDA {gpu['cuda']}, cuSPARSELt {'available' if gpu['cusparselt'] else 'absent'}. "
              f"Medians of {results['repeats']} calls after one warm-up (CUDA events).", ""]
    if "selection" in results:
        s = results["selection"]
        lines += ["## (a) Exact selection against HBM bandwidth", "",
                  f"N = {s['n']:,} float32 scores |normal|, sparsity {SPARSITY}, scope global, one process; "
                  f"select_pruned pruned exactly k = {s['k']:,}. Peak GPU memory "
                  f"{s['peak_gpu_bytes'] / 2**30:.1f} GiB.", "",
                  "| operation | median s | GB/s | ÷ bandwidth |", "|---|---|---|---|",
                  f"| x.sum() | {s['sum_s']:.4f} | {s['sum_gb_per_s']:.0f} | 1.000 |",
                  f"| select_pruned (defaults: {selection.CUDA_CHUNK:,} scores per step, histogram in "
                  f"{selection.HIST_LANES['cuda']} copies) | {s['select_s']:.4f} | {s['select_gb_per_s']:.0f} | {s['of_bandwidth']:.3f} |",
                  *(f"| select_pruned, {label} | {t:.4f} | {gb_per_s(s['n'], t):.0f} | {s['sum_s'] / t:.3f} |"
                    for label, t in s.get("select_s_by_variant", {}).items()), ""]
    if "sparse_matmul" in results:
        lines += ["## (c) 2:4 sparse linear layer against dense", "",
                  f"{TOKENS} tokens; mask by `nm_mask` on |W|, `torch.sparse.to_sparse_semi_structured`. "
                  "`x Wᵀ` is F.linear(x, W) as a model calls it; `W xᵀ` puts the sparse operand first "
                  "(the layout the kernels take without a transpose). Speedup = dense ÷ sparse time.", "",
                  "| weight [out, in] | dtype | backend | dense | sparse x Wᵀ | speedup | sparse W xᵀ | speedup "
                  "| dense TFLOP/s | max abs error |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["sparse_matmul"]:
            lines.append(f"| {r['weight'][0]}x{r['weight'][1]} | {r['dtype']} | {r['backend']} | "
                         f"{r['dense_s'] * 1e3:.3f} ms | {r['sparse_linear_s'] * 1e3:.3f} ms | "
                         f"{r['speedup_linear']:.2f} | {r['sparse_first_s'] * 1e3:.3f} ms | {r['speedup_first']:.2f} | "
                         f"{r['dense_tflops']:.0f} | {r['max_abs_error']:.3g} (of {r['reference_max_abs']:.3g}) |")
        lines += [f"- {backend}: {why}" for backend, why in results.get("sparse_matmul_unsupported", {}).items()]
        lines.append("")
    if "wanda" in results:
        w, c = results["wanda"], results["checkpoint"]
        stages = [k for k in w if k.startswith("seconds_")]
        lines += ["## (b) Wanda 50% on a 7B-shaped checkpoint, one GPU", "",
                  f"Synthetic bf16 Llama: {c['parameters'] / 1e9:.2f}B parameters, {c['layers']} layers, hidden "
                  f"{c['hidden']}, {c['bytes'] / 1e9:.1f} GB. Worker recipe on a single-rank nccl group; "
                  f"calibration {w['calibration'][0]} x {w['calibration'][1]} tokens, evaluation "
                  f"{w['evaluation'][0]} x {w['evaluation'][1]} (sparse model only), export to local disk.", "",
                  "| " + " | ".join(k.removeprefix("seconds_") for k in stages) + " | peak GPU memory |",
                  "|" + "---|" * (len(stages) + 1),
                  "| " + " | ".join(f"{w[k]:.1f} s" for k in stages)
                  + f" | {w['peak_gpu_bytes'] / 2**30:.1f} GiB allocated, {w['peak_gpu_reserved_bytes'] / 2**30:.1f} reserved |",
                  "", f"Sparsity reached: {w.get('sparsity', float('nan')):.4f}.", ""]
    return "\n".join(lines)


def save(results: dict) -> None:
    """After every measurement: a later one failing keeps the earlier ones."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "gpu.md").write_text(markdown(results))


# --- the two paths ---------------------------------------------------------------------------------


def cpu_checks(cpu_n: int, params: float) -> list[str]:
    """What a CPU can check of the three measurements, on small sizes."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    ok = nm_pattern_ok(weight, two_four_mask(weight))
    s = measure_selection(cpu_n, torch.device("cpu"), repeats=1)
    c = checkpoint_facts(params)
    return [f"(a) selection of N = {s['n']:,} on the CPU: exact, x.sum() {s['sum_gb_per_s']:.1f} GB/s, "
            f"select_pruned {s['select_gb_per_s']:.2f} GB/s ({s['of_bandwidth']:.3f} of the bandwidth)",
            f"(b) checkpoint for --params {params / 1e9:g}e9 (not written): {c['parameters'] / 1e9:.2f}B "
            f"parameters, {c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, "
            f"{c['bytes'] / 1e9:.1f} GB in bfloat16",
            f"(c) 2:4 mask of a 64x128 weight from nm_mask: pattern {'ok' if ok else 'BROKEN'} "
            "(2 of every 4 inputs of a row pruned, the smallest |w|)"]


def gpu_run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    results: dict = {"gpu": gpu_info(), "repeats": args.repeats, "checkpoint": checkpoint_facts(args.params)}
    print(f"GPU: {results['gpu']['name']}", flush=True)
    free, _ = torch.cuda.mem_get_info()
    results["selection"] = measure_selection(int(args.n) if args.n else select_size(free), device, args.repeats,
                                             SELECT_VARIANTS)
    save(results)
    torch.cuda.empty_cache()
    results["sparse_matmul"], results["sparse_matmul_unsupported"] = [], {}
    for backend in BACKENDS:
        try:
            results["sparse_matmul"] += [measure_sparse_matmul(out_f, in_f, dtype, args.repeats, backend)
                                         for dtype in DTYPES.values() for out_f, in_f in LINEARS]
        except (RuntimeError, TypeError, AttributeError) as error:  # e.g. CUTLASS's: compute capability 8.x only
            results["sparse_matmul_unsupported"][backend] = str(error).splitlines()[0]
    save(results)
    torch.cuda.empty_cache()
    if not args.skip_wanda:
        results["wanda"] = measure_wanda(ensure_checkpoint(args.cache, args.params))
        save(results)
    print(markdown(results), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--n", type=float, help="selection size (default 1e9 if memory allows, else 5e8)")
    parser.add_argument("--params", type=float, default=7e9, help="synthetic checkpoint size for (b)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dist-prune" / "bench")
    parser.add_argument("--skip-wanda", action="store_true", help="leave out (b)")
    parser.add_argument("--cpu-n", type=float, default=1e6, help="selection size of the CPU checks")
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is not available")
    args = parser.parse_args()

    if torch.cuda.is_available():
        gpu_run(args)
        return 0
    for line in cpu_checks(int(args.cpu_n), args.params):
        print(line, flush=True)
    print(f"CUDA is not available: skipped {', '.join(SKIPPED)}", flush=True)
    return 1 if args.require_cuda else 0


if __name__ == "__main__":
    sys.exit(main())
