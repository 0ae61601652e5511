"""One batch of images through diffusers' ``StableDiffusionPipeline.__call__``, regions and adapters included.

Recipe: (1) every prompt of the batch (global, negative, each region's prompt and negative) is
encoded layer-wise in one text-encoder call; (2) the region contexts and coverage maps go into a
:class:`~mixofshow.concepts.regional_attention.RegionState` read by the regional processors;
(3) adapter residuals are computed once and added to every UNet call by a forward pre-hook;
(4) the stock denoising loop runs, a step-end callback switching the regions on and off by step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mixofshow.concepts.regional_attention import RegionState, regional_attention
from mixofshow.concepts.tokens import LayerwiseTextEncoder
from mixofshow.sample.adapters import Condition, adapter_residuals, residuals_hook
from mixofshow.sample.regions import Region, region_maps

__all__ = ["BatchSettings", "encode_once", "denoise_batch"]


class BatchSettings:
    """What the images of one batch share besides the sampler settings."""

    def __init__(
        self,
        negative_prompt: str,
        regions: Sequence[Region] | None = None,
        conditions: Sequence[Condition] | None = None,
        region_strength: float = 1.0,
        region_steps: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.negative_prompt = negative_prompt
        self.regions = list(regions or [])
        self.conditions = list(conditions or [])
        self.region_strength = float(region_strength)
        self.region_steps = (float(region_steps[0]), float(region_steps[1]))


def encode_once(encoder: LayerwiseTextEncoder, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Layer-wise contexts of the distinct ``texts``, from one batched text-encoder call."""
    unique = list(dict.fromkeys(texts))
    embeds = encoder.encode(unique)
    return dict(zip(unique, embeds))


def _region_state(
    lookup: dict[str, torch.Tensor], settings: BatchSettings, batch: int, use_cfg: bool, maps, latent_size
) -> RegionState:
    regions = settings.regions
    cond = torch.stack([lookup[r.prompt] for r in regions])  # (R, L * T, dim)
    contexts = cond.unsqueeze(0).expand(batch, -1, -1, -1)
    if use_cfg:  # diffusers' order: [uncond; cond]; a region's own negative prompt, or the global one
        neg = torch.stack([lookup[_negative(r, settings)] for r in regions]).unsqueeze(0)
        contexts = torch.cat([neg.expand(batch, -1, -1, -1), contexts])
    return RegionState(contexts=contexts, maps=maps, latent_size=latent_size, strength=settings.region_strength)


def _negative(region: Region, settings: BatchSettings) -> str:
    return settings.negative_prompt if region.negative_prompt is None else region.negative_prompt


def denoise_batch(
    pipe,
    encoder: LayerwiseTextEncoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: BatchSettings,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    output_type: str = "pil",
    on_step: Callable[[], None] | None = None,
) -> Any:
    """PIL images of ``prompts`` (one each), image i drawn with its own CPU generator seeded ``seeds[i]``.

    ``output_type="latent"`` returns the final latents instead (used by the tests); ``on_step`` is
    called after every denoising step (progress bars move per step, not per batch)."""
    use_cfg = guidance_scale > 1.0
    batch = len(prompts)
    # 1. one text-encoder call for every prompt of the batch
    texts = list(prompts) + ([settings.negative_prompt] if use_cfg else [])
    for region in settings.regions:
        texts += [region.prompt] + ([_negative(region, settings)] if use_cfg else [])
    lookup = encode_once(encoder, texts)
    prompt_embeds = torch.stack([lookup[p] for p in prompts])
    negative_embeds = lookup[settings.negative_prompt].expand(batch, -1, -1) if use_cfg else None
    factor = pipe.vae_scale_factor
    maps = region_maps(settings.regions, height, width) if settings.regions else None
    state = None

    def on_step_end(_pipe, i, _t, _tensors):
        if state is not None:
            state.active = in_range(i + 1)
        if on_step is not None:
            on_step()
        return {}

    kwargs: dict[str, Any] = {"callback_on_step_end": on_step_end} if (settings.regions or on_step) else {}
    with contextlib.ExitStack() as stack:
        # 2. regional cross-attention, on for the steps in [start, end) * steps
        if settings.regions:
            state = _region_state(lookup, settings, batch, use_cfg, maps, (height // factor, width // factor))
            start, end = settings.region_steps
            in_range = lambda i: start * steps <= i < end * steps  # noqa: E731
            state.active = in_range(0)
            stack.enter_context(regional_attention(pipe.unet, state))
        # 3. T2I-Adapter residuals, the same at every step
        if settings.conditions:
            residuals = adapter_residuals(settings.conditions, pipe.unet, height, width, factor, maps)
            stack.enter_context(residuals_hook(pipe.unet, residuals))
        # 4. diffusers' own denoising loop and VAE decode; one generator per image
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        return pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type=output_type,
            **kwargs,
        ).images
