"""Validation samples during training: each prompt at each LoRA scale (0 shows the embeddings alone).

``samples/step_N/scale_S/`` holds the PNGs (with ``index.json``) of each scale and
``samples/step_N/grid.png`` all of them at once: one row per scale (in ``validation.lora_scales``
order), one column per image (prompt by prompt, seeds ``seed..seed+num_images-1``), labelled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mixofshow.concepts.edlora import EDLoRA
from mixofshow.data import load_prompt_list
from mixofshow.models.identity import sampling_state
from mixofshow.train.config import TrainConfig

__all__ = ["validation_prompts", "validation_folder", "validation_labels", "run_validation"]

log = logging.getLogger(__name__)


def validation_prompts(config: TrainConfig) -> list[str]:
    v = config.validation
    prompts = list(v.prompts)
    if v.prompts_file:
        prompts += load_prompt_list(v.prompts_file)
    return prompts


def validation_folder(config: TrainConfig, step: int) -> Path:
    """Where the validation samples of ``step`` go."""
    return Path(config.output_dir) / "samples" / f"step_{step:06d}"


def validation_labels(config: TrainConfig) -> dict[str, list[str]]:
    """The grid's labels: a row per LoRA scale, a column per (prompt, seed)."""
    v = config.validation
    columns = [f"seed {v.seed + k}: {p}" for p in validation_prompts(config) for k in range(v.num_images)]
    return {"row_labels": [f"LoRA {s:g}" for s in v.lora_scales], "col_labels": columns}


@torch.no_grad()
def run_validation(model: EDLoRA, config: TrainConfig, step: int, device, progress: bool = False) -> Path | None:
    """Sample the validation prompts at every configured LoRA scale into ``samples/step_N``
    (``progress``: a bar per scale that moves every denoising step)."""
    from mixofshow.sample.grid import save_grid
    from mixofshow.sample.pipeline import SampleConfig, generate

    prompts = validation_prompts(config)
    if not prompts:
        return None
    v = config.validation
    folder = validation_folder(config, step)
    # the end-of-run samples are of the concept file just written: index.json names it (evaluate
    # reads the class words from it); earlier steps have no concept file yet
    concept_file = Path(config.output_dir) / f"{config.name}.safetensors"
    concept = str(concept_file) if step >= config.train.max_steps and concept_file.is_file() else None
    rows = []
    with sampling_state(model.pipe):  # eval mode; train modes and LoRA scales restored after
        for scale in v.lora_scales:
            sample_cfg = SampleConfig(
                prompts=prompts,
                negative_prompt=v.negative_prompt,
                num_images=v.num_images,
                seed=v.seed,
                steps=v.steps,
                guidance_scale=v.guidance_scale,
                lora_scale=scale,
                output_dir=str(folder / f"scale_{scale:g}"),
                concept=concept,
                base_model=config.base_model,
            )
            rows.append([s.image for s in generate(model.pipe, model.encoder, sample_cfg, progress=progress)])
    if rows:
        save_grid(folder / "grid.png", rows, **validation_labels(config))
    log.info("validation samples of step %d in %s (grid.png: one row per LoRA scale)", step, folder)
    return folder
