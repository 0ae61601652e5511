"""T2I-Adapter conditions: a tiny adapter built from a config, residuals, weight maps, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import T2IAdapter
from PIL import Image

from mixofshow.sample.adapters import Condition, adapter_residuals, expected_residual_shapes
from mixofshow.sample.denoise import BatchSettings, denoise_batch
from mixofshow.sample.load import load_base
from mixofshow.sample.regions import Region, region_maps

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def tiny_adapter(channels=(32, 64), in_channels=3) -> T2IAdapter:
    """An SD-shaped full adapter as wide as the embedded UNet's down blocks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = T2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=1, downscale_factor=8)
    return adapter.eval()


@pytest.fixture(scope="module")
def base(embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_base(pipe).encoder


@pytest.fixture
def pose(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "pose.png"
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def _latents(pipe, enc, conditions, regions=()):
    settings = BatchSettings("", regions, conditions)
    with torch.no_grad():
        return denoise_batch(pipe, enc, ["a person"], [1], settings, 2, 7.5, SIZE, SIZE, output_type="latent")


def test_residual_shapes_follow_the_unet(base, pose):
    pipe, _ = base
    residuals = adapter_residuals([Condition(tiny_adapter(), pose)], pipe.unet, SIZE, SIZE, 8)
    assert [tuple(r.shape[1:]) for r in residuals] == expected_residual_shapes(pipe.unet, SIZE, SIZE, 8)
    assert expected_residual_shapes(pipe.unet, 72, 96, 8) == [(32, 9, 12), (64, 5, 6)]


def test_condition_changes_the_sample_and_weight_zero_does_not(base, pose):
    pipe, enc = base
    plain = _latents(pipe, enc, None)
    adapter = tiny_adapter()
    conditioned = _latents(pipe, enc, [Condition(adapter, pose, weight=1.0)])
    off = _latents(pipe, enc, [Condition(adapter, pose, weight=0.0)])
    assert (conditioned - plain).abs().max() > 1e-3
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)


def test_per_region_weights_make_a_spatial_map(base, pose):
    pipe, _ = base
    adapter = tiny_adapter()
    regions = [Region("a", box=(0, 0, 1, 0.5))]
    maps = region_maps(regions, SIZE, SIZE)
    full = adapter_residuals([Condition(adapter, pose, 1.0)], pipe.unet, SIZE, SIZE, 8)
    local = adapter_residuals([Condition(adapter, pose, 1.0, region_weights=[0.25])], pipe.unet, SIZE, SIZE, 8, maps)
    w = full[0].shape[-1]
    torch.testing.assert_close(local[0][..., : w // 2], 0.25 * full[0][..., : w // 2])  # inside the box
    torch.testing.assert_close(local[0][..., w // 2 :], full[0][..., w // 2 :])  # outside: the global weight


def test_several_conditions_sum(base, pose, tmp_path):
    pipe, _ = base
    sketch = tmp_path / "sketch.png"
    Image.new("L", (SIZE, SIZE), 128).save(sketch)
    a, b = tiny_adapter(), tiny_adapter(in_channels=1)
    both = adapter_residuals([Condition(a, pose, 0.5), Condition(b, sketch, 2.0)], pipe.unet, SIZE, SIZE, 8)
    ra = adapter_residuals([Condition(a, pose, 0.5)], pipe.unet, SIZE, SIZE, 8)
    rb = adapter_residuals([Condition(b, sketch, 2.0)], pipe.unet, SIZE, SIZE, 8)
    for x, y, z in zip(both, ra, rb):
        torch.testing.assert_close(x, y + z)


def test_adapter_from_a_local_folder(base, pose, tmp_path):
    pipe, _ = base
    folder = tmp_path / "t2iadapter_tiny"
    tiny_adapter().save_pretrained(folder)
    [r0, _] = adapter_residuals([Condition(str(folder), pose)], pipe.unet, SIZE, SIZE, 8)
    [e0, _] = adapter_residuals([Condition(tiny_adapter(), pose)], pipe.unet, SIZE, SIZE, 8)
    torch.testing.assert_close(r0, e0)
    with pytest.raises(ValueError, match="cannot load a diffusers T2IAdapter"):
        adapter_residuals([Condition(str(tmp_path / "missing"), pose)], pipe.unet, SIZE, SIZE, 8)


def test_bad_conditions_are_clear_errors(base, pose, tmp_path):
    pipe, _ = base
    with pytest.raises(ValueError, match=r"condition 0.*channels \[16, 32\].*\[32, 64\]"):
        adapter_residuals([Condition(tiny_adapter((16, 32)), pose)], pipe.unet, SIZE, SIZE, 8)
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 64)).save(small)
    with pytest.raises(ValueError, match=r"condition 0.*32 x 64.*output is 64 x 64"):
        adapter_residuals([Condition(tiny_adapter(), small)], pipe.unet, SIZE, SIZE, 8)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        adapter_residuals([Condition(tiny_adapter(), tmp_path / "nope.png")], pipe.unet, SIZE, SIZE, 8)
    with pytest.raises(ValueError, match="2 region_weights for 1 regions"):
        adapter_residuals([Condition(tiny_adapter(), pose, region_weights=[1, 2])], pipe.unet, SIZE, SIZE, 8,
                          region_maps([Region("a")], SIZE, SIZE))


def test_multi_adapter_members_each_get_their_image(base, pose, tmp_path):
    from diffusers import MultiAdapter

    pipe, _ = base
    other = tmp_path / "other.png"
    Image.new("RGB", (SIZE, SIZE), (200, 10, 10)).save(other)
    a, b = tiny_adapter(), tiny_adapter()
    multi = adapter_residuals([Condition(MultiAdapter([a, b]), [pose, other], 0.5)], pipe.unet, SIZE, SIZE, 8)
    ra = adapter_residuals([Condition(a, pose, 0.5)], pipe.unet, SIZE, SIZE, 8)
    rb = adapter_residuals([Condition(b, other, 0.5)], pipe.unet, SIZE, SIZE, 8)
    for x, y, z in zip(multi, ra, rb):
        torch.testing.assert_close(x, y + z)
