"""The dense teacher's terms in the tuning loss (finetune.distill): its output distribution
(`distill_loss`, weight beta) and its decoder layers' outputs (`hidden_loss`, weight hidden)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, beta: float,
                 temperature: float, distilled: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - beta) * CE + beta * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per token, averaged
    over tokens (Hinton et al. 2015: T^2 keeps the soft term's gradients at the scale of the hard
    one's). `student`, `teacher`: [tokens, vocab] logits; `distilled`: [tokens] bool, the tokens the
    teacher's term applies to (the others keep plain CE); None = all."""
    if beta == 0.0 or teacher is None:
        return F.cross_entropy(student, targets)
    ce = F.cross_entropy(student, targets, reduction="none")
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    weight = torch.full_like(ce, beta) if distilled is None else beta * distilled.to(ce.dtype)
    return ((1.0 - weight) * ce + weight * temperature**2 * kl).mean()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                distilled: torch.Tensor | None = None) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): the sum over decoder layers of the student's squared error to
    the teacher's layer output, divided by the teacher's own squared norm so that every layer counts
    alike whatever its scale. `student`, `teacher`: one [windows, seq_len, hidden] tensor per layer.

    Normalised per token, where the paper divides whole tensors: in SmolLM2-135M token 0 (the
    attention sink, |h| up to 24,800) holds 99% of the squared norm of layers 11-27, so a whole-tensor
    ratio would match that one token and ignore the 255 others of a window. Averaged over tokens and
    windows; `distilled`: [windows] bool, the windows the term applies to (the others count zero, as
    distill_loss's undistilled tokens do); None = all."""
    per_window = torch.zeros(student[0].shape[0], device=student[0].device)
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        error = (s.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        per_window = per_window + error.mean(-1)
    if distilled is not None:
        per_window = per_window * distilled.to(per_window)
    return per_window.mean()


class LayerOutputs:
    """Keeps each decoder layer's output, with its autograd graph, from the student's forward
    passes run `while capturing`; `take()` hands them over in layer order."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.capturing = False
        self._outputs: list[torch.Tensor] = []
        self._hooks = [layer.register_forward_hook(self._keep) for layer in layers]

    def _keep(self, module, args, output) -> None:
        if self.capturing:
            self._outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._outputs = []
