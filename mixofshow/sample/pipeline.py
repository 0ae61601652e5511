"""Sampling with ED-LoRA concepts through diffusers' own ``StableDiffusionPipeline.__call__``.

The pipeline is not re-implemented: prompts (and the negative prompt) are encoded layer-wise by
:class:`~mixofshow.concepts.tokens.LayerwiseTextEncoder` into ``(batch, L * 77, dim)`` contexts
and handed to the stock pipeline as ``prompt_embeds`` / ``negative_prompt_embeds``; the
layer-wise attention processors installed by :class:`~mixofshow.concepts.edlora.EDLoRA` slice
them per cross-attention layer.

Reproducibility: image ``k`` of a prompt is drawn with seed ``seed + k`` by its own CPU
``torch.Generator`` (initial noise and any scheduler noise), so an image does not depend on the
batch size, on which other prompts share its batch, or on the device.

Output: ``{prompt_index:03d}_{slug}_{seed}.png`` files whose PNG text chunk ``parameters`` holds
the generation parameters as JSON, and an ``index.json`` listing every image with its parameters
(rewritten atomically after every batch, so a killed run leaves a consistent index).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from mixofshow.models.identity import base_model_name, set_lora_scale  # set_lora_scale: re-exported
from mixofshow.concepts.tokens import LayerwiseTextEncoder
from mixofshow.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "INDEX_FORMAT",
    "SCHEDULERS",
    "SampleConfig",
    "SampledImage",
    "check_inputs",
    "default_resolution",
    "generate",
    "image_filename",
    "iter_samples",
    "make_scheduler",
    "read_png_parameters",
    "set_lora_scale",
]

log = logging.getLogger(__name__)

INDEX_FORMAT = "mixofshow.samples/1"
_MAX_SEED = 2**63 - 1

# name -> scheduler class; all are built from the pipeline's own scheduler config
SCHEDULERS: dict[str, type] = {
    "dpm": DPMSolverMultistepScheduler,  # Mix-of-Show's validation sampler
    "ddim": DDIMScheduler,  # Mix-of-Show's evaluation sampler
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
}


@dataclass
class SampleConfig:
    prompts: list[str]  # concept words as trained, e.g. "a photo of <potter1> <potter2>"
    negative_prompt: str = ""  # encoded layer-wise too; used when guidance_scale > 1
    num_images: int = 1  # per prompt; image k uses seed + k
    seed: int = 0  # first seed of every prompt (Mix-of-Show validation: 0..7)
    steps: int = 50  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 turns it off
    scheduler: str = "dpm"  # one of SCHEDULERS
    lora_scale: float = 1.0  # LoRA multiplier: 0 = embeddings alone, 1 = trained concept (fused: set at load)
    height: int | None = None  # pixels; None: the UNet's sample_size x the VAE scale factor
    width: int | None = None
    batch_size: int = 4  # images per pipeline call; does not change the images
    output_dir: str | Path | None = None  # None: return images without writing files
    # recorded in every image's parameters (provenance only)
    concept: str | None = None  # the concept/fused file that was loaded
    base_model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]


@dataclass
class SampledImage:
    image: Image.Image
    params: dict[str, Any]  # prompt, seed, steps, ... (what the PNG text chunk holds)
    path: Path | None = None  # where it was written, if output_dir was set


def default_resolution(pipe) -> tuple[int, int]:
    """(height, width) diffusers would use: the UNet's sample_size times the VAE scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_inputs(config: SampleConfig, pipe=None) -> None:
    """Raise ``ValueError`` naming the first bad argument and its value."""
    prompts = config.prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"Invalid prompts: {prompts!r} (expected a non-empty list of strings)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Invalid prompts[{i}]: {prompt!r} (expected a non-empty string)")
    if not isinstance(config.negative_prompt, str):
        raise ValueError(f"Invalid negative_prompt: {config.negative_prompt!r} (expected a string)")
    for name in ("num_images", "steps", "batch_size"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    if not _is_int(config.seed) or not 0 <= config.seed <= _MAX_SEED - config.num_images:
        raise ValueError(
            f"Invalid seed: {config.seed!r} (expected an integer in [0, 2**63 - 1 - num_images])"
        )
    if not _is_real(config.guidance_scale) or config.guidance_scale < 0:
        raise ValueError(f"Invalid guidance_scale: {config.guidance_scale!r} (expected a finite number >= 0)")
    if config.scheduler not in SCHEDULERS:
        raise ValueError(f"Invalid scheduler: {config.scheduler!r} (expected one of {sorted(SCHEDULERS)})")
    if not _is_real(config.lora_scale):
        raise ValueError(f"Invalid lora_scale: {config.lora_scale!r} (expected a finite number)")
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 8 or value % 8):
            raise ValueError(f"Invalid {name}: {value!r} (expected a positive multiple of 8, or None)")
    if pipe is not None:
        train_steps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        if config.steps > train_steps:
            raise ValueError(
                f"Invalid steps: {config.steps} (the scheduler was trained with {train_steps} timesteps)"
            )


def make_scheduler(name: str, base_config) -> Any:
    """A fresh scheduler of kind ``name`` built from ``base_config`` (the pipeline's scheduler config)."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"Invalid scheduler: {name!r} (expected one of {sorted(SCHEDULERS)})") from None
    # Stable Diffusion runs PNDM as PLMS (skip_prk_steps), which also works with very few steps
    overrides = {"skip_prk_steps": True} if cls is PNDMScheduler else {}
    return cls.from_config(base_config, **overrides)


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "prompt"


def image_filename(prompt_index: int, prompt: str, seed: int) -> str:
    return f"{prompt_index:03d}_{slugify(prompt)}_{seed}.png"


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a sample's PNG text chunk."""
    with Image.open(path) as img:
        text = img.text.get("parameters") if hasattr(img, "text") else None
    if text is None:
        raise ValueError(f"{path}: no 'parameters' text chunk (not written by mixofshow sample?)")
    return json.loads(text)


def _png_bytes(image: Image.Image, params: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _jobs(config: SampleConfig) -> list[tuple[int, str, int, int]]:
    """(prompt_index, prompt, image_index, seed) for every image, prompt-major."""
    return [
        (p, prompt, k, config.seed + k)
        for p, prompt in enumerate(config.prompts)
        for k in range(config.num_images)
    ]


def iter_samples(
    pipe,
    encoder: LayerwiseTextEncoder,
    config: SampleConfig,
    progress: bool = True,
) -> Iterator[SampledImage]:
    """Generate ``config.num_images`` images per prompt, yielding them as they are made.

    ``pipe`` is a ``StableDiffusionPipeline`` with an ED-LoRA concept (or a fused model) loaded,
    ``encoder`` the matching layer-wise text encoder. The pipeline's scheduler, LoRA multipliers,
    train/eval modes and progress bar are restored afterwards.
    """
    # 1. check inputs
    check_inputs(config, pipe)
    height, width = config.height, config.width
    if height is None or width is None:
        default_h, default_w = default_resolution(pipe)
        height, width = height or default_h, width or default_w
    out_dir = Path(config.output_dir) if config.output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    # 2. put the pipeline in sampling state (restored in step 6)
    old_scheduler = pipe.scheduler
    old_progress = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    modules = [m for m in (pipe.unet, pipe.text_encoder, pipe.vae) if m is not None]
    old_training = [m.training for m in modules]
    old_multipliers = set_lora_scale(pipe, config.lora_scale)
    pipe.scheduler = make_scheduler(config.scheduler, old_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for m in modules:
        m.eval()

    base = {
        "negative_prompt": config.negative_prompt,
        "steps": config.steps,
        "guidance_scale": float(config.guidance_scale),
        "scheduler": config.scheduler,
        "lora_scale": float(config.lora_scale),
        "height": height,
        "width": width,
        "concept": config.concept,
        "base_model": config.base_model or base_model_name(pipe),
    }
    jobs = _jobs(config)
    index: list[dict[str, Any]] = []
    use_cfg = config.guidance_scale > 1.0
    bar = tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress)
    try:
        with torch.no_grad():
            negative = encoder.encode([config.negative_prompt]) if use_cfg else None
            for start in range(0, len(jobs), config.batch_size):
                batch = jobs[start : start + config.batch_size]
                # 3. encode prompts layer-wise: (B, L * 77, dim)
                prompt_embeds = encoder.encode([prompt for _, prompt, _, _ in batch])
                negative_embeds = negative.expand(len(batch), -1, -1) if use_cfg else None
                # 4. one CPU generator per image: image k of a prompt always uses seed + k
                generators = [torch.Generator("cpu").manual_seed(seed) for *_, seed in batch]
                # 5. diffusers' own denoising loop and VAE decode
                images = pipe(
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    num_inference_steps=config.steps,
                    guidance_scale=config.guidance_scale,
                    height=height,
                    width=width,
                    generator=generators,
                    output_type="pil",
                ).images
                for (p_idx, prompt, k, seed), image in zip(batch, images):
                    params = {"prompt": prompt, "seed": seed, **base, "prompt_index": p_idx, "image_index": k}
                    path = None
                    if out_dir is not None:
                        path = out_dir / image_filename(p_idx, prompt, seed)
                        atomic_write_bytes(path, _png_bytes(image, params))
                        index.append({"file": path.name, **params})
                    bar.update(1)
                    yield SampledImage(image=image, params=params, path=path)
                if out_dir is not None:
                    _write_index(out_dir, index, base["concept"], base["base_model"])
    finally:
        # 6. restore the pipeline
        bar.close()
        pipe.scheduler = old_scheduler
        pipe.set_progress_bar_config(**old_progress)
        for layer, value in old_multipliers.items():
            layer.multiplier = value
        for m, was_training in zip(modules, old_training):
            m.train(was_training)
    if out_dir is not None:
        log.info("wrote %d images and index.json to %s", len(index), out_dir)


def _write_index(
    out_dir: Path, images: Sequence[dict[str, Any]], concept: str | None, base_model: str
) -> None:
    doc = {
        "format": INDEX_FORMAT,
        "concept": concept,
        "base_model": base_model,
        "images": list(images),
    }
    atomic_write_text(out_dir / "index.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def generate(
    pipe,
    encoder: LayerwiseTextEncoder,
    config: SampleConfig,
    progress: bool = True,
) -> list[SampledImage]:
    """All images of :func:`iter_samples` as a list (PIL image + parameters + path)."""
    return list(iter_samples(pipe, encoder, config, progress=progress))
