"""The optimizer a parameter-server shard applies to its flat slice of the parameters."""

from __future__ import annotations

from typing import Any

import torch

# Optimizer state tensors per optimizer, in the order they are checkpointed.
_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


class ServerOptimizer:
    """Apply SGD (with momentum), Adam or AdamW steps to one flat float32 shard.

    It runs ``torch.optim`` on the shard as a single parameter. These optimizers
    work element by element, so a step on a slice of the flattened model equals
    the same step on the model's own tensors.

    Args:
        params: the shard's flat parameters, updated in place.
        name: ``sgd``, ``adam`` or ``adamw``.
    """

    def __init__(self, params: torch.Tensor, name: str, *, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if name not in _SLOTS:
            raise ValueError(f"unknown server optimizer {name!r}; use one of {', '.join(_SLOTS)}")
        self.name = name
        self.param = torch.nn.Parameter(params, requires_grad=False)
        self.param.requires_grad_(True)
        if name == "sgd":
            self.torch_optimizer = torch.optim.SGD([self.param], lr=0.0, momentum=momentum, nesterov=nesterov,
                                                   weight_decay=weight_decay)
        elif name == "adam":
            self.torch_optimizer = torch.optim.Adam([self.param], lr=0.0, weight_decay=weight_decay)
        else:
            self.torch_optimizer = torch.optim.AdamW([self.param], lr=0.0, weight_decay=weight_decay)

    def step(self, grad: torch.Tensor, lr: float) -> None:
        """Apply one step with gradient ``grad`` (same shape as the shard) at learning rate ``lr``."""
        self.param.grad = grad
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr
        self.torch_optimizer.step()
        self.param.grad = None

    def state_flat(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return the parameters and state tensors concatenated, plus the metadata to split them."""
        state = self.torch_optimizer.state.get(self.param, {})
        parts = [self.param.detach()]
        present = []
        for slot in _SLOTS[self.name]:
            if state.get(slot) is not None:
                parts.append(state[slot])
                present.append(slot)
        step = state.get("step")
        flat = torch.cat([t.reshape(-1) for t in parts]).contiguous()
        return flat, {"numel": flat.numel(), "slots": present,
                      "step": float(step) if step is not None else None}

    def load_state_flat(self, flat: torch.Tensor, meta: dict[str, Any]) -> None:
        """Restore what ``state_flat`` returned."""
        n = self.param.numel()
        with torch.no_grad():
            self.param.copy_(flat[:n])
        state: dict[str, Any] = {}
        for i, slot in enumerate(meta["slots"]):
            state[slot] = flat[n * (i + 1):n * (i + 2)].clone()
        if meta.get("step") is not None:
            state["step"] = torch.tensor(meta["step"], dtype=torch.float32)
        self.torch_optimizer.state[self.param] = state
