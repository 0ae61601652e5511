"""NaN safety of a training step: one fused check of the loss terms, gradients and weights.

Before every optimizer step the loop measures, on the device, the loss (and each loss term), the
gradient norm of each parameter group and the norm of each group's weights, stacks them into one
vector and copies it to the host once: that single synchronisation also gives the loss for the
logs. A NaN or an infinity anywhere makes its norm non-finite, so the vector says which term or
group went wrong without a host sync per tensor.

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
    grad_norms: dict[str, float] = field(default_factory=dict)  # parameter group -> gradient norm
    weight_norms: dict[str, float] = field(default_factory=dict)  # parameter group -> weight norm
    extra: dict[str, float] = field(default_factory=dict)  # other scalars measured in the same sync

    def weights_problem(self) -> str | None:
        for name, value in self.weight_norms.items():
            if not math.isfinite(value):
                return f"the weights of parameter group {name!r} are not finite (norm {value})"
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
        for name, value in self.grad_norms.items():
            if not math.isfinite(value):
                return f"the gradient of parameter group {name!r} is not finite (norm {value})"
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
            values.append(torch.nn.utils.get_total_norm(grads).float())
    values += [torch.nn.utils.get_total_norm([p.detach() for p in params]).float()
               for params in groups.values()]
    values += [t.detach().float().reshape(()) for t in extra.values()]
    device = values[0].device
    host = torch.stack([v.to(device) for v in values]).tolist()  # the one host sync of the step
    it = iter(host)
    health = StepHealth(loss=next(it))
    health.terms = {name: next(it) for name in terms}
    health.grad_norms = {name: next(it) for name in grad_names}
    health.weight_norms = {name: next(it) for name in groups}
    health.extra = {name: next(it) for name in extra}
    return health
