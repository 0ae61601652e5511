"""The toy world's quality floors, measured on held-out scenes and prompts (``mixofshow pretrain --check``).

- VAE: PSNR of reconstructions of ``test`` scenes;
- evaluation CLIP: zero-shot accuracy per attribute on one-object ``test`` renderings (held-out
  compositions; the floor is judged here), and on ``val`` renderings (held-out scenes) beside;
- base model: samples for held-out prompts (the captions of one-object ``test`` scenes, each with a
  (class, colour, background) triple the UNet never saw), 25 DPM-Solver steps, CFG 7.5, judged
  per attribute by the evaluation CLIP (choosing among captions that differ in that attribute,
  ``world.attribute_variants``) and, independently of any CLIP, by the ground-truth CNN
  ``judge``; the judge's accuracy on ``test`` renderings is reported beside, as its ceiling.

Nothing here is trained on: ``test`` is disjoint from the training scenes and triples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mixofshow.toyworld.data import Split

__all__ = ["FLOORS", "check_floors", "sample_grid", "sample_prompts", "to_uint8"]

log = logging.getLogger(__name__)

# the floors: a measured value must be >= the floor
FLOORS = {
    "vae_psnr_test": 28.0,
    "clip_zero_shot": {"class": 0.95, "colour": 0.90, "background": 0.95, "position": 0.85},
    "samples": {"class": 0.80, "background": 0.85, "colour": 0.60, "position": 0.60},
}
GUIDANCE, STEPS = 7.5, 25


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B x 3 x H x W) as B x H x W x 3 uint8, as a judge reads renderings."""
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def _clip_judge(towers, images: torch.Tensor, scenes) -> dict[str, float]:
    from mixofshow.toyworld.clips import zero_shot

    return zero_shot(towers, Split(to_uint8(images), list(scenes)), limit=len(scenes))


@torch.no_grad()
def sample_prompts(pipe, prompts: list[str], seed: int, batch: int = 25, per_prompt: int = 1) -> torch.Tensor:
    """Images (B x 3 x H x W in [-1, 1]) for ``prompts``; image i uses seed ``seed + i % per_prompt``
    (``per_prompt`` consecutive entries of one prompt are its seeds)."""
    out = []
    for k in range(0, len(prompts), batch):
        chunk = prompts[k : k + batch]
        gens = [torch.Generator().manual_seed(seed + (k + i) % per_prompt if per_prompt > 1 else seed + k + i)
                for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens,
                      output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


def sample_grid(pipe, prompts: list[str], path: Path, seeds: int = 4, seed: int = 0) -> Path:
    """One labelled PNG: a row per prompt (its text on the left), ``seeds`` samples each (enlarged
    by ``save_grid``, pixels as squares, so they stay what the model drew)."""
    from mixofshow.sample.grid import save_grid

    images = to_uint8(sample_prompts(pipe, [p for p in prompts for _ in range(seeds)], seed, per_prompt=seeds))
    cells = [Image.fromarray(im) for im in images]
    rows = [cells[i * seeds : (i + 1) * seeds] for i in range(len(prompts))]
    return save_grid(path, rows, row_labels=prompts, col_labels=[f"seed {seed + k}" for k in range(seeds)])


def check_floors(weights_dir: Path, test: Split, samples: int = 200, seed: int = 0,
                 grid_path: Path | None = None, val: Split | None = None) -> dict:
    """Measure every floor; returns ``{"measured": ..., "floors": FLOORS, "passed": {...}}``."""
    from mixofshow.evaluate.clip import ClipSpec, load_clip
    from mixofshow.models.pretrained import build_toyworld_pipeline, load_toyworld_judge
    from mixofshow.toyworld.clips import towers, zero_shot
    from mixofshow.toyworld.judge import judge_accuracy
    from mixofshow.toyworld.vae import psnr

    pipe = build_toyworld_pipeline(folder=weights_dir)
    pipe.set_progress_bar_config(disable=True)
    clip = load_clip(ClipSpec(model="toyworld", weights=str(weights_dir / "eval_clip.safetensors")), device="cpu")
    eval_towers = towers("clip-eval", clip.model)
    judge = load_toyworld_judge("judge", weights_dir)
    measured: dict = {}
    with torch.no_grad():
        x, _ = test.batch(np.arange(min(len(test), 500)))
        measured["vae_psnr_test"] = psnr(pipe.vae, x)
        measured["clip_zero_shot"] = zero_shot(eval_towers, test, limit=500)  # held-out compositions
        if val is not None:  # held-out scenes of compositions seen in training (reported beside)
            measured["clip_zero_shot_val"] = zero_shot(eval_towers, val, limit=500)
        measured["judge_on_renderings"] = judge_accuracy(judge, test)
        single = [i for i, s in enumerate(test.scenes) if len(s.objects) == 1][:samples]
        scenes = [test.scenes[i] for i in single]
        log.info("check: sampling %d held-out prompts", len(scenes))
        images = sample_prompts(pipe, [s.caption for s in scenes], seed)
        measured["samples_clip"] = _clip_judge(eval_towers, images, scenes)
        judged = judge_accuracy(judge, Split(to_uint8(images), scenes), limit=len(scenes))
        judged.pop("box_iou")  # a sample's object is not where the prompt's rendering put it
        measured["samples_judge"] = judged
        measured["samples"] = {k: min(measured["samples_clip"][k], measured["samples_judge"][k])
                               for k in FLOORS["samples"]}
    if grid_path is not None:
        sample_grid(pipe, [s.caption for s in scenes[:8]], grid_path, seed=seed)
    passed = {
        "vae_psnr_test": measured["vae_psnr_test"] >= FLOORS["vae_psnr_test"],
        "clip_zero_shot": all(measured["clip_zero_shot"][k] >= v for k, v in FLOORS["clip_zero_shot"].items()),
        "samples": all(measured["samples"][k] >= v for k, v in FLOORS["samples"].items()),
    }
    return {"measured": measured, "floors": FLOORS, "passed": passed, "samples": len(scenes),
            "sampler": f"DPM-Solver++ {STEPS} steps, CFG {GUIDANCE}, seeds {seed}..{seed + len(scenes) - 1}"}
