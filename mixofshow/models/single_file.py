"""Stable Diffusion 1.x single-file checkpoints (the original LDM key names), offline.

Most users hold SD 1.5 as one ``.safetensors`` file in the original layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), as
A1111, ComfyUI and kohya's scripts read and write it. diffusers reads such a file with
``from_single_file``, but needs the architecture's configs, which it fetches from the hub unless
``config`` names a local diffusers folder. :func:`config_folder` writes one from the configs that
ship in ``mixofshow/models/<preset>/`` (SD 1.5's by default, with the CLIP tokenizer built offline),
so a single file loads with no network.

:func:`save_single_file` writes a pipeline in that original layout (the inverse of diffusers'
conversion, written from the two layouts' documented module names), for the tools that want one
file; it also makes the test files of the loading path.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from mixofshow.models.embedded import preset_config
from mixofshow.models.tokenizer import clip_bpe_tokenizer
from mixofshow.utils.io import save_safetensors

__all__ = ["config_folder", "save_single_file", "to_original_keys"]

_UNET, _VAE, _TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def config_folder(preset: str = "sd15", root: str | Path | None = None) -> Path:
    """A diffusers config folder (``model_index.json``, component configs, tokenizer) for ``preset``."""
    folder = Path(root or tempfile.mkdtemp(prefix=f"mixofshow-{preset}-config-"))
    parts = {"unet": ("UNet2DConditionModel", "config.json"), "vae": ("AutoencoderKL", "config.json"),
             "text_encoder": ("CLIPTextModel", "config.json"),
             "scheduler": ("PNDMScheduler", "scheduler_config.json")}
    index = {"_class_name": "StableDiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    for part, (cls, filename) in parts.items():
        cfg = dict(preset_config(preset, part), _class_name=cls)
        if part == "text_encoder":
            cfg.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / filename).write_text(json.dumps(cfg, indent=1))
        index[part] = ["transformers" if part == "text_encoder" else "diffusers", cls]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    clip_bpe_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


def _unet_key(key: str, layers: int, attention_up: list[bool]) -> str:
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for ours, theirs in fixed.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    if head in ("down_blocks", "up_blocks", "mid_block"):
        if head == "mid_block":
            kind, j, tail = rest[0], int(rest[1]), rest[2:]
            slot = {"resnets": 2 * j, "attentions": 1}[kind]
            prefix = f"middle_block.{slot}"
        else:
            i, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
            if head == "down_blocks":
                block = 1 + i * (layers + 1) + j
                prefix = {"resnets": f"input_blocks.{block}.0", "attentions": f"input_blocks.{block}.1",
                          "downsamplers": f"input_blocks.{(i + 1) * (layers + 1)}.0.op"}[kind]
                if kind == "downsamplers":
                    tail = tail[1:]  # downsamplers.0.conv.weight -> ...op.weight
            else:
                block = i * (layers + 1) + j  # an up block has layers + 1 resnets
                last = i * (layers + 1) + layers
                prefix = {"resnets": f"output_blocks.{block}.0", "attentions": f"output_blocks.{block}.1",
                          "upsamplers": f"output_blocks.{last}.{2 if attention_up[i] else 1}"}[kind]
        name = ".".join(tail)
        if kind == "resnets":
            for ours, theirs in _RESNET_UNET.items():
                if name.startswith(ours + "."):
                    name = theirs + name[len(ours):]
        return f"{prefix}.{name}"
    raise KeyError(f"unet key {key!r} has no original name")


def _vae_key(key: str, blocks: int) -> str:
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    for ours, theirs in (("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
                         ("mid_block.resnets.1.", "mid.block_2."), ("mid_block.attentions.0.", "mid.attn_1.")):
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
    for group in ("down_blocks", "up_blocks"):
        if rest.startswith(group + "."):
            _, i, tail = rest.split(".", 2)
            index = int(i) if group == "down_blocks" else blocks - 1 - int(i)
            where = "down" if group == "down_blocks" else "up"
            tail = tail.replace("resnets.", "block.", 1).replace("downsamplers.0.", "downsample.", 1)
            tail = tail.replace("upsamplers.0.", "upsample.", 1)
            rest = f"{where}.{index}.{tail}"
    rest = rest.replace("conv_shortcut.", "nin_shortcut.")
    if ".attn_1." in rest:
        for ours, theirs in _VAE_ATTN.items():
            rest = rest.replace(f".attn_1.{ours}.", f".attn_1.{theirs}.")
    return f"{side}.{rest}"


def to_original_keys(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under the original SD 1.x key names."""
    unet_cfg = pipe.unet.config
    attention_up = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    out = {}
    for key, value in pipe.unet.state_dict().items():
        out[_UNET + _unet_key(key, unet_cfg.layers_per_block, attention_up)] = value
    blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name = _vae_key(key, blocks)
        if ".attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[_VAE + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out[_TEXT + key.removeprefix("text_model.")] = value
    return out


def save_single_file(pipe, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``pipe`` as one original-layout SD 1.x ``.safetensors`` file (atomically)."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_original_keys(pipe).items()}
    save_safetensors(path, tensors)
    return Path(path)
