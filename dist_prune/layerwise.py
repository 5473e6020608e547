"""Forward passes over a ZeRO-3 partitioned causal LM, one decoder layer at a time.

Calibration and evaluation both push a rank's windows through the model layer by
layer: gather a layer, run every local batch through it, release it. Each layer is
gathered once per pass (not once per batch), only one layer is ever whole in memory,
and sequential pruning can change a layer between the pass that measures its inputs
and the pass that feeds the next layer.

The per-layer call arguments (rotary position embeddings, masks, ...) are captured
from the model's own forward at the entrance of layer 0, so the model's code decides
them, not ours. Supported: decoder-only models whose decoder has `.layers` and a
final `.norm` (Llama, Mistral, Qwen2/3, SmolLM, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dist_prune.sharding.partition import gathered, model_device

MICRO_BATCH = 4  # windows per forward call: big enough for efficient matmuls, small in memory
# model_types built the way LayerRunner needs (a decoder with .layers and a final .norm), named
# when another architecture is refused
SUPPORTED_EXAMPLES = ("llama", "mistral", "qwen2", "qwen3")


def runs_layer_by_layer(model: torch.nn.Module) -> bool:
    """Whether LayerRunner can run `model`: its decoder's layers in a ModuleList `.layers`, then a
    final `.norm` (GPT-2's are `.h` and `.ln_f`)."""
    decoder = model.get_decoder()
    return (isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList)
            and isinstance(getattr(decoder, "norm", None), torch.nn.Module))


def _micro_batches(windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return windows.split(MICRO_BATCH) if len(windows) else ()


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_, self.kwargs = args, kwargs


class _InputsSeen(Exception):
    pass


@dataclass
class Batch:
    """Hidden states entering the next layer, plus the arguments every layer receives."""

    hidden: torch.Tensor
    layer_kwargs: dict[str, Any]


class LayerRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers
        layer_params = {id(p) for p in self.layers.parameters()}
        # embeddings and the like: what runs before layer 0
        self.stem_params = [p for p in self.decoder.parameters() if id(p) not in layer_params]
        self.device = model_device(model)  # token windows arrive on the CPU; they go where the model is

    def start(self, windows: torch.Tensor) -> list[Batch]:
        """Embed the windows; return what enters layer 0, one Batch per micro-batch."""
        batches = []

        def capture(module, args, kwargs):
            raise _Captured(args, kwargs)

        hook = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with gathered(self.stem_params), torch.no_grad():
                for chunk in _micro_batches(windows):
                    try:
                        self.model(input_ids=chunk.to(self.device), use_cache=False)
                    except _Captured as c:
                        kwargs = dict(c.kwargs)
                        hidden = c.args_[0] if c.args_ else kwargs.pop("hidden_states")
                        batches.append(Batch(hidden, kwargs))
        finally:
            hook.remove()
        return batches

    def run_layer(self, index: int, batches: list[Batch]) -> list[Batch]:
        """Outputs of layer `index` for every batch. Collective (gathers the layer)."""
        layer = self.layers[index]
        outputs = []
        with gathered(layer.parameters()), torch.no_grad():
            for b in batches:
                out = layer(b.hidden, **b.layer_kwargs)
                outputs.append(Batch(out[0] if isinstance(out, tuple) else out, b.layer_kwargs))
        return outputs

    def feed_inputs(self, index: int, batches: list[Batch], linears: list[torch.nn.Module]) -> None:
        """Run layer `index` on every batch only until each of `linears` has received its input:
        the pass that measures a layer's inputs in sequential calibration, whose outputs are computed
        again once the layer is pruned. What comes after the last of them (down_proj's matmul in a
        Llama layer, a quarter of the layer's linear FLOPs) is skipped. Hooks registered before
        this call see the inputs first. Collective (gathers the layer)."""
        pending: set[int] = set()

        def seen(module, inputs):
            pending.discard(id(module))
            if not pending:
                raise _InputsSeen

        hooks = [m.register_forward_pre_hook(seen) for m in linears]
        try:
            with gathered(self.layers[index].parameters()), torch.no_grad():
                for b in batches:
                    pending.update(id(m) for m in linears)
                    try:
                        self.layers[index](b.hidden, **b.layer_kwargs)
                    except _InputsSeen:
                        pass
        finally:
            for h in hooks:
                h.remove()

    def head_inputs(self, batches: list[Batch]) -> list[torch.Tensor]:
        """What the output head sees: the final norm of the last layer's outputs."""
        with gathered(self.decoder.norm.parameters()), torch.no_grad():
            return [self.decoder.norm(b.hidden) for b in batches]

    def nll(self, batches: list[Batch], windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token negative log-likelihood and token count after the last layer."""
        head = self.model.get_output_embeddings()
        params = list(self.decoder.norm.parameters()) + list(head.parameters())
        total, count = 0.0, 0
        with gathered(params), torch.no_grad():
            for b, ids in zip(batches, _micro_batches(windows)):
                # one window at a time: logits are big
                for hidden, target in zip(b.hidden, ids.to(self.device)):
                    logits = head(self.decoder.norm(hidden[None]))[0, :-1].float()
                    total += F.cross_entropy(logits, target[1:], reduction="sum").item()
                    count += target.numel() - 1
        return total, count

    def run(self, windows: torch.Tensor, keep_hidden: bool = False
            ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Logits [n, seq_len, vocab] of a whole forward pass without gradients, one layer gathered
        at a time (the distillation teacher), and with `keep_hidden` every decoder layer's output
        [n, seq_len, hidden] (finetune.distill.hidden); None without. Collective."""
        batches = self.start(windows)
        hidden = [] if keep_hidden else None
        for index in range(len(self.layers)):
            batches = self.run_layer(index, batches)
            if hidden is not None:
                hidden.append(torch.cat([b.hidden for b in batches]))
        head = self.model.get_output_embeddings()
        with gathered(list(self.decoder.norm.parameters()) + list(head.parameters())), torch.no_grad():
            return torch.cat([head(self.decoder.norm(b.hidden)) for b in batches]), hidden

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        """`run`'s logits alone."""
        return self.run(windows)[0]
