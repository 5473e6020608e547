"""Stage 6, tune: Sparse-NEFT fine-tuning on the workers, masks kept at every step.

Read `finetune` top to bottom: training at one ZeRO stage (dist_prune/sharding/training.py:
stage 3 on the partitioned model itself, or stage 2 on a whole copy) with a client AdamW;
every optimizer step
  1. re-selects the masks if the cubic schedule says so (before any noise is drawn),
  2. runs the micro-batches with NEFTune noise on the input embeddings,
  3. zeroes the gradients of pruned weights, steps, re-applies the masks,
  4. accumulates the training-time scores (movement, SEVENdyn, taylor),
  5. logs, evaluates and checkpoints at their intervals.
Everything a step does follows from the step number and the checkpointed state, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.config import JobConfig, scope_of
from dist_prune.gradients import new_stats, update_stats
from dist_prune.layerwise import LayerRunner
from dist_prune.masking import Target
from dist_prune.methods import METHODS
from dist_prune.report import progress
from dist_prune.sharding.stages import agreed_stage, open_training
from dist_prune.sharding.training import Training
from dist_prune.train.distill import LayerOutputs, distill_loss, hidden_loss
from dist_prune.train.masks import KeptMasks, NoMasks
from dist_prune.train.neftune import NEFTune, DynamicAlpha
from dist_prune.train.resume import load_train_state, read_meta
from dist_prune.train.schedule import (cubic_sparsity, is_pruning_step, lr_factor, micro_rounds, rank_share,
                                       step_windows)
from dist_prune.train.state import Hooks, TrainState


def finetune(model: torch.nn.Module, targets: list[Target], masks: dict[str, torch.Tensor],
             cfg: JobConfig, windows: torch.Tensor, eval_windows: dict[str, torch.Tensor],
             hooks: Hooks, teacher: torch.nn.Module | None = None) -> TrainState:
    """Fine-tune `model` (ZeRO-3 partitioned, already masked) for `finetune.steps` steps.
    `windows` are ALL training windows (every rank sees the same tensor and takes its
    share of each step); `eval_windows` the evaluation texts by metric suffix ("" for eval.path,
    ".<stem>" for each of eval.extra_paths), all windows of each. `teacher`: the dense model in its own ZeRO-3 partitions, for
    distillation (finetune.distill.beta or .hidden > 0). Returns the final state; the model's
    partitions hold the tuned weights and `state.masks` the final masks. Collective."""
    ft = cfg.finetune
    rank, world = rank_and_world()

    def adamw(params):
        # fused: one pass over the flat fp32 partition instead of one per operation; a step over
        # 67M fp32 elements on one thread took 0.075 s against 0.41 s (foreach=False) and 0.33 s
        # (foreach=True) on this machine (benchmarks/results/finetune_speed.md)
        return torch.optim.AdamW(params, lr=ft.lr, betas=tuple(ft.betas), weight_decay=ft.weight_decay,
                                 fused=True)

    # a resumed run goes on at the stage its checkpoint was written at
    stage = agreed_stage(ft.zero_stage, model) if hooks.resume is None or ft.zero_stage != "auto" \
        else read_meta(hooks.resume)["zero_stage"]
    state = TrainState(masks=dict(masks), zero_stage=stage)
    with open_training(model, stage, targets, adamw, micro_batch=ft.micro_batch_size,
                       accumulation=ft.gradient_accumulation_steps, max_grad_norm=ft.max_grad_norm) as training:
        pruned_any = all_reduce_(torch.tensor([sum(int(m.sum()) for m in state.masks.values())]))
        if cfg.prune.schedule == "oneshot" and hooks.resume is None and int(pruned_any) == 0:
            keeper = NoMasks(state.masks)  # a dense fine-tune
        else:
            keeper = KeptMasks(training, state.masks)
        if hooks.resume is not None:
            state = load_train_state(hooks.resume, training, targets)
            state.zero_stage = stage
            keeper.update(state.masks)
        state.sharding = training.description
        noise = NEFTune(training.module.get_input_embeddings(), ft.neftune.alpha, cfg.seed, rank)
        # finetune.distill.hidden: the student's layer outputs, matched to the teacher's
        layers = LayerOutputs(training.module.get_decoder().layers) \
            if teacher is not None and ft.distill.hidden > 0 else None
        try:
            _loop(training, targets, keeper, noise, cfg, windows, eval_windows, hooks, state,
                  None if teacher is None else LayerRunner(teacher), layers)
        finally:
            noise.remove()
            if layers is not None:
                layers.remove()
    return state


def _loop(training: Training, targets, keeper, noise, cfg: JobConfig, windows, eval_windows,
          hooks: Hooks, state: TrainState, teacher: LayerRunner | None,
          layers: LayerOutputs | None) -> None:
    ft, prune = cfg.finetune, cfg.prune
    rank, world = rank_and_world()
    method = METHODS[prune.method]
    gradual = prune.schedule == "cubic"
    end = prune.end_step if prune.end_step is not None else ft.steps
    keep = set(method.stats_for("cubic")) if gradual else set()
    if keep and not state.stats:
        # on the partitions' device: the steps' gradients and weights are added there
        state.stats = {t.name: new_stats(view.numel(), keep, view.device)
                       for t in targets for view in [training.local_weight(t)]}
    dynamic = DynamicAlpha(ft.neftune.alpha) if ft.neftune.dynamic else None
    if dynamic is not None and state.alpha:
        dynamic.load_state_dict(state.alpha)
    global_batch = ft.micro_batch_size * world * ft.gradient_accumulation_steps
    device = training.device
    # sampled windows mixed into the text's: the last rows of `windows` (generated.with_samples)
    mixed_in = ft.data.generated_windows if ft.data.generated_share < 1 else 0
    first_sampled = windows.shape[0] - mixed_in
    # finetune.distill.windows=sampled: the teacher's term applies only to rows >= first_sampled
    sampled_only = teacher is not None and ft.distill.windows == "sampled" and mixed_in > 0

    step_seconds: list[float] = []
    bar = progress(ft.steps, "fine-tune", enabled=rank == 0)
    bar.update(state.step)
    for step in range(state.step, ft.steps):
        started = time.perf_counter()
        sparsity = None
        if gradual and is_pruning_step(step, prune.start_step, end, prune.interval):
            sparsity = cubic_sparsity(step, prune.initial_sparsity, prune.sparsity, prune.start_step, end)
            state.masks = reselect(targets, state, method, cfg, sparsity, training)
            keeper.update(state.masks)  # pruning happens before this step's noise
        factor = lr_factor(step, ft.warmup_steps, ft.steps, ft.lr_schedule)
        training.set_lr(ft.lr * factor)
        noise.alpha = dynamic.value() if dynamic is not None else ft.neftune.alpha

        training.train()
        batch = step_windows(step, first_sampled, global_batch, cfg.seed, sampled=mixed_in,
                             share=ft.data.generated_share)
        micro_batches = rank_share(batch, rank, world, ft.micro_batch_size)
        # the teacher's forward is collective: every rank runs it in a round where any rank distils
        teach = [teacher is not None and (not sampled_only or bool((r >= first_sampled).any()))
                 for r in micro_rounds(batch, world, ft.micro_batch_size)]
        loss_sum, grads = 0.0, None
        for micro, indices in enumerate(micro_batches):
            noise.at(step, micro)
            ids = windows[indices].to(device)
            if layers is not None:
                layers.capturing = teach[micro]
            logits = training.logits(ids)
            vocab, tokens = logits.shape[-1], ids.shape[1] - 1
            soft, distilled, hidden = None, None, None
            if teach[micro]:
                soft, hidden = teacher.run(ids, keep_hidden=layers is not None)
                soft = soft[:, :-1].float().reshape(-1, vocab)
                if sampled_only:
                    distilled = (indices >= first_sampled).to(device)
            loss = distill_loss(logits[:, :-1].float().reshape(-1, vocab), soft, ids[:, 1:].reshape(-1),
                                ft.distill.beta, ft.distill.temperature,
                                None if distilled is None else distilled.repeat_interleave(tokens))
            if hidden is not None:
                layers.capturing = False
                loss = loss + ft.distill.hidden * hidden_loss(layers.take(), [h.to(device) for h in hidden],
                                                              distilled)
            training.backward(loss)
            loss_sum += loss.item()
            if training.at_step_boundary():
                keeper.mask_gradients()
                if keep:
                    grads = {t.name: training.local_grad(t) for t in targets}
            training.step()
        if grads is not None:  # SEVENdyn: "after each optimizer step"; movement: -w*g
            for t in targets:
                update_stats(state.stats[t.name], grads[t.name], training.local_weight(t), step)
        loss_mean = all_reduce_(torch.tensor([loss_sum / len(micro_batches)], dtype=torch.float64))
        loss_mean = loss_mean.item() / world
        if dynamic is not None:
            dynamic.update(loss_mean)
            state.alpha = dynamic.state_dict()
        state.step = step + 1
        bar.update(1)
        step_seconds.append(time.perf_counter() - started)

        done = state.step == ft.steps
        row = {}
        if state.step % max(ft.log_interval, 1) == 0 or done or sparsity is not None:
            row.update({"train/loss": loss_mean, "train/lr": ft.lr * factor,
                        "train/neftune_alpha": noise.alpha,
                        "train/sparsity": current_sparsity(targets, state.masks),
                        "train/step_seconds": sum(step_seconds) / len(step_seconds)})
            step_seconds = []
        if eval_windows and ((ft.eval_interval and state.step % ft.eval_interval == 0) or done):
            for suffix, ids in eval_windows.items():
                row[f"eval/perplexity{suffix}"] = training_perplexity(training, ids)
        if row:
            state.history.append({"step": state.step, **row})
            hooks.log(state.step, row)
            if "train/loss" in row:
                bar.set_description(f"fine-tune (loss {row['train/loss']:.3f})")
        if hooks.checkpoint is not None and ft.checkpoint_interval and not done \
                and state.step % ft.checkpoint_interval == 0:
            hooks.checkpoint(state, training, hooks.metrics)
    bar.close()


def reselect(targets: list[Target], state: TrainState, method, cfg: JobConfig, sparsity: float,
             training: Training) -> dict[str, torch.Tensor]:
    """New masks at `sparsity` from the current weights and training statistics; pruned
    weights stay pruned (their score is -inf), so masks only grow. Collective."""
    from dist_prune.pruning import select_and_mask  # the same exact selection as one-shot

    views = {t.name: training.local_weight(t) for t in targets}
    prune = cfg.prune
    prune_cfg = type(prune)(**{**vars(prune), "sparsity": sparsity})
    return select_and_mask(targets, state.stats, method, prune_cfg, scope_of(prune),
                           pruned_before=state.masks, weights=views)


def current_sparsity(targets: list[Target], masks: dict[str, torch.Tensor]) -> float:
    counts = torch.tensor([sum(int(masks[t.name].sum()) for t in targets if t.name in masks)],
                          dtype=torch.float64)
    return all_reduce_(counts).item() / max(sum(t.numel for t in targets), 1)


def training_perplexity(training: Training, windows: torch.Tensor) -> float:
    """Perplexity of the model being trained, over this rank's and the others' windows.
    Where every forward gathers weights collectively (ZeRO-3), all ranks run the same
    number of forwards (a rank out of windows runs a dummy one and ignores it)."""
    rank, world = rank_and_world()
    mine = windows[rank::world]
    counts = all_reduce_(torch.tensor([mine.shape[0] if r == rank else 0 for r in range(world)]))
    rounds = int(counts.max()) if training.collective_forward else mine.shape[0]
    was_training = training.module.training
    training.train(False)
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(rounds):
            real = i < mine.shape[0]
            ids = (mine[i:i + 1] if real else windows[:1]).to(training.device)
            logits = training.logits(ids)
            if real:
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      ids[:, 1:].reshape(-1), reduction="sum")
                totals += torch.tensor([nll.item(), ids.shape[1] - 1], dtype=torch.float64)
    training.train(was_training)
    all_reduce_(totals)
    return math.exp(totals[0].item() / totals[1].item()) if totals[1] > 0 else float("nan")
