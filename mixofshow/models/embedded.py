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

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_RESOLUTION",
    "PRESETS",
    "build_embedded_pipeline",
    "build_preset_pipeline",
    "embedded_config",
    "preset_config",
]

EMBEDDED_NAME = "embedded:tiny-sd"
EMBEDDED_RESOLUTION = 128  # pixels; the VAE downsamples by 8 as in SD, so latents are 16 x 16
_SEED = 20231122
# architecture presets shipped as JSON configs under mixofshow/models/<preset>/:
# "embedded" (the tiny model) and "sd15" (Stable Diffusion 1.5's published unet, vae,
# text_encoder (CLIP ViT-L/14 text tower) and scheduler configs; used with random weights by
# bench/gpu.py, never as a trained model)
PRESETS = ("embedded", "sd15", "toyworld")


def preset_config(preset: str, part: str) -> dict:
    """The JSON config of one component (``unet``, ``vae``, ``text_encoder``, ``scheduler``) of a preset."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown architecture preset {preset!r}; expected one of {list(PRESETS)}")
    text = resources.files("mixofshow.models").joinpath(preset, f"{part}.json").read_text()
    return json.loads(text)


def embedded_config(part: str) -> dict:
    """The JSON config of one component of the embedded model."""
    return preset_config("embedded", part)


def build_embedded_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Build the tiny pipeline; identical weights on every call (seeded, CPU init)."""
    pipe = build_preset_pipeline("embedded")
    pipe.register_to_config(_name_or_path=EMBEDDED_NAME)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_preset_pipeline(
    preset: str, device: torch.device | str | None = None, seed: int = _SEED
) -> StableDiffusionPipeline:
    """A pipeline of ``preset``'s architecture with seeded random weights, created on ``device``.

    ``device="meta"`` builds it without memory (for FLOP counts); ``"cuda"`` initialises the
    weights on the GPU (seconds for SD 1.5, where a CPU init takes a minute).
    """
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**preset_config(preset, "unet"))
        vae = AutoencoderKL(**preset_config(preset, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset_config(preset, "text_encoder")))
    sched_cfg = preset_config(preset, "scheduler")
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
    pipe.register_to_config(_name_or_path=f"random:{preset}")
    return pipe


