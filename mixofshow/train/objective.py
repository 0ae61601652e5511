"""The ED-LoRA training loss of one micro-batch, as one function of its inputs.

Mix-of-Show's objective (``mixofshow/pipelines/trainer_edlora.py``): encode the images to
latents, add noise at a random timestep, predict it from the layer-wise prompt, and take the
(masked) MSE; optionally add the attention regularisation that keeps the concept tokens'
cross-attention inside the subject mask. The pieces are the pure functions of
``mixofshow/train/losses.py``.

:func:`edlora_loss` returns the weighted total and each term unweighted, by name, so that a
non-finite loss can be reported by the term that caused it (``train.nan_policy`` in
``configs/README.md``). It changes no state: the attention processors' recording switch is put
back as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from mixofshow.concepts.edlora import EDLoRA
from mixofshow.train.losses import attention_outside_mask, masked_mse, offset_noise

__all__ = ["LossOptions", "denoising_target", "edlora_loss"]


def denoising_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weight(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per image (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for
    epsilon prediction, ``/ (SNR + 1)`` for v-prediction; low-noise steps weigh less."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps.cpu()).to(timesteps.device)
    denominator = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
    return snr.clamp(max=gamma) / denominator


@dataclass(frozen=True)
class LossOptions:
    device: torch.device
    use_masks: bool = True  # the masked MSE when the batch has masks (data.use_masks)
    noise_offset: float = 0.01  # train.noise_offset
    attention_reg_weight: float = 0.0  # train.attention_reg_weight (0: off)
    min_snr_gamma: float | None = None  # train.min_snr_gamma (None: every timestep weighs 1)


def edlora_loss(
    model: EDLoRA,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, Any],
    generator: torch.Generator | Sequence[torch.Generator],
    options: LossOptions,
    autocast: AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, {term name: unweighted term}) of one micro-batch; every draw from ``generator``.

    ``generator`` may be one generator per image: then each image's VAE sample, noise and
    timestep come from its own, and do not depend on which images share the batch (how the
    training loop draws, so that N processes draw what one process with N times the batch does).
    """
    device, pipe = options.device, model.pipe
    vae_dtype = next(pipe.vae.parameters()).dtype
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    split = not isinstance(generator, torch.Generator)

    def draw(shape: tuple[int, ...], fn) -> torch.Tensor:  # the whole batch from one generator, or per image
        if not split:
            return fn(shape, gens[0])
        return torch.cat([fn((1, *shape[1:]), g) for g in gens])

    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, vae_dtype)
        dist = pipe.vae.encode(pixels).latent_dist
        eps = draw(dist.mean.shape, lambda shape, g: torch.randn(shape, generator=g)).to(device, dist.mean.dtype)
        latents = ((dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor).float()
    noise = draw(latents.shape, lambda shape, g: offset_noise(torch.empty(shape), options.noise_offset, g))
    noise = noise.to(device)
    num_steps = noise_scheduler.config.num_train_timesteps
    timesteps = draw(latents.shape[:1], lambda shape, g: torch.randint(0, num_steps, shape, generator=g)).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(noise_scheduler, latents, noise, timesteps)

    ids = model.encoder.tokenize(batch["prompt"])
    regularise = options.attention_reg_weight > 0
    recording = [proc.store_attention for proc in model.processors]
    for proc in model.processors:
        proc.store_attention = regularise
    try:
        with autocast if autocast is not None else nullcontext():
            context = model.encoder.encode_ids(ids)
            pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, context).sample
        mask = batch["mask"].to(device) if options.use_masks else None
        weight = None if options.min_snr_gamma is None else min_snr_weight(noise_scheduler, timesteps,
                                                                            options.min_snr_gamma)
        terms = {"mse": masked_mse(pred, target, mask, weight)}
        total = terms["mse"]
        if regularise:
            terms["attention_reg"] = _attention_reg(model, ids, batch["mask"].to(device), latents.shape[-2:])
            total = total + options.attention_reg_weight * terms["attention_reg"]
    finally:
        for proc, was in zip(model.processors, recording):
            proc.store_attention, proc.last_attention = was, None
    return total, terms


def _attention_reg(model: EDLoRA, ids: torch.Tensor, mask: torch.Tensor, latent_hw) -> torch.Tensor:
    """Mean over cross-attention layers of the concept tokens' attention outside the mask."""
    num_base = model.text_encoder.get_input_embeddings().num_base
    per_layer = ids.view(-1, model.num_layers, ids.shape[-1]).to(mask.device) >= num_base
    terms = [
        attention_outside_mask(proc.last_attention, per_layer[:, proc.index], mask, tuple(latent_hw))
        for proc in model.processors
    ]
    return torch.stack(terms).mean()
