"""DINO image similarity (DreamBooth's subject-fidelity metric: ViT-S/16 DINO, cosine of CLS features).

The weights come from a local file only (they cannot be downloaded here): timm's layout
(``vit_small_patch16_224.dino``, ``model.safetensors``) or the torch-hub / DINO release layout
(``dino_deitsmall16_pretrain.pth``; also a DINO training checkpoint's ``teacher`` entry). Both
name the tensors like timm's ``VisionTransformer``; the width, depth and patch size are read off
the tensors (heads = width / 64, as every DINO ViT), so a small ViT in the same layout works too.
Preprocessing follows DINO's evaluation: resize 256 (bicubic), centre crop 224, ImageNet mean/std.
The score is the raw cosine (DreamBooth reports it unscaled).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["DinoScorer", "load_dino"]

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "backbone.")


def _read_state(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickles with code, corrupt files: many exception types
            raise ValueError(f"--dino-weights {path}: not a readable weights file ({err})") from None
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--dino-weights {path}: expected a state dict, got {type(state).__name__}")
    clean = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("head"):
            clean[key] = value
    return clean


class DinoScorer:
    def __init__(self, model, transform, info: dict[str, Any], device) -> None:
        self.model, self.transform, self.info, self.device = model, transform, info, device

    def image_features(self, images) -> Any:
        import torch

        with torch.no_grad():
            batch = torch.stack([self.transform(img.convert("RGB")) for img in images]).to(self.device)
            feats = self.model(batch).float()
        return feats / feats.norm(dim=-1, keepdim=True)


def load_dino(path: str | Path, device: str = "cpu") -> DinoScorer:
    """A DINO ViT from a local weights file (timm or torch-hub layout); errors name the file."""
    import timm
    from torchvision import transforms

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--dino-weights {path}: file not found (download "
            "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth "
            "or timm's vit_small_patch16_224.dino model.safetensors)"
        )
    state = _read_state(path)
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        tokens = state["pos_embed"].shape[1]
    except KeyError as err:
        raise ValueError(f"--dino-weights {path}: not a ViT checkpoint in timm/DINO layout (no {err.args[0]!r})") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    side = round((tokens - 1) ** 0.5) * patch
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=side, patch_size=patch,
        embed_dim=width, depth=depth, num_heads=max(1, width // 64),
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"--dino-weights {path}: tensors do not fit a ViT (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    transform = transforms.Compose([
        transforms.Resize(round(side * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(side),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    standard = (width, depth, patch, side) == (384, 12, 16, 224)
    info = {
        "model": "ViT-S/16 DINO" if standard else f"ViT (width {width}, depth {depth}, patch {patch}, {side} px)",
        "weights": str(path),
        "scale": "raw cosine of CLS features",
    }
    return DinoScorer(model.to(device).eval(), transform, info, device)
