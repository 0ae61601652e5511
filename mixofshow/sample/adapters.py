"""T2I-Adapter conditions (sketch, keypose, openpose images) through diffusers' ``T2IAdapter``.

Each condition is an adapter (a diffusers folder or hub id, or a loaded ``T2IAdapter`` /
``MultiAdapter``), a control image of the output's size, a global weight and optionally one
weight per region (Mix-of-Show's per-box adapter weights). The adapter's features are scaled by a
spatial weight map (the global weight, and inside the regions the mean of their weights), summed
over conditions, and handed to the UNet as ``down_intrablock_additional_residuals`` at every
step, for the unconditional and the conditional half of classifier-free guidance alike.

Public SD 1.x weights: ``TencentARC/t2iadapter_sketch_sd14v1`` (1-channel sketch),
``TencentARC/t2iadapter_openpose_sd14v1`` and ``TencentARC/t2iadapter_keypose_sd14v1``
(RGB pose renderings); see the README ("T2I-Adapter conditions").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Condition", "conditions_from_data", "load_t2i_adapter", "check_adapter", "adapter_residuals", "residuals_hook"]

_ADAPTERS: dict[tuple[str, str], Any] = {}  # (name, dtype) -> loaded adapter, shared within a process


@dataclass
class Condition:
    adapter: Any  # folder or hub id of a diffusers T2IAdapter, or a T2IAdapter / MultiAdapter
    image: Any  # path or PIL image, the output's size (a list of them for a MultiAdapter)
    weight: float = 1.0  # global weight (Mix-of-Show's adaptor weight)
    region_weights: list[float] | None = None  # one per region: the weight inside that region

    def label(self, index: int) -> str:
        name = self.adapter if isinstance(self.adapter, (str, Path)) else type(self.adapter).__name__
        return f"condition {index} ({name})"


def conditions_from_data(data: Any, where: str, base_dir: str | os.PathLike | None = None) -> list[Condition]:
    """Conditions from parsed YAML/JSON: a list of {adapter, image, weight, region_weights}."""
    if data in (None, []):
        return []
    if not isinstance(data, list):
        raise ValueError(f"{where}: conditions must be a list of {{adapter, image, weight, region_weights}}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "adapter" not in item or "image" not in item:
            raise ValueError(f"{where}: condition {i} needs 'adapter' and 'image', got {item!r}")
        unknown = sorted(set(item) - {"adapter", "image", "weight", "region_weights"})
        if unknown:
            raise ValueError(f"{where}: condition {i}: unknown key {unknown[0]!r}")
        image = Path(str(item["image"]))
        if base_dir is not None and not image.is_absolute():
            image = Path(base_dir) / image
        adapter = str(item["adapter"])
        if base_dir is not None and (Path(base_dir) / adapter).is_dir():
            adapter = str(Path(base_dir) / adapter)
        out.append(Condition(adapter, image, item.get("weight", 1.0), item.get("region_weights")))
    return out


def load_t2i_adapter(name: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A ``T2IAdapter`` from a local diffusers folder or a hub id (cached per process)."""
    if not isinstance(name, (str, Path)):
        return name
    key = (str(name), str(dtype))
    if key not in _ADAPTERS:
        from diffusers import T2IAdapter

        try:
            _ADAPTERS[key] = T2IAdapter.from_pretrained(str(name), torch_dtype=dtype).eval()
        except (OSError, ValueError, EnvironmentError) as err:
            raise ValueError(
                f"adapter {name}: cannot load a diffusers T2IAdapter from it ({str(err).splitlines()[0]}); "
                "give a local folder with config.json and the weights, or a hub id such as "
                "TencentARC/t2iadapter_sketch_sd14v1 that is in the Hugging Face cache"
            ) from None
    return _ADAPTERS[key]


def _members(adapter: Any) -> list[Any]:
    return list(adapter.adapters) if hasattr(adapter, "adapters") else [adapter]


def expected_residual_shapes(unet, height: int, width: int, vae_factor: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of the residual each UNet down block takes, for an image of height x width."""
    h, w = height // vae_factor, width // vae_factor
    shapes = []
    for block, channels in zip(unet.down_blocks, unet.config.block_out_channels):
        shapes.append((channels, h, w))
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    return shapes


def check_adapter(adapter: Any, unet, where: str) -> None:
    """Raise ``ValueError`` when the adapter's feature channels do not fit the UNet's down blocks."""
    want = list(unet.config.block_out_channels)
    for member in _members(adapter):
        config = getattr(member, "config", {})
        channels = list(config.get("channels", []))
        if channels != want[: len(channels)] or len(channels) != len(want):
            raise ValueError(
                f"{where}: the adapter's feature channels {channels} do not match the UNet's down blocks "
                f"{want} (an SD 1.x adapter needs an SD 1.x base model)"
            )


def _image_tensor(image: Any, channels: int, height: int, width: int, where: str) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: condition image {path} does not exist")
        with Image.open(path) as img:
            image = img.copy()
    if image.size != (width, height):
        raise ValueError(
            f"{where}: condition image is {image.size[0]} x {image.size[1]} (w x h), the output is {width} x {height}"
        )
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _weight_map(condition: Condition, maps: Callable | None, h: int, w: int, where: str) -> torch.Tensor | float:
    weight = float(condition.weight)
    if condition.region_weights is None:
        return weight
    m = maps(h, w) if maps is not None else torch.zeros(0, h, w)
    if len(condition.region_weights) != m.shape[0]:
        raise ValueError(f"{where}: {len(condition.region_weights)} region_weights for {m.shape[0]} regions")
    total = m.sum(0)
    local = torch.einsum("r,rhw->hw", torch.tensor(condition.region_weights, dtype=torch.float32), m)
    inside = total.clamp(max=1.0)
    return weight * (1 - inside) + inside * local / total.clamp(min=1e-12)


def adapter_residuals(
    conditions: Sequence[Condition],
    unet,
    height: int,
    width: int,
    vae_factor: int,
    maps: Callable | None = None,
) -> list[torch.Tensor]:
    """The summed, weighted adapter features: one (1, C, h, w) tensor per UNet down block."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    want = expected_residual_shapes(unet, height, width, vae_factor)
    total: list[torch.Tensor] | None = None
    for i, condition in enumerate(conditions):
        where = condition.label(i)
        adapter = load_t2i_adapter(condition.adapter, dtype)
        check_adapter(adapter, unet, where)
        adapter.to(device)
        images = condition.image if isinstance(condition.image, (list, tuple)) else [condition.image]
        members = _members(adapter)
        if len(images) != len(members):
            raise ValueError(f"{where}: {len(images)} images for {len(members)} adapters")
        for member, image in zip(members, images):
            x = _image_tensor(image, member.config["in_channels"], height, width, where)
            if height % member.downscale_factor or width % member.downscale_factor:
                raise ValueError(f"{where}: height and width must be multiples of {member.downscale_factor}")
            with torch.no_grad():
                feats = member(x.to(device, dtype))
            got = [tuple(f.shape[1:]) for f in feats]
            if got != want[: len(got)] or len(got) != len(want):
                raise ValueError(f"{where}: the adapter gives features {got}, the UNet's down blocks take {want}")
            weighted = []
            for f in feats:
                wmap = _weight_map(condition, maps, f.shape[2], f.shape[3], where)
                wmap = wmap.to(device, dtype)[None, None] if torch.is_tensor(wmap) else wmap
                weighted.append(f * wmap)
            total = weighted if total is None else [a + b for a, b in zip(total, weighted)]
    return total or []


@contextmanager
def residuals_hook(unet, residuals: Sequence[torch.Tensor], active: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Add ``residuals`` (batch 1, broadcast to the UNet batch) to every UNet call in the block."""
    def hook(module, args, kwargs):
        if not residuals or not active():
            return None
        batch = (args[0] if args else kwargs["sample"]).shape[0]
        # a fresh list every call: the UNet pops its entries
        kwargs["down_intrablock_additional_residuals"] = [r.expand(batch, -1, -1, -1) for r in residuals]
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
