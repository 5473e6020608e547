"""The ZeRO stages behind the `Training` interface (sharding/training.py): stage 3 on the
partitioned model itself, stage 2 on a whole copy with DeepSpeed's partitioned optimizer."""

from __future__ import annotations

import torch

from dist_prune.masking import Target
from dist_prune.sharding.partition import local_range, local_weight
from dist_prune.sharding.training import MOMENTS, Training
from dist_prune.sharding.whole import WholeWeights


class Zero3Training(Training):
    """ZeRO-3 on the partitioned model, through DeepSpeed's local-partition API."""

    stage, collective_forward, description = 3, True, "ZeRO-3"
    _grads_alias: bool | None = None

    def local_weight(self, target: Target) -> torch.Tensor:
        return local_weight(target.param)

    def local_grad(self, target: Target) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_grad  # lazy: sharding/__init__.py

        start, stop = local_range(target.param)
        # the gradient partition has the padded length of the weight partition; it may be
        # DeepSpeed's own buffer, hence the copy
        return safe_get_local_grad(target.param)[: stop - start].to(torch.float32, copy=True)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # lazy: sharding/__init__.py

        for t in self.targets:
            grad = safe_get_local_grad(t.param)  # padded to the partition length
            grad[: self.masks[t.name].numel()].masked_fill_(self.masks[t.name], 0.0)
            if not self._grad_is_the_partition(t.param, grad):
                safe_set_local_grad(t.param, grad)

    def _grad_is_the_partition(self, param, grad: torch.Tensor) -> bool:
        """Whether safe_get_local_grad handed out the gradient partition itself (fp32 partitions:
        `.float()` of an fp32 tensor is that tensor) rather than a copy. Then writing it back is a
        copy onto itself, 67M elements a step for SmolLM2-135M on 2 ranks."""
        if self._grads_alias is None:
            from deepspeed.utils import safe_get_local_grad  # lazy: sharding/__init__.py

            self._grads_alias = safe_get_local_grad(param).data_ptr() == grad.data_ptr()
        return self._grads_alias

    @torch.no_grad()
    def zero_pruned(self, *, moments: bool) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state  # lazy: sharding/__init__.py

        moments = moments and self.has_optimizer_state()
        for t in self.targets:
            mask = self.masks[t.name]
            safe_get_local_fp32_param(t.param)[: mask.numel()].masked_fill_(mask, 0.0)
            local_weight(t.param).masked_fill_(mask, 0.0)
            for key in MOMENTS if moments else ():
                safe_get_local_optimizer_state(t.param, key)[: mask.numel()].masked_fill_(mask, 0.0)

    def _flats(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.fp32_partitioned_groups_flat)

    def load_state_dict(self, tensors, meta, rank0) -> None:
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: sharding/__init__.py

        super().load_state_dict(tensors, meta, rank0)
        for p in self.module.parameters():  # the 16-bit partitions from the restored masters
            p.ds_tensor.data.copy_(safe_get_local_fp32_param(p))


class Zero2Training(WholeWeights, Training):
    """ZeRO-2 on a whole copy of the weights (every rank holds them all); DeepSpeed partitions
    the gradients and the optimizer state, onto which the whole masks are mapped."""

    stage, collective_forward, description = 2, False, "ZeRO-2"

    def __init__(self, engine, targets: list[Target]):
        super().__init__(engine, targets)
        self._hold_whole(self.module, targets, hooks=True)

    def local_grad(self, target: Target) -> torch.Tensor:
        # config validation refuses methods that need it (Method.reads_gradient_partitions)
        raise NotImplementedError("training-time scores need finetune.zero_stage 3 or 0")

    @torch.no_grad()
    def zero_pruned(self, *, moments: bool) -> None:
        moments = moments and self.has_optimizer_state()
        for name, p in self.params.items():
            whole = self.whole[name].to(p.device)
            p.data.masked_fill_(whole, 0.0)
            flat = whole.view(-1)
            for key in (None, *MOMENTS) if moments else (None,):
                fragment = self._fragment(p, key)
                if fragment is not None:
                    view, start = fragment
                    view.masked_fill_(flat[start: start + view.numel()].to(view.device), 0.0)

    def _fragment(self, param: torch.nn.Parameter, key: str | None):
        """(view, start): the part of the fp32 master (`key` None) or of optimizer state `key`
        that this rank's partition holds for `param`, and where it starts in the flat param."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None
        start = mapping.lp_fragment_address.start
        if key is None:
            return mapping.hp_fragment, start
        flat = self._flats()[mapping.param_group_index]
        state = self._optimizer.state.get(flat, {})
        if key not in state:
            return None
        address = mapping.hp_fragment_address
        return state[key].narrow(0, address.start, address.numel), start

    def _flats(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

    def state_dict(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict(rank)
        if rank == 0:  # every rank holds the same whole weights: one copy is enough
            tensors.update({f"weight.{n}": p.detach().cpu() for n, p in self.module.named_parameters()})
        return tensors, meta

    def load_state_dict(self, tensors, meta, rank0) -> None:
        super().load_state_dict(tensors, meta, rank0)
        weights = rank0()
        for name, p in self.module.named_parameters():
            p.data.copy_(weights[f"weight.{name}"])
