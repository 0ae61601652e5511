"""Pre-training stage ``unet``: the toy world's UNet2DConditionModel on cached latents.

Stable Diffusion 1.x's objective and schedule (epsilon prediction, the scaled-linear DDPM
schedule of ``scheduler.json``), with Min-SNR-5 loss weighting (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy", https://arxiv.org/abs/2303.09556; the same
``train.min_snr_gamma`` of concept training) for faster convergence, and 10 % of captions dropped to "" so that
classifier-free guidance works. The frozen VAE's latents (posterior mean x scaling factor) of every
training scene and of its mirror image are computed once; text states come from the frozen
conditioning text encoder, 77 positions as the pipeline gives them. Evaluation: held-out
epsilon-MSE on ``val`` scenes at fixed timesteps and noise (sample quality is judged by
``mixofshow.toyworld.floors``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from mixofshow.models.embedded import preset_config
from mixofshow.models.tokenizer import clip_bpe_tokenizer
from mixofshow.toyworld.data import Split
from mixofshow.toyworld.stage import StageConfig, batch_indices, run_stage, step_generator
from mixofshow.train.objective import min_snr_weight

__all__ = ["UNET_STAGE", "cached_latents", "encode_latents", "TextStates", "train_unet"]

UNET_STAGE = StageConfig(steps=12000, batch=32, lr=5e-4, warmup=500, weight_decay=0.01, ema=0.9995,
                         eval_every=1000, checkpoint_every=250)
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, split: Split, mirror: bool, batch: int = 128) -> torch.Tensor:
    """Scaled posterior means of every image of ``split`` (then of their mirrors when ``mirror``)."""
    out = []
    for flip in (False, True) if mirror else (False,):
        for start in range(0, len(split), batch):
            x, _ = split.batch(np.arange(start, min(start + batch, len(split))))
            x = x.flip(-1) if flip else x
            out.append(vae.encode(x.to(vae.device)).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


def cached_latents(vae: AutoencoderKL, train: Split, path: Path) -> torch.Tensor:
    """:func:`encode_latents` of ``train`` and its mirrors, kept in ``path`` for the next resume
    (minutes of encoding on a CPU); recomputed when the VAE or the split changed."""
    from mixofshow.utils.io import load_safetensors, save_safetensors

    import hashlib

    digest = hashlib.sha256()
    for tensor in vae.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    key = {"scenes": str(len(train)), "vae_sha256": digest.hexdigest(), "scaling_factor": str(vae.config.scaling_factor)}
    if path.is_file():
        tensors, meta = load_safetensors(path)
        if all(meta.get(k) == v for k, v in key.items()):
            return tensors["latents"]
    latents = encode_latents(vae, train, mirror=True)
    save_safetensors(path, {"latents": latents}, key)
    return latents


class TextStates:
    """Frozen text encoder: captions -> last hidden states (B x 77 x width), as the pipeline makes them."""

    def __init__(self, text_encoder: CLIPTextModel) -> None:
        self.encoder, self.tokenizer = text_encoder.eval().requires_grad_(False), clip_bpe_tokenizer()

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.encoder(ids.to(self.encoder.device))[0]


def train_unet(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, train: Split,
               val: Split, folder: Path, seed: int, cfg: StageConfig = UNET_STAGE,
               max_minutes: float | None = None, inputs: str = "") -> dict:
    """``inputs``: what identifies the frozen VAE and text encoder (the checkpoint refuses others)."""
    device = unet.device
    sched = DDPMScheduler.from_config(preset_config("toyworld", "scheduler"))
    text = TextStates(text_encoder)
    latents = cached_latents(vae.eval(), train, folder / "latents.safetensors")
    n = len(train)
    captions = [s.caption for s in train.scenes]
    mirrored_captions = [s.caption for s in train.batch(np.arange(n), mirror=True)[1][n:]]
    captions += mirrored_captions
    val_index = np.arange(min(len(val), 256))
    val_latents = encode_latents(vae, Split(val.images[val_index], [val.scenes[i] for i in val_index]), mirror=False)
    val_states = text([val.scenes[i].caption for i in val_index])
    g = torch.Generator().manual_seed(seed)
    val_t = torch.linspace(50, 950, len(val_index)).long()
    val_noise = torch.randn(val_latents.shape, generator=g)
    alphas = sched.alphas_cumprod.to(device)

    def noisy(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * z + (1 - a).sqrt() * noise

    def loss(step: int) -> torch.Tensor:
        idx = batch_indices(2 * n, cfg.batch, step, seed, "unet")
        gen = step_generator(seed, "unet", step)
        z = latents[idx].to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        drop = torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT
        states = text(["" if d else captions[i] for i, d in zip(idx, drop.tolist())])
        pred = unet(noisy(z, noise, t), t, states).sample
        weight = min_snr_weight(sched, t, MIN_SNR_GAMMA)
        return (weight * (pred - noise).pow(2).flatten(1).mean(1)).mean()

    def evaluate() -> dict:
        errs = []
        for k in range(0, len(val_index), 64):
            sl = slice(k, k + 64)
            t = val_t[sl].to(device)
            pred = unet(noisy(val_latents[sl], val_noise[sl].to(device), t), t, val_states[sl]).sample
            errs.append((pred - val_noise[sl].to(device)).pow(2).flatten(1).mean(1))
        return {"eps_mse_val": float(torch.cat(errs).mean())}

    return run_stage("unet", folder, unet, cfg, loss, evaluate, max_minutes=max_minutes, inputs=inputs)
