"""A tiny Stable-Diffusion-1.x-shaped pipeline built deterministically from configs in the repo.

Same classes and code path as a real SD 1.x checkpoint (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIPTextModel, the real CLIP tokenizer), a few channels wide, with
weights drawn from a fixed seed. It makes training, fusion and sampling run offline in seconds;
its images are noise-like, since its weights are random. Images are 128 x 128 (latents 16 x 16).
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from mixofshow.models.tokenizer import clip_bpe_tokenizer

__all__ = ["EMBEDDED_NAME", "EMBEDDED_RESOLUTION", "build_embedded_pipeline", "embedded_config"]

EMBEDDED_NAME = "embedded:tiny-sd"
EMBEDDED_RESOLUTION = 128  # pixels; the VAE downsamples by 8 as in SD, so latents are 16 x 16
_SEED = 20231122


def embedded_config(part: str) -> dict:
    """The JSON config of one component: ``unet``, ``vae``, ``text_encoder`` or ``scheduler``."""
    text = resources.files("mixofshow.models").joinpath("embedded", f"{part}.json").read_text()
    return json.loads(text)


def build_embedded_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Build the tiny pipeline; identical weights on every call (seeded, CPU init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = UNet2DConditionModel(**embedded_config("unet"))
        vae = AutoencoderKL(**embedded_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**embedded_config("text_encoder")))
    sched_cfg = embedded_config("scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(_name_or_path=EMBEDDED_NAME)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


