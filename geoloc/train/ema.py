"""Exponential moving average of a model's trainable weights, kept in fp32.

Which weights: the floating-point parameters that require grad when the EMA is built. Frozen weights never
change, so their average is themselves: shadowing them would cost 4 bytes per parameter (1.2 GB for a
ViT-L/14) and checkpoint space for nothing. Build the EMA after choosing what to unfreeze (start of
phase 2); :meth:`EMA.update` raises if a parameter was unfrozen later. Shadows are fp32 whatever the model
dtype because with decay 0.999 the per-update change ``(1 - decay) * delta`` would round away in bf16.

Wrapped models (DDP, DeepSpeed engine, torch.compile) are unwrapped, so names match the plain module. Under
ZeRO-3 the parameters are partitioned across ranks and cannot be averaged locally: that raises.
``state_dict``/``load_state_dict`` let ``accelerator.register_for_checkpointing(ema)`` save it with the run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from geoloc.distributed import eval_module


def _tracked(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable floating-point parameters of the unwrapped ``model``, by name."""
    model = eval_module(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    partitioned = [n for n, p in params.items() if hasattr(p, "ds_numel")]
    if partitioned:
        raise NotImplementedError(
            f"EMA of ZeRO-3 partitioned parameters ({partitioned[0]}, ...) is not supported; "
            "use ZeRO-2 or DDP with train.ema_decay > 0"
        )
    return params


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser update."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}: must be in [0, 1)")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in _tracked(model).items()}

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = _tracked(model)
        if params.keys() != self.shadow.keys():
            new, gone = sorted(params.keys() - self.shadow.keys()), sorted(self.shadow.keys() - params.keys())
            raise ValueError(
                f"trainable parameters changed since the EMA was built (new: {new[:3]}, gone: {gone[:3]}); "
                "build the EMA after unfreezing"
            )
        return params

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @contextmanager
    def apply_to(self, model: torch.nn.Module):
        """Swap the EMA weights into ``model`` for the ``with`` block (eval/export), then restore."""
        params = self._params(model)
        backup = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(self.shadow.keys() - state["shadow"].keys())
        unexpected = sorted(state["shadow"].keys() - self.shadow.keys())
        if missing or unexpected:
            raise ValueError(f"EMA state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
