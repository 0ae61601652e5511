"""Prompt files and presets for batch sampling at evaluation scale.

A prompt file is plain text (one prompt a line, ``#`` comments) or YAML/JSON: a list (or a
mapping with ``prompts:``) whose entries are strings or mappings::

    - "a photo of <potter1> <potter2>"
    - prompt: "<potter1> <potter2> and <hermione1> <hermione2> by a lake"
      negative_prompt: "blurry, lowres"
      seeds: [0, 1, 2, 3]             # or count: 8 (seeds S .. S+7); default: --num-images
      regions: regions.yaml            # a region file, a list of regions, or a Mix-of-Show string
      conditions:                      # T2I-Adapter conditions
        - {adapter: TencentARC/t2iadapter_keypose_sd14v1, image: pose.png, weight: 1.0}

Relative paths are read from the prompt file's folder. :data:`PRESETS` holds sampler settings of
known protocols; ``mixofshow sample --preset mixofshow-eval`` is Mix-of-Show's evaluation
(each prompt x 50 seeds, DDIM 50 steps, CFG 7.5). See the README ("Batch sampling").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mixofshow.sample.adapters import conditions_from_data
from mixofshow.sample.plan import PromptSpec
from mixofshow.sample.regions import load_region_file, parse_region_string, read_yaml_file, regions_from_data

__all__ = ["PRESETS", "load_prompt_file", "regions_argument"]

# name -> SampleConfig fields; explicit CLI flags win over a preset
PRESETS: dict[str, dict[str, Any]] = {
    "mixofshow-eval": {"scheduler": "ddim", "steps": 50, "guidance_scale": 7.5, "num_images": 50},
    "mixofshow-regional": {"scheduler": "dpm", "steps": 50, "guidance_scale": 7.5, "num_images": 1},
}

_YAML_SUFFIXES = (".yaml", ".yml", ".json")
_ENTRY_KEYS = {"prompt", "negative_prompt", "seeds", "count", "regions", "conditions"}


def regions_argument(value: str, base_dir: str | os.PathLike | None = None) -> tuple[list, list]:
    """(regions, conditions) from a region file path or a Mix-of-Show region string."""
    if "-*-" in value:
        return parse_region_string(value), []
    path = Path(value)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    regions, raw_conditions = load_region_file(path)
    return regions, conditions_from_data(raw_conditions, f"region file {path}", path.parent)


def load_prompt_file(path: str | os.PathLike) -> list[str | PromptSpec]:
    """The prompts of a plain-text or YAML/JSON prompt file (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() not in _YAML_SUFFIXES:
        from mixofshow.data import load_prompt_list

        return list(load_prompt_list(path))
    data = read_yaml_file(path, "prompt file")
    if isinstance(data, dict) and set(data) == {"prompts"}:
        data = data["prompts"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompt file {path}: expected a non-empty list of prompts (or 'prompts:' holding one)")
    return [_entry(item, f"prompt file {path}: entry {i}", path.parent) for i, item in enumerate(data)]


def _entry(item: Any, where: str, base_dir: Path) -> str | PromptSpec:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict) or "prompt" not in item:
        raise ValueError(f"{where}: expected a string or a mapping with 'prompt', got {item!r}")
    unknown = sorted(set(item) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected one of {sorted(_ENTRY_KEYS)})")
    if "seeds" in item and "count" in item:
        raise ValueError(f"{where}: give seeds or count, not both")
    seeds = item.get("seeds")
    if seeds is not None and not isinstance(seeds, list):
        seeds = [seeds]
    spec = PromptSpec(prompt=item["prompt"], negative_prompt=item.get("negative_prompt"), seeds=seeds,
                      num_images=item.get("count"))
    conditions: list = []
    regions = item.get("regions")
    if isinstance(regions, str):
        spec.regions, conditions = regions_argument(regions, base_dir)
    elif regions is not None:
        spec.regions = regions_from_data(regions, where, base_dir)
    if "conditions" in item:
        conditions = conditions_from_data(item["conditions"], where, base_dir)
    spec.conditions = conditions or None
    return spec
