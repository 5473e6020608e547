"""Sparse-NEFT fine-tuning in the worker recipe, on gloo ranks without Ray: masks kept
exactly through optimizer steps at ZeRO stages 2 and 3, gradual cubic pruning with
training-time scorers, NEFTune noise, and exact resumption from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dist_prune.config import load_config, to_dict
from dist_prune.data import eval_windows, tokenize, training_windows
from dist_prune.train.state import Hooks
from dist_prune.worker import WorkerJob, run_worker
from multirank import run_on_ranks

SEQ = 32
BASE = ["eval.num_windows=4", f"eval.seq_len={SEQ}", f"finetune.data.seq_len={SEQ}",
        "finetune.lr=3e-3", "finetune.warmup_steps=2", "finetune.log_interval=5",
        "finetune.micro_batch_size=2", "finetune.gradient_accumulation_steps=2",
        "prune.method=magnitude", "prune.scope=layer", "eval.dense=false"]
CASES = {  # name -> overrides
    "oneshot-zero3": ["finetune.steps=20", "prune.sparsity=0.5", "finetune.zero_stage=3"],
    "oneshot-zero2": ["finetune.steps=20", "prune.sparsity=0.5", "finetune.zero_stage=2"],
    "oneshot-zero0": ["finetune.steps=20", "prune.sparsity=0.5", "finetune.zero_stage=0"],
    "cubic-magnitude": ["finetune.steps=12", "prune.schedule=cubic", "prune.method=magnitude",
                        "prune.sparsity=0.6", "prune.interval=4", "prune.end_step=8",
                        "finetune.neftune.dynamic=true"],
    # the last 16 of the 64 windows stand for windows sampled from the dense model, half of each step
    # (distilled from the dense model on those only)
    "oneshot-mixed": ["finetune.steps=20", "prune.sparsity=0.5", "finetune.data.generated_windows=16",
                      "finetune.data.generated_share=0.5", "finetune.distill.beta=0.5",
                      "finetune.distill.windows=sampled"],
    "oneshot-distill": ["finetune.steps=6", "prune.sparsity=0.5", "finetune.distill.beta=0.5"],
    # oneshot-zero3 with the teacher's layer outputs as a second target (finetune.distill.hidden)
    "oneshot-hidden": ["finetune.steps=20", "prune.sparsity=0.5", "finetune.zero_stage=3",
                       "finetune.distill.hidden=10"],
    "cubic-seven": ["finetune.steps=12", "prune.schedule=cubic", "prune.method=seven",
                    "prune.sparsity=0.5", "prune.interval=3", "prune.scope=global"],
}


def _data(model_dir: Path, text: str):
    ids = tokenize(text, AutoTokenizer.from_pretrained(model_dir))
    return training_windows(ids, SEQ, source="t")[:64], eval_windows(ids, 4, SEQ, source="t")


def _run_cases(model_dir: str, out_dir: str, train, evalw) -> dict:
    rank = torch.distributed.get_rank()
    results = {}
    for name, overrides in CASES.items():
        cfg = load_config(None, [f"model.path={model_dir}", *BASE, *overrides])
        job = WorkerJob(to_dict(cfg), model_dir, None, evalw, f"{out_dir}/{name}",
                        {"method": cfg.prune.method}, training=train)
        logged = []
        hooks = Hooks(log=lambda step, row: logged.append((step, row)))
        results[name] = {"metrics": run_worker(job, hooks), "logged": logged}
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def tuned(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    train, evalw = _data(tiny_llama, text_file.read_text())
    results = run_on_ranks(_run_cases, 2, str(tiny_llama), str(out), train, evalw)[0]
    return out, results


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The one-shot magnitude mask of one tensor (layer scope), ties to the lower index."""
    flat = weight.float().abs().flatten()
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = True
    return pruned.view(weight.shape)


@pytest.mark.parametrize("case", ["oneshot-zero3", "oneshot-zero2", "oneshot-zero0", "oneshot-mixed"])
def test_exported_zeros_are_exactly_the_oneshot_mask(tuned, tiny_llama, case):
    """After 20 steps the exported weights are zero exactly on the mask chosen before
    training, and every other weight moved (embeddings and norms are trained too)."""
    out, results = tuned
    manifest = json.loads((out / case / "sparsity.json").read_text())
    weights, dense = _weights(out / case), _weights(tiny_llama)
    pruned_names = [n for n, entry in manifest["tensors"].items() if entry["pruned"]]
    assert pruned_names
    for name in pruned_names:
        mask = _magnitude_mask(dense[name], 0.5)
        assert torch.all(weights[name][mask] == 0), name
        assert torch.all(weights[name][~mask] != 0), name
    for name in dense:
        assert not torch.equal(weights[name], dense[name]), f"{name} was not trained"


@pytest.mark.parametrize("case", ["cubic-magnitude", "cubic-seven"])
def test_gradual_masks_are_exact_in_the_export(tuned, case):
    """The zeros of each exported tensor are exactly the worker's final mask count."""
    out, results = tuned
    manifest = json.loads((out / case / "sparsity.json").read_text())
    counts = manifest["pruned_counts"]
    metrics = results[case]["metrics"]
    assert sum(counts.values()) == metrics["pruned"]
    for name, count in counts.items():
        assert manifest["tensors"][name]["zeros"] == count, name


def test_oneshot_sparsity_is_exact_and_kept(tuned):
    _, results = tuned
    for case in ("oneshot-zero3", "oneshot-zero2", "oneshot-zero0"):
        m = results[case]["metrics"]
        assert m["pruned"] == m["prunable"] // 2
        assert m["perplexity_sparse"] < m["perplexity_pruned"], "fine-tuning lowers perplexity"


@pytest.mark.parametrize("other", ["oneshot-zero2", "oneshot-zero0"])
def test_every_stage_trains_the_same_model(tuned, other):
    """Same data, same noise, same optimizer: ZeRO stages 2 and 3 and plain data parallelism
    (stage 0) differ only in what they partition, so they end at (float-)equal weights."""
    out, _ = tuned
    a, b = _weights(out / "oneshot-zero3"), _weights(out / other)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_cubic_schedule_reaches_target_through_the_schedule(tuned):
    _, results = tuned
    logged = results["cubic-magnitude"]["logged"]
    sparsity = {step: row["train/sparsity"] for step, row in logged if "train/sparsity" in row}
    # pruning at steps 0, 4, 8 (before the step's forward): logged after steps 1, 5, 9
    assert sparsity[1] == 0.0  # s_0 = initial = 0
    assert 0.0 < sparsity[5] < 0.6
    assert sparsity[9] == pytest.approx(0.6, abs=1e-3)
    assert sparsity[12] == sparsity[9]
    m = results["cubic-magnitude"]["metrics"]
    assert m["pruned"] == round(0.6 * m["prunable"]) or abs(m["pruned"] - 0.6 * m["prunable"]) < 10
    alphas = [row["train/neftune_alpha"] for _, row in logged if "train/neftune_alpha" in row]
    assert alphas and all(0 < a <= 5.0 for a in alphas)


RESUMABLE = ["finetune.steps=12", "prune.schedule=cubic", "prune.method=seven", "prune.sparsity=0.5",
             "prune.interval=3", "finetune.neftune.dynamic=true", "finetune.checkpoint_interval=5"]


def _interrupted_and_resumed(model_dir: str, out_dir: str, train, evalw, stage: int) -> None:
    """Run once with checkpoints (kept on disk), then again from the step-5 checkpoint."""
    from dist_prune.train.resume import save_train_state

    overrides = [f"model.path={model_dir}", *BASE, *RESUMABLE, f"finetune.zero_stage={stage}"]
    if stage == 2:
        overrides[overrides.index("prune.method=seven")] = "prune.method=magnitude"
    cfg = load_config(None, overrides)

    def save(state, training, metrics):
        directory = Path(out_dir) / f"ckpt-{stage}-{state.step}"
        directory.mkdir(exist_ok=True)
        save_train_state(directory, state, training, {"metrics": metrics})

    job = WorkerJob(to_dict(cfg), model_dir, None, evalw, f"{out_dir}/full-{stage}", {}, training=train)
    run_worker(job, Hooks(checkpoint=save))
    job.export_dir = f"{out_dir}/resumed-{stage}"
    run_worker(job, Hooks(resume=Path(out_dir) / f"ckpt-{stage}-5"))


@pytest.mark.parametrize("stage", [3, 2, 0])
def test_resumed_run_equals_uninterrupted_run(tiny_llama, text_file, tmp_path, stage):
    """Resuming at step 5 restores masters, moments, masks, scores, data position, noise and
    dynamic alpha: the result is bit-identical to the run that never stopped."""
    train, evalw = _data(tiny_llama, text_file.read_text())
    run_on_ranks(_interrupted_and_resumed, 2, str(tiny_llama), str(tmp_path), train, evalw, stage)
    full, resumed = _weights(tmp_path / f"full-{stage}"), _weights(tmp_path / f"resumed-{stage}")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    a = json.loads((tmp_path / f"full-{stage}" / "sparsity.json").read_text())["pruned_counts"]
    b = json.loads((tmp_path / f"resumed-{stage}" / "sparsity.json").read_text())["pruned_counts"]
    assert a == b and sum(a.values()) > 0


def test_distillation_trains_with_the_mask_kept(tuned):
    out, results = tuned
    m = results["oneshot-distill"]["metrics"]
    assert m["pruned"] == m["prunable"] // 2
    manifest = json.loads((out / "oneshot-distill" / "sparsity.json").read_text())
    assert all(manifest["tensors"][n]["zeros"] == c for n, c in manifest["pruned_counts"].items())


def test_distill_loss_known_answers():
    from dist_prune.train.distill import distill_loss

    torch.manual_seed(0)
    student, targets = torch.randn(5, 7), torch.randint(0, 7, (5,))
    ce = torch.nn.functional.cross_entropy(student, targets)
    assert torch.equal(distill_loss(student, None, targets, 0.0, 2.0), ce)
    # identical teacher: KL = 0, only the hard term remains
    torch.testing.assert_close(distill_loss(student, student.clone(), targets, 0.25, 2.0), 0.75 * ce)
    teacher = torch.randn(5, 7)
    p_t = torch.softmax(teacher / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(distill_loss(student, teacher, targets, 1.0, 2.0), 4 * kl)
    # the teacher's term on the last two tokens only (finetune.distill.windows=sampled): the first
    # three keep plain cross-entropy, all five averaged together
    distilled = torch.tensor([False, False, False, True, True])
    ce_tok = torch.nn.functional.cross_entropy(student, targets, reduction="none")
    kl_tok = (p_t * (p_t.log() - torch.log_softmax(student / 2, -1))).sum(-1)
    expected = (ce_tok[:3].sum() + 0.5 * ce_tok[3:].sum() + 0.5 * 4 * kl_tok[3:].sum()) / 5
    torch.testing.assert_close(distill_loss(student, teacher, targets, 0.5, 2.0, distilled), expected)
    torch.testing.assert_close(distill_loss(student, teacher, targets, 0.5, 2.0, torch.zeros(5, dtype=torch.bool)),
                               ce)


def _layer_distance(student_dir: Path, teacher_dir: Path, ids: torch.Tensor) -> float:
    """hidden_loss between two exported models' decoder layer outputs on `ids`."""
    from transformers import AutoModelForCausalLM

    from dist_prune.train.distill import LayerOutputs, hidden_loss

    outputs = []
    for directory in (student_dir, teacher_dir):
        model = AutoModelForCausalLM.from_pretrained(directory)
        layers = LayerOutputs(model.model.layers)
        layers.capturing = True
        with torch.no_grad():
            model(input_ids=ids)
        outputs.append(layers.take())
        layers.remove()
    return hidden_loss(*outputs).item()


def test_the_layer_output_term_pulls_the_student_towards_the_teacher(tuned, tiny_llama, text_file):
    """oneshot-hidden differs from oneshot-zero3 by finetune.distill.hidden alone: its layer
    outputs end closer to the dense model's, and its masks are kept exactly."""
    out, results = tuned
    m = results["oneshot-hidden"]["metrics"]
    assert m["pruned"] == m["prunable"] // 2 and m["finetune_zero_stage"] == 3
    manifest = json.loads((out / "oneshot-hidden" / "sparsity.json").read_text())
    assert all(manifest["tensors"][n]["zeros"] == c for n, c in manifest["pruned_counts"].items())
    _, evalw = _data(tiny_llama, text_file.read_text())
    with_term = _layer_distance(out / "oneshot-hidden", tiny_llama, evalw)
    without = _layer_distance(out / "oneshot-zero3", tiny_llama, evalw)
    assert with_term < 0.5 * without, (with_term, without)


def test_hidden_loss_known_answers():
    from dist_prune.train.distill import hidden_loss

    torch.manual_seed(0)
    teacher = [torch.randn(3, 4, 8) for _ in range(2)]
    assert hidden_loss([t.clone() for t in teacher], teacher).item() == 0.0
    # the student at zero: every token's error equals its own norm, 1 per token and layer
    zeros = [torch.zeros_like(t) for t in teacher]
    torch.testing.assert_close(hidden_loss(zeros, teacher), torch.tensor(2.0))
    # normalised per token: one token 1000x larger (an attention sink) weighs no more than the others
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    big_s, big_t = [s.clone() for s in student], [t.clone() for t in teacher]
    for s, t in zip(big_s, big_t):
        s[:, 0] *= 1000
        t[:, 0] *= 1000
    torch.testing.assert_close(hidden_loss(big_s, big_t), hidden_loss(student, teacher))
    # only the windows named count, the others as zero
    per_window = sum(((s - t) ** 2).sum(-1).div((t ** 2).sum(-1)).mean(-1) for s, t in zip(student, teacher))
    torch.testing.assert_close(hidden_loss(student, teacher, torch.tensor([False, True, False])),
                               per_window[1] / 3)


def _teacher_logits(model_dir: str, ids):
    from dist_prune.io.checkpoint import open_checkpoint
    from dist_prune.layerwise import LayerRunner
    from dist_prune.sharding.partition import build_partitioned_model

    model = build_partitioned_model(Path(model_dir), open_checkpoint(Path(model_dir)), torch.float32)
    runner = LayerRunner(model)
    logits, hidden = runner.run(ids, keep_hidden=True)
    assert torch.equal(runner.logits(ids), logits)
    return logits, hidden


def test_teacher_logits_and_layer_outputs_equal_plain_transformers(tiny_llama, text_file):
    from transformers import AutoModelForCausalLM

    from dist_prune.train.distill import LayerOutputs

    _, evalw = _data(tiny_llama, text_file.read_text())
    got = run_on_ranks(_teacher_logits, 2, str(tiny_llama), evalw[:3])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    layers = LayerOutputs(model.model.layers)
    layers.capturing = True
    with torch.no_grad():
        want = model(input_ids=evalw[:3]).logits
    want_hidden = layers.take()
    assert len(want_hidden) == model.config.num_hidden_layers
    for logits, hidden in got:
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
        assert len(hidden) == len(want_hidden)
        for h, w in zip(hidden, want_hidden):
            torch.testing.assert_close(h, w, rtol=1e-4, atol=1e-5)


def test_auto_stage_is_data_parallel_only_when_the_model_fits_and_computes_in_float32():
    from dist_prune.sharding.stages import BYTES_PER_PARAMETER, MEMORY_SHARE, choose_stage

    n = 135_000_000
    fits = int(n * BYTES_PER_PARAMETER / MEMORY_SHARE)  # exactly enough
    assert choose_stage("auto", parameters=n, dtype=torch.float32, free_bytes=fits) == 0
    assert choose_stage("auto", parameters=n, dtype=torch.float32, free_bytes=fits - 1) == 3
    assert choose_stage("auto", parameters=n, dtype=torch.bfloat16, free_bytes=10 * fits) == 3
    assert choose_stage("2", parameters=n, dtype=torch.float32, free_bytes=fits) == 2


def test_the_auto_stage_is_reported(tuned):
    """cubic-magnitude leaves finetune.zero_stage at auto: a tiny fp32 model on CPU trains data
    parallel; the cases that name a stage train at it."""
    _, results = tuned
    assert results["cubic-magnitude"]["metrics"]["finetune_zero_stage"] == 0
    assert results["oneshot-zero2"]["metrics"]["finetune_zero_stage"] == 2
    assert results["oneshot-zero3"]["metrics"]["finetune_zero_stage"] == 3
