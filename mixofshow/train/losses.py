"""Training losses and schedules: small pure functions.

Masked epsilon loss and the attention regularisation follow Mix-of-Show (Gu et al., NeurIPS
2023, ``mixofshow/pipelines/trainer_edlora.py``); the noise offset follows Guttenberg's
"Diffusion with offset noise" (2023) as used by diffusers' training scripts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["masked_mse", "offset_noise", "attention_outside_mask", "lr_factor"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, averaged inside ``mask`` (B, 1, h, w) when given: sum(mse*m)/sum(m);
    ``weight`` (B,) scales each image's error (Min-SNR) before the mean over the batch."""
    mse = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)  # mean over channels
    if mask is None:
        per_image = mse.mean(dim=(1, 2, 3))
    else:
        mask = F.interpolate(mask.float(), size=mse.shape[-2:], mode="nearest")
        per_image = (mse * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (per_image if weight is None else per_image * weight.to(per_image)).mean()


def offset_noise(latents: torch.Tensor, offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise plus ``offset`` x a per-channel constant (helps very dark/bright images)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device="cpu")
    if offset:
        noise += offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, generator=generator, dtype=latents.dtype, device="cpu"
        )
    return noise.to(latents.device)


def attention_outside_mask(
    probs: torch.Tensor, token_positions: torch.Tensor, mask: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Attention mass of concept tokens that falls outside the subject mask.

    Args:
        probs: (B, heads, queries, tokens) cross-attention probabilities of one layer.
        token_positions: (B, tokens) bool, True at the concept tokens of each prompt.
        mask: (B, 1, H, W) subject mask.
        latent_hw: the latent height and width (to recover the layer's spatial shape).
    Each concept token's map is averaged over heads and divided by its max (as Mix-of-Show),
    then the mean of the map outside the mask is returned (0 when no concept token is present).
    """
    b, _, q, _ = probs.shape
    factor = math.sqrt(latent_hw[0] * latent_hw[1] / q)
    h, w = round(latent_hw[0] / factor), round(latent_hw[1] / factor)
    maps = probs.float().mean(dim=1)  # (B, Q, T)
    maps = maps / maps.amax(dim=1, keepdim=True).clamp_min(1e-8)
    outside = 1.0 - F.interpolate(mask.float(), size=(h, w), mode="nearest").reshape(b, q, 1)
    per_token = (maps * outside).mean(dim=1)  # (B, T)
    weights = token_positions.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def lr_factor(step: int, max_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): warm-up, then constant or linear to 0."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "linear":
        return warm * max(0.0, 1.0 - step / max_steps)
    raise ValueError(f"Invalid lr_schedule: {schedule!r} (expected 'linear' or 'constant')")
