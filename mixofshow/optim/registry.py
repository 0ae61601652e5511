"""The optimizer registry: name -> class, with a one-line description and defaults.

Each optimizer module declares ``SPECS = [OptimizerSpec(...), ...]``; this file only collects them,
so adding an optimizer means adding its module name to ``_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from mixofshow.optim.full_grad import FullGradients

__all__ = ["OptimizerSpec", "OPTIMIZERS", "SPECS", "get_spec", "build_optimizer", "describe"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer.

    Attributes:
        name: the registry name (``--optimizer NAME``).
        cls: the ``torch.optim.Optimizer`` subclass.
        paper: short citation, e.g. ``"Zhang & Pilanci, ICML 2024"``.
        memory: what its state keeps, e.g. ``"2(m+n)r (Adam moments on A, B)"``.
        reconstructed: True when no public code exists and the update was rebuilt from the paper.
        defaults: hyper-parameters passed to ``cls`` unless overridden.
        factorization: the LoRA layer form it needs: ``"ab"`` or ``"usv"`` (StelLA).
        recommended_lr: the learning rates the docs recommend, keys ``"unet"`` and
            ``"text_encoder"`` (empty: use the config's).
    """

    name: str
    cls: type[torch.optim.Optimizer]
    paper: str
    memory: str
    reconstructed: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    factorization: str = "ab"
    recommended_lr: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "recommended_lr", MappingProxyType(dict(self.recommended_lr)))

    @property
    def needs_full_grad(self) -> bool:
        return bool(getattr(self.cls, "needs_full_grad", False))

    def summary(self) -> str:
        origin = "reconstructed from the paper (no public code)" if self.reconstructed else "public code"
        return f"{self.paper}; state {self.memory}; {origin}"


_MODULES = ("adamw", "loraplus", "scaled", "lora_rite", "adams", "lracs", "adaprelora", "stella")


def _collect() -> dict[str, OptimizerSpec]:
    specs: dict[str, OptimizerSpec] = {}
    for mod in _MODULES:
        try:
            module = importlib.import_module(f"mixofshow.optim.{mod}")
        except ModuleNotFoundError as err:  # a module not written yet
            if err.name != f"mixofshow.optim.{mod}":
                raise
            continue
        for spec in module.SPECS:
            if spec.name in specs:
                raise RuntimeError(f"Optimizer {spec.name!r} registered twice")
            specs[spec.name] = spec
    return specs


SPECS: dict[str, OptimizerSpec] = _collect()
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {n: s.cls for n, s in SPECS.items()}


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r}; expected one of: {', '.join(sorted(SPECS))}"
        ) from None


def build_optimizer(
    name: str, groups: list[dict[str, Any]], full_grads: FullGradients | None = None, **hparams: Any
) -> torch.optim.Optimizer:
    """Instantiate optimizer ``name`` on LoRA groups, registry defaults overridden by ``hparams``.

    ``full_grads``: for optimizers with ``needs_full_grad``, the
    :class:`~mixofshow.optim.full_grad.FullGradients` the LoRA layers' hooks fill (the training
    loop's, from ``full_gradients_for``); when None, an unattached one (mode ``"matrix"``) over the
    groups' pairs, to be filled with ``optimizer.full_grads.set_(A, G)``. Ignored otherwise.
    """
    spec = get_spec(name)
    kwargs = {**spec.defaults, **hparams}
    try:
        opt = spec.cls(groups, **kwargs)
    except TypeError as err:
        raise ValueError(f"Bad hyper-parameters for optimizer {name!r}: {err}") from None
    if spec.needs_full_grad:
        if full_grads is None:
            full_grads = FullGradients([f for g in opt.param_groups for f in opt.factor_tuples(g)])
        opt.bind_full_grads(full_grads)
    return opt


def describe() -> list[str]:
    """One line per registered optimizer: ``name  paper; state ...; origin``."""
    width = max((len(n) for n in SPECS), default=0)
    return [f"{n:<{width}}  {SPECS[n].summary()}" for n in sorted(SPECS)]
