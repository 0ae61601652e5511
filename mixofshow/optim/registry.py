"""The optimizer registry: name -> class, with a one-line description and defaults.

Each optimizer module declares ``SPECS = [OptimizerSpec(...), ...]``; this file only collects them,
so adding an optimizer means adding its module name to ``_MODULES`` (``docs/optimizers.md``, "How
to add an optimizer"). Defaults live in one place, the class signature: ``OptimizerSpec.defaults``
reads them from there.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from mixofshow.optim.full_grad import FullGradients

__all__ = ["OptimizerSpec", "OPTIMIZERS", "SPECS", "build_optimizer", "check_hparams", "describe", "get_spec"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer.

    Attributes:
        name: the registry name (``--optimizer NAME``).
        cls: the ``torch.optim.Optimizer`` subclass.
        paper: short citation, e.g. ``"Zhang & Pilanci, ICML 2024"``.
        memory: what its state keeps, e.g. ``"2(m+n)r (Adam moments on A, B)"``.
        reconstructed: True when no public code exists and the update was rebuilt from the paper.
        factorization: the LoRA layer form it needs: ``"ab"`` or ``"usv"`` (StelLA).
        recommended_lr: the learning rates the docs recommend, keys ``"unet"`` and
            ``"text_encoder"`` (``docs/optimizers.md`` says where each comes from).
        defaults (property): the hyper-parameters and their defaults, read from ``cls``'s
            signature (every keyword argument but the groups and ``lr``, which groups set).
    """

    name: str
    cls: type[torch.optim.Optimizer]
    paper: str
    memory: str
    reconstructed: bool = False
    factorization: str = "ab"
    recommended_lr: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recommended_lr", MappingProxyType(dict(self.recommended_lr)))

    @property
    def defaults(self) -> Mapping[str, Any]:
        params = list(inspect.signature(self.cls.__init__).parameters.values())[2:]  # self, groups
        return MappingProxyType(
            {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name != "lr"}
        )

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
        module = importlib.import_module(f"mixofshow.optim.{mod}")  # a broken module fails here, loudly
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
    """Instantiate optimizer ``name`` on LoRA groups, the class defaults overridden by ``hparams``.

    ``full_grads``: for optimizers with ``needs_full_grad``, the
    :class:`~mixofshow.optim.full_grad.FullGradients` the LoRA layers' hooks fill (the training
    loop's, from ``full_gradients_for``); when None, an unattached one (mode ``"matrix"``) over the
    groups' pairs, to be filled with ``optimizer.full_grads.set_(A, G)``. Ignored otherwise.
    """
    spec = get_spec(name)
    _check_keys(spec, hparams)
    try:
        opt = spec.cls(groups, **hparams)
    except TypeError as err:
        raise ValueError(f"Bad hyper-parameters for optimizer {name!r}: {err}") from None
    if spec.needs_full_grad:
        if full_grads is None:
            full_grads = FullGradients([f for g in opt.param_groups for f in opt.factor_tuples(g)])
        opt.bind_full_grads(full_grads)
    return opt


def check_hparams(name: str, params: Mapping[str, Any]) -> None:
    """Validate hyper-parameters of optimizer ``name`` without any model.

    Raises ``ValueError`` whose message starts with the offending key, e.g.
    ``"betas: Invalid beta1: 1.5"`` or ``"foo: unknown hyper-parameter of optimizer 'adamw'; ..."``.
    (The validation is the class's own, run on a one-pair probe group.)
    """
    from mixofshow.optim.base import HyperParameterError

    spec = get_spec(name)
    _check_keys(spec, params)
    if spec.factorization == "usv":
        probe = {"triples": [(torch.eye(2, 1), torch.zeros(1, 1), torch.eye(2, 1))]}
    else:
        probe = {"pairs": [(torch.zeros(1, 2), torch.zeros(2, 1))]}
    try:
        spec.cls([probe], **params)
    except HyperParameterError as err:
        raise ValueError(f"{err.key}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{', '.join(params) or 'params'}: {err}") from None


def _check_keys(spec: OptimizerSpec, params: Mapping[str, Any]) -> None:
    known = {"lr", *spec.defaults}
    for key in params:
        if key not in known:
            raise ValueError(
                f"{key}: unknown hyper-parameter of optimizer {spec.name!r}; expected one of: {', '.join(sorted(known))}"
            )


def describe() -> list[str]:
    """One line per registered optimizer: ``name  paper; state ...; origin``."""
    width = max((len(n) for n in SPECS), default=0)
    return [f"{n:<{width}}  {SPECS[n].summary()}" for n in sorted(SPECS)]
