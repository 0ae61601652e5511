"""Pre-training stage ``vae``: the toy world's AutoencoderKL (64 x 64 images, 16 x 16 x 4 latents).

Loss: mean squared error plus a small L1 term on the reconstruction of a posterior sample, and a
KL term of weight 1e-6 (as Stable Diffusion's VAE: a near-deterministic autoencoder whose latents
stay close to unit scale). Evaluation: PSNR of the posterior mean's reconstruction on held-out
``val`` scenes. When done, ``scaling_factor`` is set to 1 / std of the training latents, as SD's
0.18215 was chosen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from mixofshow.toyworld.data import Split
from mixofshow.toyworld.stage import StageConfig, batch_indices, run_stage, step_generator

__all__ = ["VAE_STAGE", "train_vae", "psnr", "latent_std", "scaling_factor"]

VAE_STAGE = StageConfig(steps=3000, batch=16, lr=1e-3, warmup=200, eval_every=500, checkpoint_every=250)
KL_WEIGHT, L1_WEIGHT = 1e-6, 0.05


def psnr(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of ``vae``'s reconstructions of ``x`` (in [-1, 1])."""
    values = []
    for chunk in x.split(batch):
        chunk = chunk.to(vae.device)
        rec = vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - chunk) / 2).pow(2).flatten(1).mean(1)
        values.append(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))
    return float(torch.cat(values).mean())


def latent_std(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> float:
    with torch.no_grad():
        z = torch.cat([vae.encode(c.to(vae.device)).latent_dist.mode() for c in x.split(batch)])
    return float(z.std())


def train_vae(vae: AutoencoderKL, train: Split, val: Split, folder: Path, seed: int,
              cfg: StageConfig = VAE_STAGE, max_minutes: float | None = None) -> dict:
    device = vae.device
    val_x, _ = val.batch(torch.arange(min(len(val), 256)).numpy())

    def loss(step: int) -> torch.Tensor:
        x, _ = train.batch(batch_indices(len(train), cfg.batch, step, seed, "vae"))
        x = x.to(device)
        if step % 2:  # mirrored images are as likely as the originals
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=step_generator(seed, "vae", step, device), device=device)
        rec = vae.decode(post.mean + post.std * noise).sample
        kl = post.kl().mean() / post.mean[0].numel()
        return (rec - x).pow(2).mean() + L1_WEIGHT * (rec - x).abs().mean() + KL_WEIGHT * kl

    return run_stage("vae", folder, vae, cfg, loss, lambda: {"psnr_val": psnr(vae, val_x)}, max_minutes=max_minutes)


def scaling_factor(vae: AutoencoderKL, train: Split) -> float:
    """1 / std of the latents of the first 1,024 training scenes (as SD's 0.18215 was chosen)."""
    train_x, _ = train.batch(torch.arange(min(len(train), 1024)).numpy())
    return round(1.0 / latent_std(vae, train_x), 5)
