"""One llm-compressor oneshot run on given token windows: its prune seconds and perplexity.

Runs in a virtualenv that has llm-compressor (it pins its own transformers), never imports
dist_prune; benchmarks/vs_llmcompressor.py starts it and gives it the windows it gives ours:

    python _llmcompressor_run.py MODEL_DIR WINDOWS.pt wanda|sparsegpt N:M|unstructured SPARSITY THREADS

Prints one JSON line: {"seconds": prune seconds (oneshot), "perplexity": ..., "versions": ...}.
Targets are llm-compressor's defaults, every Linear (lm_head included), as in its published runs.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch


def perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over the windows, one window at a time (as dist-prune does)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(total / count)


def main() -> None:
    model_dir, windows_path, method, structure, sparsity, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    windows = torch.load(windows_path)
    calibration, evaluation = windows["calibration"], windows["evaluation"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    mask = "0:0" if structure == "unstructured" else structure
    recipe = modifier(sparsity=float(sparsity), mask_structure=mask, targets=["Linear"])
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
            max_seq_length=calibration.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - started
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    print(json.dumps({"seconds": seconds, "perplexity": perplexity(model, evaluation), "zero_fraction": zeros,
                      "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                                   "torch": torch.__version__}}), flush=True)


if __name__ == "__main__":
    main()
