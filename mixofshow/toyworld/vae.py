"""Pre-training stage ``vae``: the toy world's AutoencoderKL (64 x 64 images, 16 x 16 x 4 latents).

Data: half of every batch is world scenes, half :func:`shapes_scene`: random ellipses, boxes,
triangles and lines of any colour and size (down to one pixel), often small ones on larger ones,
on a world background or a random gradient. Stable Diffusion's VAE is a general image codec,
trained on far more than its UNet's captions cover; a VAE trained on world scenes alone learns the
world's palette and cannot encode what the world holds out (the shipped concepts' yellow chest
light on red, cyan eyes on a dark visor, pink flower: first trained that way, it blurred each into
its surroundings, so no concept could be learned). The shapes teach it colour and detail in
general; the concepts' looks are still never shown to it, and its PSNR on their images is
reported beside, as a check of that generality.

Loss: mean squared error plus a small L1 term on the reconstruction of a posterior sample, and a
KL term of weight 1e-6 (as Stable Diffusion's VAE: a near-deterministic autoencoder whose latents
stay close to unit scale). Evaluation: PSNR of the posterior mean's reconstruction on held-out
``val`` scenes. When done, ``scaling_factor`` is set to 1 / std of the training latents, as SD's
0.18215 was chosen.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from mixofshow.toyworld.data import Split, from_uint8
from mixofshow.toyworld.draw import BACKGROUNDS, Layer, gradient
from mixofshow.toyworld.stage import StageConfig, batch_indices, run_stage, step_generator
from mixofshow.toyworld.world import finish

__all__ = ["VAE_STAGE", "train_vae", "psnr", "latent_std", "scaling_factor", "shapes_scene", "shapes_batch"]

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


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def _shape(layer: Layer, rng: random.Random, x: float, y: float, r: float) -> None:
    kind, colour = rng.randrange(4), _colour(rng)
    rx, ry = r * rng.uniform(0.5, 1.5), r * rng.uniform(0.5, 1.5)
    if kind == 0:
        layer.ellipse(x, y, rx, ry, colour)
    elif kind == 1:
        layer.rect(x - rx, y - ry, x + rx, y + ry, colour, radius=r * rng.uniform(0, 0.5))
    elif kind == 2:
        layer.polygon([(x + rng.uniform(-rx, rx), y + rng.uniform(-ry, ry)) for _ in range(3)], colour)
    else:
        layer.line([(x - rx, y + rng.uniform(-ry, ry)), (x + rx, y + rng.uniform(-ry, ry))], colour,
                   max(0.5, r * rng.uniform(0.1, 0.4)))


def shapes_scene(rng: random.Random, size: int = 64) -> np.ndarray:
    """Random shapes of any colour, 1 to 40 pixels across, in groups (small ones on a larger one),
    on a world background or a random gradient: the generic half of the VAE's data."""
    canvas = Layer(size, (255, 255, 255))
    if rng.random() < 0.5:
        BACKGROUNDS[rng.randrange(len(BACKGROUNDS))](canvas, size, rng)
    else:
        gradient(canvas, size, _colour(rng), _colour(rng))
    for _ in range(rng.randint(2, 7)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.08, 0.35)
        _shape(canvas, rng, x, y, r)
        for _ in range(rng.randint(1, 5)):  # details on it
            _shape(canvas, rng, x + rng.uniform(-r, r) * 0.6, y + rng.uniform(-r, r) * 0.6,
                   max(0.5, r * rng.uniform(0.08, 0.4)))
    return finish(canvas)


def shapes_batch(tag: str, count: int, seed: int) -> torch.Tensor:
    """``count`` :func:`shapes_scene` images in [-1, 1], drawn from ``f"vae-shapes/{seed}/{tag}/{i}"``."""
    images = np.stack([shapes_scene(random.Random(f"vae-shapes/{seed}/{tag}/{i}")) for i in range(count)])
    return from_uint8(images)


def train_vae(vae: AutoencoderKL, train: Split, val: Split, folder: Path, seed: int,
              cfg: StageConfig = VAE_STAGE, max_minutes: float | None = None) -> dict:
    device = vae.device
    val_x, _ = val.batch(torch.arange(min(len(val), 256)).numpy())
    val_shapes = shapes_batch("val", 256, seed)

    def loss(step: int) -> torch.Tensor:
        half = cfg.batch // 2
        x, _ = train.batch(batch_indices(len(train), cfg.batch - half, step, seed, "vae"))
        x = torch.cat([x, shapes_batch(f"train/{step}", half, seed)]).to(device)
        if step % 2:  # mirrored images are as likely as the originals
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=step_generator(seed, "vae", step, device), device=device)
        rec = vae.decode(post.mean + post.std * noise).sample
        kl = post.kl().mean() / post.mean[0].numel()
        return (rec - x).pow(2).mean() + L1_WEIGHT * (rec - x).abs().mean() + KL_WEIGHT * kl

    def evaluate() -> dict:
        return {"psnr_val": psnr(vae, val_x), "psnr_shapes_val": psnr(vae, val_shapes)}

    return run_stage("vae", folder, vae, cfg, loss, evaluate, max_minutes=max_minutes)


def scaling_factor(vae: AutoencoderKL, train: Split) -> float:
    """1 / std of the latents of the first 1,024 training scenes (as SD's 0.18215 was chosen)."""
    train_x, _ = train.batch(torch.arange(min(len(train), 1024)).numpy())
    return round(1.0 / latent_std(vae, train_x), 5)
