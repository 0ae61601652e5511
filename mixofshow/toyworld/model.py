"""The toy world's model parts: built from the configs in ``mixofshow/models/toyworld/``.

``build(part)`` makes a freshly initialised part (seeded); ``save_part`` / ``load_part`` store a
part's weights as one ``.safetensors`` file beside its config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mixofshow.models.embedded import preset_config
from mixofshow.utils.io import load_safetensors, save_safetensors

__all__ = ["PRESET", "build", "save_part", "load_part", "load_trained", "finals_sha256"]

PRESET = "toyworld"
_INIT_SEED = {"vae": 1, "unet": 2, "clip-cond": 3, "clip-eval": 4, "judge": 5, "identity": 6}


def build(part: str) -> nn.Module:
    """A new ``vae``, ``unet``, ``clip-cond`` (transformers CLIPModel), ``clip-eval`` (open_clip),
    ``judge`` or ``identity``."""
    with torch.random.fork_rng():
        torch.manual_seed(_INIT_SEED[part])
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**preset_config(PRESET, "vae"))
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**preset_config(PRESET, "unet"))
        if part == "clip-cond":
            from transformers import CLIPConfig, CLIPModel

            cfg = CLIPConfig(text_config=preset_config(PRESET, "text_encoder"),
                             vision_config=preset_config(PRESET, "vision_encoder"),
                             projection_dim=preset_config(PRESET, "text_encoder")["projection_dim"])
            return CLIPModel(cfg)
        if part == "clip-eval":
            import open_clip

            cfg = preset_config(PRESET, "eval_clip")
            return open_clip.CLIP(**{k: v for k, v in cfg.items()})
        if part == "judge":
            from mixofshow.toyworld.judge import Judge

            return Judge()
        if part == "identity":
            from mixofshow.toyworld.identity import build_identity

            return build_identity()
    raise ValueError(f"Unknown toy world part {part!r}; expected one of {list(_INIT_SEED)}")


def save_part(folder: Path, name: str, module: nn.Module, dtype: torch.dtype = torch.float32) -> Path:
    """``folder/name.safetensors`` with ``module``'s state (floating-point tensors as ``dtype``)."""
    path = folder / f"{name}.safetensors"
    state = module.state_dict()
    save_safetensors(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    return path


# a finished stage's weights: WORK_DIR/<stage>/final/<name>.safetensors
_FINAL = {"vae": "vae", "text_encoder": "clip-cond", "eval_clip": "clip-eval", "judge": "judge", "identity": "identity",
          "unet": "unet"}


def load_trained(work: Path, name: str, partial: bool = False) -> nn.Module:
    """A finished stage's part from the pre-training folder ``work`` (``vae``, ``text_encoder``,
    ``eval_clip``, ``judge``, ``identity``, ``unet``); the VAE gets the scaling factor its stage measured.

    ``partial``: a stage that has not finished gives the EMA weights of its latest checkpoint
    (not the VAE, whose scaling factor is measured at the end).
    """
    stage = _FINAL[name]
    path = work / stage / "final" / f"{name}.safetensors"
    checkpoint = work / stage / "checkpoint.safetensors"
    use_checkpoint = not path.is_file() and partial and name != "vae" and checkpoint.is_file()
    if not path.is_file() and not use_checkpoint:
        raise FileNotFoundError(f"{path}: stage {stage} has not finished; run `mixofshow pretrain --stage {stage}`")
    if name == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        module = CLIPTextModel(CLIPTextConfig(**preset_config(PRESET, "text_encoder")))
    else:
        module = build(stage)
    if use_checkpoint:
        tensors, _ = load_safetensors(checkpoint)
        state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if name == "text_encoder":  # the CLIPModel's text tower
            state = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
        module.load_state_dict(state)
    elif name == "text_encoder":  # either layout: transformers 5's names, or text_model.* (4.x, pre-fix runs)
        tensors, _ = load_safetensors(path)
        module.load_state_dict({k.removeprefix("text_model."): v.float() for k, v in tensors.items()})
    else:
        load_part(path, module)
    if name == "vae":
        metrics = json.loads((work / "vae" / "metrics.json").read_text())
        module.register_to_config(scaling_factor=metrics["scaling_factor"])
    return module


def finals_sha256(work: Path, names: tuple[str, ...]) -> str:
    """``"vae=<sha256> text_encoder=<sha256>"``: which finished parts a later stage is built on."""
    from mixofshow.utils.io import file_sha256

    return " ".join(f"{n}={file_sha256(work / _FINAL[n] / 'final' / f'{n}.safetensors')}" for n in names)


def load_part(path: Path, module: nn.Module) -> nn.Module:
    tensors, _ = load_safetensors(path)
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return module
