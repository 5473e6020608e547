"""Token windows sampled from the dense model itself: text to tune on that is not one corpus.

Why: tuning on one corpus fits that corpus. On SmolLM2-135M, ADMM 50% with block tuning, 100
steps of cross-entropy on WikiText-2 valid take WikiText-2 test from 37.29 to 22.84 but the
out-of-domain fortunes text from 50.96 to 58.96, the wrong way; the same 100 steps of
distillation from the dense model on 200 windows it sampled itself take fortunes to 46.40, the
lowest of any 50% recovery arm, and leave WikiText-2 where it was (37.43;
benchmarks/results/recovery.md). The dense model's own samples cover what it knows, prose and
code alike, so matching the teacher on them carries to text neither has seen: LLM-QAT's
data-free distillation (Liu et al., 2023, arXiv:2305.17888). Calibrating on them is
self-calibration (Williams et al., 2025, arXiv:2410.17170).

Sampling, as LLM-QAT: each window starts from a token drawn uniformly from the vocabulary (no
special tokens) and goes on with plain sampling at temperature 1 (no top-k, no top-p: the
teacher's own distribution), end-of-sequence tokens suppressed so every window is whole. One
seeded generator per batch of `BATCH` windows: the windows depend on the seed only, not on
how many workers a job has. Sampled once, on the driver (job.prepare), and cached by model
and settings (`$DIST_PRUNE_CACHE/generated`): a sweep's trials and a re-run reuse them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_prune.config import JobConfig, calibration_split, reads_training_text, sampled_windows_of
from dist_prune.io.checkpoint import cache_dir
from dist_prune.report import progress

# windows sampled side by side, one seeded generator each batch: 200 windows x 256 tokens took
# 9 minutes for SmolLM2-135M on 2 CPU cores (2.7 s per window); a larger batch holds a larger KV
# cache, and changes which windows a seed gives
BATCH = 16


def sampled_inputs(cfg: JobConfig, model_dir: Path, special_ids: list[int], shard_sha256: dict[str, str], *,
                   show: bool) -> dict[str, torch.Tensor]:
    """The windows `cfg` asks to sample instead of reading a text: "calibration"
    (data.calibration.generated, a method that calibrates) and "training"
    (finetune.data.generated_windows, a job that tunes); `show`: a progress line each."""
    out = {}
    for role, (count, seq_len, seed) in sampled_windows_of(cfg).items():
        bar = progress(count, f"sample {role} windows from the dense model", enabled=show)
        out[role] = sampled_windows(model_dir, count, seq_len, seed, special_ids=special_ids,
                                    fingerprint=json.dumps(shard_sha256, sort_keys=True), progress=bar)
        bar.close()
    return out


def with_samples(cfg: JobConfig, calibration: torch.Tensor | None, training: torch.Tensor | None,
                 sampled: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The calibration and fine-tuning windows of a job that samples some (`sampled`, by role):
    the sampled ones alone, or after the text's where a share below 1 mixes the two
    (data.calibration.generated_share; finetune.data.generated_share, whose
    train/schedule.step_windows draws the share of each step from these last rows)."""
    def text_then_sampled(text: torch.Tensor | None, role: str) -> torch.Tensor:
        return sampled[role] if text is None else torch.cat([text, sampled[role]])

    if "calibration" in sampled:
        calibration = text_then_sampled(calibration if calibration_split(cfg)[0] else None, "calibration")
    if "training" in sampled:
        training = text_then_sampled(training if reads_training_text(cfg) else None, "training")
    return calibration, training


def sampled_windows(model_dir: Path, num_windows: int, seq_len: int, seed: int, *, special_ids: list[int],
                    fingerprint: str, progress=None) -> torch.Tensor:
    """`num_windows` windows of `seq_len` tokens sampled from the causal LM in `model_dir`,
    int64 [num_windows, seq_len], never one of `special_ids` (the tokenizer's special tokens);
    from the cache when the same model (`fingerprint`: its weights' sha256) and settings made
    them before."""
    key = hashlib.sha256(json.dumps([fingerprint, num_windows, seq_len, seed, BATCH]).encode()).hexdigest()[:16]
    cached = cache_dir() / "generated" / f"{key}.safetensors"
    if cached.is_file():
        return load_file(cached)["windows"]
    from transformers import AutoModelForCausalLM  # lazy: only a job that samples loads the model whole

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).eval()
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    batches = []
    for index in range(0, num_windows, BATCH):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        batches.append(sample(model, min(BATCH, num_windows - index), seq_len, special, generator))
        if progress is not None:
            progress.update(batches[-1].shape[0])
    windows = torch.cat(batches)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: two jobs sampling the same windows at once do not write into one file, and
    # a crash leaves no half-written windows under the final name
    partial = cached.with_name(f".{cached.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file({"windows": windows.contiguous()}, partial)
    partial.replace(cached)
    return windows


@torch.no_grad()
def sample(model: torch.nn.Module, count: int, seq_len: int, special: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    """`count` windows: a uniform first token that is not special, then temperature-1 sampling
    with the special tokens masked out. Incremental decoding with the model's KV cache."""
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special[special < vocab]] = False
    ordinary = allowed.nonzero().squeeze(1)
    tokens = ordinary[torch.randint(len(ordinary), (count, 1), generator=generator)]
    out, past = [tokens], None
    for _ in range(seq_len - 1):
        step = model(input_ids=tokens, cache=past, use_cache=True)
        past = step.cache
        logits = step.logits[:, -1].float().masked_fill(~allowed, float("-inf"))
        tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        out.append(tokens)
    return torch.cat(out, dim=1)

