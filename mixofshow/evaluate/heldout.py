"""Held-out denoising loss of a trained concept: fixed draws that training never makes.

The training loop draws its noise and timesteps from generators seeded with ``(seed, t)``; here
every draw ``k`` uses its own generator seeded ``HELDOUT_SEED + k`` (no offset noise, no flip),
image ``k mod N``, and evenly spaced timesteps ``t_k = (k + 0.5) / K * T``, so every optimizer
and seed is measured on exactly the same (image, caption, noise, timestep) set. The value is
the training objective (masked epsilon MSE, ``mixofshow/train/losses.py``), averaged over draws.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["HELDOUT_SEED", "heldout_loss", "heldout_predictions"]

HELDOUT_SEED = 1_000_000_007  # far from any (seed, step) stream of the training loop


def _draws(config, concept_path, draws: int, device: str | None, model) -> Iterator[tuple]:
    """(prediction, target, mask or None) of every held-out draw, in order."""
    import torch
    from diffusers import DDPMScheduler

    from mixofshow.concepts.edlora import EDLoRA
    from mixofshow.data import ConceptDataset, collate, load_concept_list
    from mixofshow.models.identity import sampling_state
    from mixofshow.models.loading import load_pipeline
    from mixofshow.train.objective import denoising_target

    if draws < 1:
        raise ValueError(f"heldout draws must be >= 1, got {draws}")
    device = device or config.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        pipe = load_pipeline(config.base_model, config=config.base_model_config)
        model = EDLoRA.from_concept(pipe, str(Path(concept_path)))
        pipe.to(device)
    pipe = model.pipe
    data = config.data
    dataset = ConceptDataset(
        load_concept_list(data.concept_list), data.replace_mapping, data.resolution,
        shuffle_tags=data.shuffle_tags, flip_p=0.0, use_masks=data.use_masks,
        **({} if data.templates else {"templates": None}),
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = scheduler.config.num_train_timesteps
    with sampling_state(pipe), torch.no_grad():
        for k in range(draws):
            gen = torch.Generator().manual_seed(HELDOUT_SEED + k)
            batch = collate([dataset.get(k % len(dataset), gen)])
            dist = pipe.vae.encode(batch["pixel_values"].to(device, pipe.vae.dtype)).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            latents = (latents * pipe.vae.config.scaling_factor).float()
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.tensor([int((k + 0.5) / draws * steps)], device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            target = denoising_target(scheduler, latents, noise, t)
            context = model.encoder.encode(batch["prompt"])
            pred = pipe.unet(noisy.to(pipe.unet.dtype), t, context).sample
            yield pred, target, batch["mask"].to(device) if data.use_masks else None


def heldout_loss(config, concept_path: str | os.PathLike, draws: int = 16, device: str | None = None,
                 model=None) -> float:
    """Mean masked denoising loss of the concept in ``concept_path`` on the config's data.

    ``config`` is the run's :class:`~mixofshow.train.config.TrainConfig`; ``model`` the concept
    already loaded (an ``EDLoRA`` on its pipeline, moved to ``device``), else it is loaded here.
    """
    from mixofshow.train.losses import masked_mse

    losses = [float(masked_mse(p, t, m)) for p, t, m in _draws(config, concept_path, draws, device, model)]
    return sum(losses) / len(losses)


def heldout_predictions(config, concept_path: str | os.PathLike, draws: int = 16, device: str | None = None,
                        model=None) -> tuple[float, list]:
    """(held-out loss, the UNet's predictions on the draws), to compare two concepts' denoisers."""
    from mixofshow.train.losses import masked_mse

    losses, preds = [], []
    for p, t, m in _draws(config, concept_path, draws, device, model):
        losses.append(float(masked_mse(p, t, m)))
        preds.append(p.float().cpu())
    return sum(losses) / len(losses), preds
