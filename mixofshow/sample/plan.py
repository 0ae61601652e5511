"""The plan of a sampling run: every image's parameters and file, what is already on disk,
batches of images that share settings, contact sheets and the index (:mod:`mixofshow.sample.files`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixofshow.sample.adapters import Condition
from mixofshow.sample.files import contact_sheet, grid_filename, png_bytes, read_png_parameters, write_index
from mixofshow.sample.regions import Region
from mixofshow.utils.io import atomic_write_bytes

__all__ = ["PromptSpec", "plan_jobs", "describe", "window_checker", "existing_image", "batches", "write_grids", "write_run_index"]

log = logging.getLogger(__name__)


@dataclass
class PromptSpec:
    """One prompt with its own settings (a prompt file's YAML entry); None: the config's."""

    prompt: str
    negative_prompt: str | None = None
    seeds: list[int] | None = None  # None: config.seed + k for k < num_images
    num_images: int | None = None  # None: config.num_images (ignored when seeds are given)
    regions: list[Region] | None = None
    conditions: list[Condition] | None = None


def plan_jobs(specs: Sequence[PromptSpec], seed: int, num_images: int) -> list[tuple[int, PromptSpec, int, int]]:
    """(prompt_index, spec, image_index, seed) for every image, prompt-major."""
    jobs = []
    for p, spec in enumerate(specs):
        count = spec.num_images if spec.num_images is not None else num_images
        seeds = spec.seeds if spec.seeds is not None else [seed + k for k in range(count)]
        jobs += [(p, spec, k, s) for k, s in enumerate(seeds)]
    return jobs


def describe(spec: PromptSpec, region_strength: float, region_steps: Sequence[float], seen: Callable) -> dict[str, Any]:
    """The per-prompt parameters recorded with each image (JSON-ready)."""
    out: dict[str, Any] = {"negative_prompt": seen(spec.negative_prompt)[0]}
    if spec.regions:
        out["regions"] = [
            {"prompt": seen(r.prompt)[0],
             "negative_prompt": seen(spec.negative_prompt if r.negative_prompt is None else r.negative_prompt)[0],
             **({"mask": str(r.mask)} if r.mask is not None else {"box": list(r.box or (0.0, 0.0, 1.0, 1.0))})}
            for r in spec.regions
        ]
        out["region_strength"] = float(region_strength)
        out["region_steps"] = [float(v) for v in region_steps]
    if spec.conditions:
        out["conditions"] = [
            {"adapter": c.adapter if isinstance(c.adapter, str) else type(c.adapter).__name__,
             "image": str(c.image) if not hasattr(c.image, "size") else "<image>",
             "weight": float(c.weight), "region_weights": None if c.region_weights is None else [float(w) for w in c.region_weights]}
            for c in spec.conditions
        ]
    return out


def window_checker(encoder: LayerwiseTextEncoder):
    """``seen(prompt)`` -> (text the encoder reads, full text when cut, else None); warns once per prompt."""
    memo: dict[str, tuple[str, str | None]] = {}

    def seen(prompt: str) -> tuple[str, str | None]:
        if prompt not in memo:
            tokens, text = encoder.window(prompt)
            if text != prompt:
                log.warning(
                    "prompt has %d tokens, the text encoder reads %d; it is cut to %r (from %r)",
                    tokens, encoder.tokenizer.model_max_length, text, prompt,
                )
            memo[prompt] = (text, prompt if text != prompt else None)
        return memo[prompt]

    return seen


def existing_image(path: Path, params: dict[str, Any]) -> bool:
    """Whether ``path`` holds an image made with exactly ``params`` (a resumed run keeps it)."""
    if not path.is_file():
        return False
    try:
        return read_png_parameters(path) == params
    except (OSError, ValueError):
        return False


def batches(pending: list[int], jobs: list, size: int) -> Iterator[list[int]]:
    """Runs of pending jobs that share negative prompt, regions and conditions, ``size`` at most."""
    batch: list[int] = []
    for n in pending:
        spec = jobs[n][1]
        if batch:
            first = jobs[batch[0]][1]
            same = (first.negative_prompt == spec.negative_prompt and first.regions is spec.regions
                    and first.conditions is spec.conditions)
            if not same or len(batch) == size:
                yield batch
                batch = []
        batch.append(n)
    if batch:
        yield batch


def write_grids(out_dir: Path, jobs: list, done: set[int], grids: dict, enabled: bool) -> None:
    if not enabled:
        return
    by_prompt: dict[int, list[int]] = {}
    for n, (p_idx, _, _, _) in enumerate(jobs):
        by_prompt.setdefault(p_idx, []).append(n)
    for p_idx, members in by_prompt.items():
        if p_idx in grids or not all(n in done for n in members):
            continue
        spec = jobs[members[0]][1]
        name = grid_filename(p_idx, spec.prompt)
        sheet = contact_sheet([jobs[n][3] for n in members])
        atomic_write_bytes(out_dir / name, png_bytes(sheet, {"prompt": jobs[members[0]][2]["prompt"],
                                                             "files": [jobs[n][3].name for n in members]}))
        grids[p_idx] = {"file": name, "prompt_index": p_idx, "prompt": jobs[members[0]][2]["prompt"]}


def write_run_index(out_dir: Path, jobs: list, done: set[int], grids: dict, base: dict) -> None:
    images = [{"file": jobs[n][3].name, **jobs[n][2]} for n in sorted(done)]
    write_index(out_dir, images, base["concept"], base["base_model"], [grids[p] for p in sorted(grids)])


