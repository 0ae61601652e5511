"""The toy world's pre-trained base model, shipped in the package and loaded by name, offline.

``base_model: toyworld`` (``--base-model toyworld``) gives a Stable-Diffusion-1.x-shaped pipeline
(AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel with the real CLIP BPE
tokenizer, the SD 1.x scheduler) whose weights ``mixofshow pretrain`` trained on the toy world
(``docs/toyworld.md``). Architecture: ``mixofshow/models/toyworld/*.json``; weights (fp16) and
their manifest (sha256 of each file, the command, seed and measured quality):
``mixofshow/models/toyworld/weights/``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from mixofshow.models.embedded import build_preset_pipeline
from mixofshow.utils.io import file_sha256, load_safetensors

__all__ = ["TOYWORLD_NAME", "PIPELINE_PARTS", "toyworld_weights_dir", "toyworld_manifest", "build_toyworld_pipeline",
           "load_weights", "load_toyworld_judge"]

TOYWORLD_NAME = "toyworld"
PIPELINE_PARTS = ("vae", "text_encoder", "unet")  # the pipeline's trained components


def toyworld_weights_dir() -> Path:
    return Path(str(resources.files("mixofshow.models").joinpath("toyworld", "weights")))


def toyworld_manifest(folder: Path | None = None) -> dict:
    """The manifest of the shipped weights; a clear error when they are not in this checkout."""
    folder = folder or toyworld_weights_dir()
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the toy world's weights are not in this installation; "
            "`mixofshow pretrain` trains them (docs/toyworld.md)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_weights(folder: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """One weights file of the manifest, checked against its recorded sha256."""
    path = folder / f"{name}.safetensors"
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise FileNotFoundError(f"{folder / 'manifest.json'}: lists no {path.name}")
    if file_sha256(path) != entry["sha256"]:
        raise ValueError(f"{path}: sha256 differs from the manifest's (a damaged or replaced file)")
    tensors, _ = load_safetensors(path)
    return tensors


def build_toyworld_pipeline(dtype: torch.dtype = torch.float32, folder: Path | None = None) -> StableDiffusionPipeline:
    """The toy world's pipeline with its trained weights (seconds on a CPU, no network)."""
    folder = folder or toyworld_weights_dir()
    manifest = toyworld_manifest(folder)
    pipe = build_preset_pipeline("toyworld")
    for name in PIPELINE_PARTS:
        module = getattr(pipe, name)
        module.load_state_dict({k: v.float() for k, v in load_weights(folder, name, manifest).items()})
    pipe.vae.register_to_config(scaling_factor=manifest["vae_scaling_factor"])
    pipe.register_to_config(_name_or_path=TOYWORLD_NAME)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_toyworld_judge(name: str, folder: Path | None = None) -> torch.nn.Module:
    """The toy world's ``judge`` (class, colour, background, position, box) or ``identity`` (the shipped
    concepts' looks) CNN with its shipped weights, in eval mode."""
    from mixofshow.toyworld.model import build

    folder = folder or toyworld_weights_dir()
    module = build(name)
    module.load_state_dict({k: v.float() for k, v in load_weights(folder, name, toyworld_manifest(folder)).items()})
    return module.eval()
