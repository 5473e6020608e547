"""How much smaller is a compressed export? Bytes on disk and seconds, per export.format.

A synthetic Llama-shaped model built in-process (random weights; hidden 512, 6 layers, 8 query /
4 KV heads of 64, intermediate 1408, vocabulary 4096, untied embeddings: 21.9M parameters), its
decoder projections magnitude-pruned per tensor with torch ops (masked_fill, as dist-prune does):

  unstructured 50%   the smallest half of every projection
  2:4                the 2 smallest of every 4 consecutive inputs

Each pruned state dict is exported with `StreamingExport` in every format it allows (dense,
sparse-bitmask, and sparse-24-bitmask for 2:4), at --dtype; then each compressed export is
decompressed with `decompress_export` and checked byte for byte against the dense export.
Embeddings, norms and lm_head stay dense in every format (they are not pruned).

    nice -n 10 .venv/bin/python benchmarks/export_size.py [--dtype bfloat16 float32] [--threads 1]

Writes benchmarks/results/export_size.json and export_size.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_prune.io.decompress import decompress_export
from dist_prune.io.export import StreamingExport
from dist_prune.io.formats import FORMATS, compressed_names, stored_nonzero
from dist_prune.io.shards import TensorSpec
from threshold import machine

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
RUNS = {"unstructured 50%": ("dense", "sparse-bitmask"),
        "2:4": ("dense", "sparse-bitmask", "sparse-24-bitmask")}


def prune(w: torch.Tensor, structure: str) -> torch.Tensor:
    if structure == "2:4":
        groups = w.reshape(w.shape[0], -1, 4)
        drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            -1, groups.abs().topk(2, -1, largest=False).indices, True)
        return groups.masked_fill(drop, 0).reshape(w.shape)
    threshold = w.abs().flatten().float().kthvalue(w.numel() // 2).values
    return w.masked_fill(w.abs().float() <= threshold, 0)


def counts() -> dict:
    sd = LlamaForCausalLM(LlamaConfig(**SHAPE)).state_dict()
    total = sum(v.numel() for v in sd.values())
    pruned = sum(v.numel() for k, v in sd.items() if k.endswith("_proj.weight"))
    return {"parameters": total, "pruned_share": pruned / total}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def export(out: Path, config: dict, sd: dict[str, torch.Tensor], pruned: list[str], structure: str,
           fmt: str) -> tuple[Path, float, float]:
    wall, cpu = time.perf_counter(), cpu_s()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    # the non-zero counts the workers all-reduce from their slices before a compressed export
    compressed = compressed_names(FORMATS[fmt], [(s.name, s.shape) for s in specs], pruned)
    nonzero = {k: stored_nonzero(sd[k]) for k in compressed}
    with StreamingExport(out, specs, 10**10, FORMATS[fmt], pruned, nonzero) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        report = {"method": "magnitude", "structure": structure, "pruned_tensors": pruned}
        ex.finish(config, [], report)
    return out, time.perf_counter() - wall, cpu_s() - cpu


def size(directory: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern))


def run(dtypes: list[str], root: Path) -> list[dict]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruned = [k for k in base if ".layers." in k and k.endswith("_proj.weight")]
    config = model.config.to_dict()
    rows = []
    for dtype in dtypes:
        for structure, formats in RUNS.items():
            sd = {k: v.to(getattr(torch, dtype)) for k, v in base.items()}
            sd.update({k: prune(sd[k], structure) for k in pruned})
            dense, dense_dir = None, None
            for fmt in formats:
                out, wall, cpu = export(root / f"{dtype}-{structure[:3]}-{fmt}", config, sd, pruned, structure, fmt)
                row = {"dtype": dtype, "pruning": structure, "format": fmt, "bytes": size(out),
                       "safetensors_bytes": size(out, "*.safetensors"), "export_s": wall, "export_cpu_s": cpu}
                if fmt == "dense":
                    dense, dense_dir = row, out
                else:
                    wall, cpu = time.perf_counter(), cpu_s()
                    back = decompress_export(out, root / f"{out.name}-decompressed")
                    row.update(decompress_s=time.perf_counter() - wall, decompress_cpu_s=cpu_s() - cpu)
                    same = sorted(p.name for p in back.iterdir()) == sorted(p.name for p in dense_dir.iterdir())
                    if not same or any(p.read_bytes() != (back / p.name).read_bytes() for p in dense_dir.iterdir()):
                        sys.exit(f"{out.name}: decompressed export differs from the dense export")
                row["ratio"] = dense["bytes"] / row["bytes"]
                row["compress_s"] = row["export_s"] - dense["export_s"] if fmt != "dense" else 0.0
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Export size per export.format (synthetic Llama, {meta['parameters'] / 1e6:.1f}M parameters, "
             "random weights)", "",
             f"`{meta['command']}`: decoder projections ({meta['pruned_share']:.0%} of the parameters) "
             "magnitude-pruned, unstructured 50% or 2:4; embeddings, norms and lm_head stay dense. Every "
             "compressed export decompresses to files byte-identical to the dense export (checked).", "",
             "| dtype | pruning | export.format | bytes on disk | dense / this | export s (CPU s) | "
             "compress s: export - dense export | decompress s (CPU s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = r["format"] == "dense"
        compress = "-" if dense else f"{r['compress_s']:.2f}"
        decompress = "-" if dense else f"{r['decompress_s']:.2f} ({r['decompress_cpu_s']:.2f})"
        lines.append(f"| {r['dtype']} | {r['pruning']} | {r['format']} | {r['bytes']:,} | {r['ratio']:.2f}x | "
                     f"{r['export_s']:.2f} ({r['export_cpu_s']:.2f}) | {compress} | {decompress} |")
    lines += ["", "Seconds: wall-clock, with this process's CPU seconds in parentheses; the machine was shared "
              "(see the load average), so wall-clock includes waiting for a core and for fsync.", "",
              f"Machine: {json.dumps(meta['machine'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"command": " ".join(["nice -n 10 .venv/bin/python benchmarks/export_size.py", *sys.argv[1:]]),
            "machine": {**machine(), "torch_threads": args.threads}, "model": SHAPE,
            **counts()}
    with tempfile.TemporaryDirectory(prefix="export-size-") as tmp:
        rows = run(args.dtype, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_size.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "export_size.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
