"""AdamW steps that leave a finite adapter or no trace at all.

A step with finite hyperparameters and gradients can still overflow (huge gradients
square to infinity in Adam's second moment, a huge learning rate pushes weights past
float range), and a non-finite adapter never recovers. So a step runs on a backup of
the parameters and optimizer state: if anything it produced is not finite, the backup
is put back and the step is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .exceptions import UserError
from .numeric import all_finite, check_number


@dataclass(frozen=True)
class AdamStep:
    """Per-step AdamW hyperparameters (the SDK's AdamParams)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def check(self) -> None:
        """Refuse NaN, infinities and values outside AdamW's domain, naming the field."""
        check_number("adam_params.learning_rate", self.learning_rate, ge=0.0)
        check_number("adam_params.beta1", self.beta1, ge=0.0, lt=1.0)
        check_number("adam_params.beta2", self.beta2, ge=0.0, lt=1.0)
        check_number("adam_params.eps", self.eps, gt=0.0)
        check_number("adam_params.weight_decay", self.weight_decay, ge=0.0)
        check_number("adam_params.grad_clip_norm", self.grad_clip_norm, ge=0.0)


def new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with Tinker's defaults; each step overwrites the hyperparameters."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


@dataclass
class _Backup:
    params: list[torch.Tensor]
    state: dict[torch.nn.Parameter, dict[str, torch.Tensor]]
    groups: list[dict]


def _backup(params: list[torch.nn.Parameter], optimizer: torch.optim.AdamW) -> _Backup:
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return _Backup([p.detach().clone() for p in params], state, groups)


def _restore(backup: _Backup, params: list[torch.nn.Parameter], optimizer: torch.optim.AdamW) -> None:
    with torch.no_grad():
        for p, saved in zip(params, backup.params):
            p.copy_(saved)
    for p in params:
        if p in backup.state:
            optimizer.state[p] = backup.state[p]
        else:
            optimizer.state.pop(p, None)
    for group, saved in zip(optimizer.param_groups, backup.groups):
        group.update(saved)


def adam_step(params: list[torch.nn.Parameter], optimizer: torch.optim.AdamW, step: AdamStep) -> dict[str, float]:
    """Apply the accumulated gradients, clear them and return the step's metrics.

    If the result would not be finite, the parameters and optimizer state are restored
    exactly, the gradients are still cleared (they would overflow again; the caller's
    next forward_backward starts afresh) and a user error says so.
    """
    step.check()
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
    backup = _backup(params, optimizer)
    if step.grad_clip_norm > 0 and grads:
        torch.nn.utils.clip_grad_norm_(params, step.grad_clip_norm)
    for group in optimizer.param_groups:
        group.update(lr=step.learning_rate, betas=(step.beta1, step.beta2), eps=step.eps, weight_decay=step.weight_decay)
    try:
        optimizer.step()
        state = [v for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
        problem = None if all_finite([grad_norm, *params, *state]) else "it would make the adapter non-finite"
    except torch.OutOfMemoryError:
        _restore(backup, params, optimizer)
        raise
    except RuntimeError as exc:  # with finite inputs, torch refusing the step means its step size overflows
        problem = f"AdamW cannot take it ({exc})"
    optimizer.zero_grad(set_to_none=True)
    if problem is not None:
        _restore(backup, params, optimizer)
        raise UserError(
            f"optim_step refused: {problem} (gradient norm {grad_norm:g}, learning_rate {step.learning_rate:g}); "
            "the adapter and optimizer state are as before the step and the accumulated gradients were discarded"
        )
    return {"grad_norm:mean": grad_norm, "learning_rate:mean": step.learning_rate}
