"""LoRA+: AdamW with a larger learning rate for B than for A.

Paper: Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
https://arxiv.org/abs/2402.12354. Reference code: https://github.com/nikhil-ghosh-berkeley/loraplus
(and peft ``src/peft/optimizers/loraplus.py``).

Update: AdamW (see ``adamw.py``) with per-factor learning rates::

    lr_A = lr            lr_B = ratio * lr          (ratio default 16)

Weight decay is decoupled with each factor's own learning rate (``X *= 1 - lr_X wd``), as in the
reference's param groups. ``ratio = 1`` is exactly ``adamw``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mixofshow.optim.adamw import AdamW
from mixofshow.optim.base import check_positive
from mixofshow.optim.registry import OptimizerSpec

__all__ = ["LoRAPlus", "SPECS"]


class LoRAPlus(AdamW):
    """AdamW whose B factors (lora_up) use ``ratio`` times the group's learning rate.

    Args:
        params: groups ``{"pairs": [(A, B), ...], "lr": ..., ...}``; a group may set its own
            ``ratio``.
        ratio: ``lr_B / lr_A`` (the paper's lambda; 16 is its recommended default).
        lr, betas, eps, weight_decay, fused: as :class:`mixofshow.optim.adamw.AdamW`.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fused: bool | None = None,
        ratio: float = 16.0,
    ) -> None:
        check_positive("ratio", ratio, allow_zero=False)
        super().__init__(params, lr, betas, eps, weight_decay, fused, ratio=ratio)
        for group in self.param_groups:  # a group may override the ratio
            check_positive("ratio", group["ratio"], allow_zero=False)

    def _extra_defaults(self, *, ratio: float) -> dict[str, Any]:
        return {"ratio": ratio}

    def _lr_split(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]]) -> list[tuple[float, list[torch.Tensor]]]:
        ratio = group["ratio"]
        if ratio == 1.0:  # one kernel call, exactly AdamW
            return [(1.0, [t for f in pairs for t in f])]
        return [(1.0, [a for a, _ in pairs]), (ratio, [b for _, b in pairs])]


SPECS = [
    OptimizerSpec(
        name="loraplus",
        cls=LoRAPlus,
        paper="Hayou, Ghosh & Yu, ICML 2024",
        memory="2(m+n)r (Adam moments on A and B)",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},  # lr_A; lr_B = ratio * lr_A
    )
]
