"""Optimizer param groups from models that carry :class:`~mixofshow.concepts.lora.LoRALinear` layers.

After peft's ``create_loraplus_optimizer`` (``src/peft/optimizers/loraplus.py``): group building is
a separate helper that works with every optimizer class of the registry. Layers are found by
module type (``lora_layers``), never by parameter-name substrings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mixofshow.concepts.lora import LoRALinear, lora_layers

__all__ = ["lora_param_groups"]


def lora_param_groups(
    components: Mapping[str, nn.Module],
    lrs: Mapping[str, float],
    factorization: str | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """One optimizer group per component (e.g. ``"text_encoder"``, ``"unet"``) and LoRA scale.

    Args:
        components: name -> module holding LoRA layers.
        lrs: name -> learning rate; every component with trainable LoRA layers needs one.
        factorization: the form the optimizer expects (``OptimizerSpec.factorization``): ``"ab"``
            gives ``"pairs"`` ``(A, B)``, ``"usv"`` gives ``"triples"`` ``(U, S, V)``. ``None``
            takes it from the layers.
        group_options: extra keys copied into every group (per-group hyper-parameters).
    Returns:
        ``[{"pairs" | "triples": [...], "lr": lr, "scale": s, "name": component}, ...]``, plus
        ``"hidden_size"`` (the text encoder's ``config.hidden_size``, which StelLA's gradient
        scaling uses) for ``usv`` groups when ``components`` has a text encoder; a
        component whose layers use several scales gives one group per scale, one without
        trainable LoRA layers (LoRA off) gives none.
    Raises:
        ValueError: a component with LoRA layers but no lr, or layers whose factorization differs from
            ``factorization`` (or from each other).
    """
    groups: list[dict[str, Any]] = []
    hidden_size = getattr(getattr(components.get("text_encoder"), "config", None), "hidden_size", None)
    for name, module in components.items():
        layers = [layer for _, layer in lora_layers(module) if _trainable(layer)]
        if not layers:  # LoRA off for this component (none injected, or frozen)
            continue
        if name not in lrs:
            raise ValueError(f"No learning rate for component {name!r}; lrs has {sorted(lrs)}")
        kinds = {layer.factorization for layer in layers}
        if len(kinds) > 1 or (factorization is not None and kinds != {factorization}):
            expected = factorization or "one factorization"
            raise ValueError(f"Component {name!r}: layers use {sorted(kinds)}, expected {expected!r}")
        by_scale: dict[float, list[LoRALinear]] = {}
        for layer in layers:
            by_scale.setdefault(layer.scale, []).append(layer)
        for scale, same_scale in by_scale.items():
            entries = _factor_entries(same_scale)
            group = {**group_options, **entries, "lr": lrs[name], "scale": scale, "name": name}
            if "triples" in entries and isinstance(hidden_size, int):
                group.setdefault("hidden_size", hidden_size)
            groups.append(group)
    return groups


def _trainable(layer: LoRALinear) -> bool:
    return any(p.requires_grad for p in layer.parameters(recurse=False))


def _factor_entries(layers: list[LoRALinear]) -> dict[str, list[tuple]]:
    if layers[0].factorization == "ab":
        return {"pairs": [(layer.lora_down, layer.lora_up) for layer in layers]}
    return {"triples": [(layer.lora_U, layer.lora_S, layer.lora_V) for layer in layers]}
