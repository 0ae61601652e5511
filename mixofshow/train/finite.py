"""NaN safety of a training step: one fused check of the loss terms, gradients and weights.

Before every optimizer step the loop reduces, on the device, the loss (and each loss term) and,
per parameter group, whether every gradient and every weight is finite (``isfinite().all()``:
unlike a norm it cannot overflow on large but finite values), stacks them into one vector and
copies it to the host once: that single synchronisation also gives the loss for the logs. The
vector says which term or group went wrong without a host sync per tensor.

What happens then is ``train.nan_policy`` (``configs/README.md``): ``stop`` raises
:class:`NonFiniteError` (the CLI exits 2), ``skip-step`` drops that step's update and goes on, up
to ``train.max_skipped_steps`` skipped steps. Non-finite *weights* always stop: there is no
update to skip. Under fp16 mixed precision the gradients are loss-scaled and an overflow is
normal (the grad scaler skips that step and lowers the scale), so only the loss and weights are
checked there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["NonFiniteError", "StepHealth", "measure_step"]


class NonFiniteError(ValueError):
    """Training produced a NaN or an infinity; the message names the step and the culprit."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class StepHealth:
    """The host copy of one step's check vector."""

    loss: float
    terms: dict[str, float] = field(default_factory=dict)  # loss term -> value (summed over micro-batches)
    grads_finite: dict[str, bool] = field(default_factory=dict)  # parameter group -> all gradients finite
    weights_finite: dict[str, bool] = field(default_factory=dict)  # parameter group -> all weights finite
    extra: dict[str, float] = field(default_factory=dict)  # other scalars measured in the same sync

    def weights_problem(self) -> str | None:
        for name, finite in self.weights_finite.items():
            if not finite:
                return f"the weights of parameter group {name!r} hold NaN or inf"
        return None

    def problem(self) -> str | None:
        """What went non-finite first (weights, then loss terms, then gradients); None if all is well."""
        weights = self.weights_problem()
        if weights is not None:
            return weights
        for name, value in self.terms.items():
            if not math.isfinite(value):
                return f"loss term {name!r} is {value}"
        if not math.isfinite(self.loss):
            return f"the loss is {self.loss}"
        for name, finite in self.grads_finite.items():
            if not finite:
                return f"the gradient of parameter group {name!r} holds NaN or inf"
        return None


def measure_step(
    loss: torch.Tensor,
    terms: Mapping[str, torch.Tensor],
    groups: Mapping[str, Sequence[torch.Tensor]],
    check_grads: bool = True,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> StepHealth:
    """Measure everything in one vector and copy it to the host once (the step's only sync)."""
    extra = dict(extra or {})
    values = [loss.detach().float().reshape(())]
    values += [t.detach().float().reshape(()) for t in terms.values()]
    grad_names = []
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if check_grads and grads:
            grad_names.append(name)
            values.append(_all_finite(grads))
    values += [_all_finite(params) for params in groups.values()]
    values += [t.detach().float().reshape(()) for t in extra.values()]
    device = values[0].device
    host = torch.stack([v.to(device) for v in values]).tolist()  # the one host sync of the step
    it = iter(host)
    health = StepHealth(loss=next(it))
    health.terms = {name: next(it) for name in terms}
    health.grads_finite = {name: next(it) == 1.0 for name in grad_names}
    health.weights_finite = {name: next(it) == 1.0 for name in groups}
    health.extra = {name: next(it) for name in extra}
    return health


def _all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """1.0 when every element of every tensor is finite, else 0.0 (a device scalar, no sync)."""
    if not tensors:
        return torch.ones(())
    return torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all().float()
