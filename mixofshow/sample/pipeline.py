"""Sampling with ED-LoRA concepts through diffusers' own ``StableDiffusionPipeline.__call__``.

The pipeline is not re-implemented: prompts (and the negative prompt) are encoded layer-wise by
:class:`~mixofshow.concepts.tokens.LayerwiseTextEncoder` into ``(batch, L * 77, dim)`` contexts
and handed to the stock pipeline as ``prompt_embeds`` / ``negative_prompt_embeds``; the
layer-wise attention processors installed by :class:`~mixofshow.concepts.edlora.EDLoRA` slice
them per cross-attention layer.

Reproducibility: image ``k`` of a prompt is drawn with seed ``seed + k`` by its own CPU
``torch.Generator`` (initial noise and any scheduler noise), so an image does not depend on the
batch size, on which other prompts share its batch, or on the device.

Regions (``SampleConfig.regions``, :mod:`mixofshow.sample.regions`) swap in
:class:`~mixofshow.concepts.regional_attention.RegionalAttnProcessor` for the call; T2I-Adapter
conditions (:mod:`mixofshow.sample.adapters`) reach the UNet as
``down_intrablock_additional_residuals`` through a forward pre-hook. Each batch encodes all of its
prompts (global, negative, regions') in one text-encoder call and runs one UNet call per step.

Output: ``{prompt_index:03d}_{slug}_{seed}.png`` files whose PNG text chunk ``parameters`` holds
the generation parameters as JSON, and an ``index.json`` listing every image with its parameters
(rewritten atomically after every batch, so a killed run leaves a consistent index; see
:mod:`mixofshow.sample.files`). An image already on disk with the same parameters is not made
again, so a rerun resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
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
from tqdm.auto import tqdm

from mixofshow.concepts.tokens import LayerwiseTextEncoder
from mixofshow.models.identity import base_model_name, sampling_state, set_lora_scale  # set_lora_scale: re-exported
from mixofshow.sample.adapters import Condition
from mixofshow.sample.denoise import BatchSettings, denoise_batch
from mixofshow.sample.files import INDEX_FORMAT, image_filename, png_bytes, read_png_parameters
from mixofshow.utils.io import file_sha256
from mixofshow.sample.plan import (
    PromptSpec,
    batches,
    describe,
    existing_image,
    plan_jobs,
    window_checker,
    write_grids,
    write_run_index,
)
from mixofshow.sample.regions import Region, check_regions, regions_from_data
from mixofshow.utils.io import atomic_write_bytes

__all__ = [
    "INDEX_FORMAT",
    "SCHEDULERS",
    "PromptSpec",
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
    prompts: list[str | PromptSpec]  # concept words as trained, e.g. "a photo of <potter1> <potter2>"
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
    # regional sampling (README "Regional sampling"); applies to every prompt without its own
    regions: list[Region] | None = None  # None or []: ordinary sampling
    region_strength: float = 1.0  # replace ratio inside regions; 1 = Mix-of-Show
    region_steps: tuple[float, float] = (0.0, 1.0)  # [start, end) fraction of the steps; all = Mix-of-Show
    conditions: list[Condition] | None = None  # T2I-Adapter conditions (README "T2I-Adapter conditions")
    grids: bool = False  # also write one contact sheet per prompt to output_dir/grids/

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if self.regions and not all(isinstance(r, Region) for r in self.regions):
            # JSON-ready form (a job queue, a config file): {prompt, negative_prompt?, box | mask}
            self.regions = regions_from_data(list(self.regions), "regions")


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


def _factor(pipe) -> int:
    return int(getattr(pipe, "vae_scale_factor", 8)) if pipe is not None else 8


def check_inputs(config: SampleConfig, pipe=None) -> None:
    """Raise ``ValueError`` naming the first bad argument and its value."""
    prompts = config.prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"Invalid prompts: {prompts!r} (expected a non-empty list of strings)")
    for i, prompt in enumerate(prompts):
        text = prompt.prompt if isinstance(prompt, PromptSpec) else prompt
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Invalid prompts[{i}]: {text!r} (expected a non-empty string)")
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
    factor = _factor(pipe)
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < factor or value % factor):
            raise ValueError(
                f"Invalid {name}: {value!r} (expected a positive multiple of {factor}, the model's "
                "VAE factor, or None)"
            )
    if not _is_real(config.region_strength) or not 0 <= config.region_strength <= 1:
        raise ValueError(f"Invalid region_strength: {config.region_strength!r} (expected a number in [0, 1])")
    steps = config.region_steps
    if not (isinstance(steps, (list, tuple)) and len(steps) == 2 and all(_is_real(v) for v in steps)
            and 0 <= steps[0] <= steps[1] <= 1):
        raise ValueError(f"Invalid region_steps: {steps!r} (expected [start, end] fractions, 0 <= start <= end <= 1)")
    for i, spec in enumerate(_specs(config)):
        if spec.num_images is not None and (not _is_int(spec.num_images) or spec.num_images < 1):
            raise ValueError(f"Invalid prompts[{i}].num_images: {spec.num_images!r} (expected an integer >= 1)")
        if spec.seeds is not None and (
            not spec.seeds or not all(_is_int(s) and 0 <= s <= _MAX_SEED for s in spec.seeds)
        ):
            raise ValueError(f"Invalid prompts[{i}].seeds: {spec.seeds!r} (expected a list of integers >= 0)")
        for j, cond in enumerate(spec.conditions or []):
            if not _is_real(cond.weight):
                raise ValueError(f"{cond.label(j)}: weight {cond.weight!r} is not a finite number")
            weights = cond.region_weights
            if weights is not None and (
                not isinstance(weights, (list, tuple)) or len(weights) != len(spec.regions or [])
                or not all(_is_real(w) for w in weights)
            ):
                raise ValueError(
                    f"{cond.label(j)}: region_weights {weights!r} must be {len(spec.regions or [])} "
                    "numbers, one per region"
                )
        if spec.regions and config.height is not None and config.width is not None:
            check_regions(spec.regions, config.height, config.width)
    if pipe is not None:
        train_steps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        if config.steps > train_steps:
            raise ValueError(
                f"Invalid steps: {config.steps} (the scheduler was trained with {train_steps} timesteps)"
            )


def _specs(config: SampleConfig) -> list[PromptSpec]:
    """Every prompt as a :class:`PromptSpec` with the config's settings filled in."""
    out = []
    for prompt in config.prompts:
        spec = prompt if isinstance(prompt, PromptSpec) else PromptSpec(prompt)
        out.append(replace(
            spec,
            negative_prompt=config.negative_prompt if spec.negative_prompt is None else spec.negative_prompt,
            seeds=list(spec.seeds) if spec.seeds is not None else None,
            regions=config.regions if spec.regions is None else spec.regions,
            conditions=config.conditions if spec.conditions is None else spec.conditions,
        ))
    return out


def make_scheduler(name: str, base_config) -> Any:
    """A fresh scheduler of kind ``name`` built from ``base_config`` (the pipeline's scheduler config)."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"Invalid scheduler: {name!r} (expected one of {sorted(SCHEDULERS)})") from None
    # Stable Diffusion runs PNDM as PLMS (skip_prk_steps), which also works with very few steps
    overrides = {"skip_prk_steps": True} if cls is PNDMScheduler else {}
    return cls.from_config(base_config, **overrides)


def iter_samples(
    pipe,
    encoder: LayerwiseTextEncoder,
    config: SampleConfig,
    progress: bool = True,
) -> Iterator[SampledImage]:
    """Generate every image of ``config``, yielding them as they are made (or found on disk).

    ``pipe`` is a ``StableDiffusionPipeline`` with an ED-LoRA concept, a fused model or a bare
    base model loaded (:func:`mixofshow.sample.load.load_adapter` / ``load_base``), ``encoder``
    the matching layer-wise text encoder. The pipeline's scheduler, attention processors, LoRA
    multipliers, train/eval modes and progress bar are restored afterwards.
    """
    # 1. check inputs
    check_inputs(config, pipe)
    height, width = config.height, config.width
    if height is None or width is None:
        default_h, default_w = default_resolution(pipe)
        height, width = height or default_h, width or default_w
    specs = _specs(config)
    for spec in specs:
        if spec.regions:
            check_regions(spec.regions, height, width)
    out_dir = Path(config.output_dir) if config.output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    base = {
        "steps": config.steps,
        "guidance_scale": float(config.guidance_scale),
        "scheduler": config.scheduler,
        "lora_scale": float(config.lora_scale),
        "height": height,
        "width": width,
        "concept": config.concept,
        "base_model": config.base_model or base_model_name(pipe),
    }
    if config.concept is not None and Path(config.concept).is_file():
        # a concept retrained into the same file must not count as the one an image was made with
        base["concept_sha256"] = file_sha256(config.concept)
    # 2. every image's parameters and file; those already on disk are not made again
    seen = window_checker(encoder)
    jobs = []
    for p_idx, spec, k, seed in plan_jobs(specs, config.seed, config.num_images):
        prompt, full = seen(spec.prompt)
        params = {"prompt": prompt, "seed": seed, **describe(spec, config.region_strength, config.region_steps, seen), **base,
                  "prompt_index": p_idx, "image_index": k}
        if full is not None:
            params["full_prompt"] = full
        path = out_dir / image_filename(p_idx, spec.prompt, seed) if out_dir is not None else None
        jobs.append((p_idx, spec, params, path))
    # indices of finished images (not the images: an evaluation run holds thousands)
    done = {n for n, (_, _, params, path) in enumerate(jobs) if path is not None and existing_image(path, params)}
    pending = [n for n in range(len(jobs)) if n not in done]
    if done:
        log.info("%d of %d images already in %s; making the other %d", len(done), len(jobs), out_dir, len(pending))
    # 3. put the pipeline in sampling state (restored in step 7; eval modes and LoRA scale by
    # sampling_state, the state save/restore that validation and fusion share)
    old_scheduler = pipe.scheduler
    old_progress = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.scheduler = make_scheduler(config.scheduler, old_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    grids: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(jobs), initial=len(done), desc="sampling", unit="img", disable=not progress,
               # the count moves in fractions of an image (per denoising step): one decimal
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for n in sorted(done):
            _, _, params, path = jobs[n]
            with Image.open(path) as img:
                yield SampledImage(image=img.convert("RGB"), params=params, path=path)
        with torch.no_grad(), sampling_state(pipe, config.lora_scale):
            for batch in batches(pending, jobs, config.batch_size):
                spec = jobs[batch[0]][1]
                settings = BatchSettings(spec.negative_prompt, spec.regions, spec.conditions,
                                         config.region_strength, config.region_steps)
                # 4. encode, denoise and decode the batch (diffusers' own loop)
                share = len(batch) / max(1, config.steps)  # the bar moves per denoising step
                images = denoise_batch(
                    pipe, encoder, [jobs[n][1].prompt for n in batch], [jobs[n][2]["seed"] for n in batch],
                    settings, config.steps, config.guidance_scale, height, width,
                    on_step=lambda: bar.update(share),
                )
                bar.n = len(done) + len(batch)  # whole images, without the steps' rounding
                bar.refresh()
                for n, image in zip(batch, images):
                    _, _, params, path = jobs[n]
                    if path is not None:  # 5. write the image at once: a killed run keeps it
                        atomic_write_bytes(path, png_bytes(image, params))
                    done.add(n)
                    yield SampledImage(image=image, params=params, path=path)
                if out_dir is not None:  # 6. grids of finished prompts, then the index
                    write_grids(out_dir, jobs, done, grids, config.grids)
                    write_run_index(out_dir, jobs, done, grids, base)
        if out_dir is not None:
            write_grids(out_dir, jobs, done, grids, config.grids)
            write_run_index(out_dir, jobs, done, grids, base)
    finally:
        # 7. restore the pipeline
        bar.close()
        pipe.scheduler = old_scheduler
        pipe.set_progress_bar_config(**old_progress)
    if out_dir is not None:
        log.info("wrote %d images and index.json to %s", len(done), out_dir)


def generate(
    pipe,
    encoder: LayerwiseTextEncoder,
    config: SampleConfig,
    progress: bool = True,
) -> list[SampledImage]:
    """All images of :func:`iter_samples` as a list (PIL image + parameters + path)."""
    return list(iter_samples(pipe, encoder, config, progress=progress))
