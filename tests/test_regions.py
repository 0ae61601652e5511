"""Regional sampling: the regional attention processor, its composition with the sampler, region input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from mixofshow.concepts.attention import LayerwiseAttnProcessor, cross_attention_layers
from mixofshow.concepts.regional_attention import RegionalAttnProcessor, RegionState, feature_size
from mixofshow.sample.denoise import BatchSettings, denoise_batch
from mixofshow.sample.load import load_base
from mixofshow.sample.pipeline import SampleConfig, check_inputs, generate
from mixofshow.sample.regions import (
    Region,
    check_regions,
    load_region_file,
    parse_region_string,
    region_maps,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64  # latents 8 x 8
LEFT, RIGHT = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)


@pytest.fixture(scope="module")
def base(embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_base(pipe).encoder


def _latents(pipe, encoder, prompt, regions=(), cfg=7.5, negative="", **kw):
    settings = BatchSettings(negative, regions, None, kw.pop("strength", 1.0), kw.pop("steps_range", (0.0, 1.0)))
    with torch.no_grad():
        return denoise_batch(pipe, encoder, [prompt, prompt], [3, 4], settings, 2, cfg, SIZE, SIZE,
                             output_type="latent", **kw)


# --- the processor alone -------------------------------------------------------------------------

def _attn():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    return attn.eval()


def test_overlapping_regions_average_and_outside_is_global():
    attn = _attn()
    hidden = torch.randn(2, 16, 8)  # latents 4 x 4
    glob, a, b = (torch.randn(2, 5, 6) for _ in range(3))
    # region a: columns 0..2, region b: columns 1..3; overlap in columns 1..2
    maps = lambda h, w: torch.stack([  # noqa: E731
        torch.zeros(h, w).index_fill_(1, torch.tensor([0, 1, 2]), 1.0),
        torch.zeros(h, w).index_fill_(1, torch.tensor([1, 2, 3]), 1.0),
    ])
    state = RegionState(torch.stack([a, b], 1), maps, (4, 4), 1.0)
    out = RegionalAttnProcessor(LayerwiseAttnProcessor(0, 1, AttnProcessor2_0()), state)(attn, hidden, glob)
    plain = AttnProcessor2_0()
    ref = {name: plain(attn, hidden, ctx).view(2, 4, 4, 8) for name, ctx in (("g", glob), ("a", a), ("b", b))}
    out = out.view(2, 4, 4, 8)
    torch.testing.assert_close(out[:, :, 0], ref["a"][:, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, 1:3], (ref["a"] + ref["b"])[:, :, 1:3] / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, 3], ref["b"][:, :, 3], atol=1e-6, rtol=0)
    # strength 0.5 inside: half global, half regions
    state.strength, state._cache = 0.5, {}
    half = RegionalAttnProcessor(LayerwiseAttnProcessor(0, 1, AttnProcessor2_0()), state)(attn, hidden, glob)
    torch.testing.assert_close(half.view(2, 4, 4, 8)[:, :, 0], (ref["a"] + ref["g"])[:, :, 0] / 2, atol=1e-6, rtol=0)


def test_outside_all_regions_is_the_global_output_and_inactive_is_plain():
    attn = _attn()
    hidden, glob, a = torch.randn(1, 16, 8), torch.randn(1, 5, 6), torch.randn(1, 5, 6)
    maps = lambda h, w: torch.zeros(1, h, w).index_fill_(1, torch.tensor([0]), 1.0)  # noqa: E731  (row 0)
    state = RegionState(a[:, None], maps, (4, 4), 1.0)
    proc = RegionalAttnProcessor(LayerwiseAttnProcessor(0, 1, AttnProcessor2_0()), state)
    plain = AttnProcessor2_0()(attn, hidden, glob)
    torch.testing.assert_close(proc(attn, hidden, glob)[:, 4:], plain[:, 4:], atol=1e-6, rtol=0)
    state.active = False
    assert torch.equal(proc(attn, hidden, glob), plain)


def test_layerwise_slices_for_global_and_region_contexts():
    attn = _attn()
    hidden = torch.randn(1, 16, 8)
    glob, region = torch.randn(1, 3 * 5, 6), torch.randn(1, 3 * 5, 6)  # 3 layers of 5 tokens
    full = lambda h, w: torch.ones(1, h, w)  # noqa: E731
    state = RegionState(region[:, None], full, (4, 4), 1.0)
    out = RegionalAttnProcessor(LayerwiseAttnProcessor(1, 3, AttnProcessor2_0()), state)(attn, hidden, glob)
    ref = AttnProcessor2_0()(attn, hidden, region[:, 5:10])  # layer 1 reads tokens 5..9 of the region
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_feature_size_rounds_up_like_the_unet():
    assert feature_size((9, 12), 9 * 12) == (9, 12)
    assert feature_size((9, 12), 5 * 6) == (5, 6)
    assert feature_size((9, 12), 3 * 3) == (3, 3)
    with pytest.raises(ValueError, match="7"):
        feature_size((9, 12), 7)


# --- the sampler ---------------------------------------------------------------------------------

def test_no_active_regions_equals_ordinary_sampling(base):
    pipe, enc = base
    plain = _latents(pipe, enc, "a lake")
    # regions given but applied in no step, and regions at strength 0: the ordinary sample
    off = _latents(pipe, enc, "a lake", [Region("a dog", box=LEFT)], steps_range=(0.0, 0.0))
    zero = _latents(pipe, enc, "a lake", [Region("a dog", box=LEFT)], strength=0.0)
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)
    assert (_latents(pipe, enc, "a lake", [Region("a dog", box=LEFT)]) - plain).abs().max() > 1e-3


def test_one_full_region_equals_ordinary_sampling_with_its_prompt(base):
    pipe, enc = base
    regional = _latents(pipe, enc, "a lake", [Region("a red dog", box=(0, 0, SIZE, SIZE))], negative="blurry")
    plain = _latents(pipe, enc, "a red dog", negative="blurry")
    other = _latents(pipe, enc, "a lake", negative="blurry")
    # tolerance: float32 rounding of the blend and the batched attention, amplified by CFG 7.5;
    # measured 1.5e-6 of the latents' scale (max |latent| ~ 46 with this model's random weights)
    assert (regional - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert (regional - other).abs().max() > 1e-3


def test_region_negative_prompt_drives_the_unconditional_half(base):
    pipe, enc = base
    own = _latents(pipe, enc, "a lake", [Region("a dog", "ugly", box=(0, 0, SIZE, SIZE))], negative="blurry")
    plain = _latents(pipe, enc, "a dog", negative="ugly")
    assert (own - plain).abs().max() <= 1e-5 * plain.abs().max()  # tolerance as above


def _first_cross_attention_output(pipe, enc, regions):
    name, module = cross_attention_layers(pipe.unet)[0]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        _latents(pipe, enc, "a lake", regions)
    finally:
        handle.remove()
    return seen[0]  # the first UNet call: the first denoising step


def test_changing_a_region_prompt_changes_only_inside_it(base):
    pipe, enc = base
    first = _first_cross_attention_output(pipe, enc, [Region("a dog", box=LEFT), Region("a tree", box=RIGHT)])
    second = _first_cross_attention_output(pipe, enc, [Region("a cat", box=LEFT), Region("a tree", box=RIGHT)])
    h = w = SIZE // pipe.vae_scale_factor
    inside = region_maps([Region("a", box=LEFT)], SIZE, SIZE)(h, w)[0].reshape(-1).bool()
    diff = (first - second).abs().amax(dim=(0, 2))  # per query pixel
    assert diff[~inside].max() <= 1e-6
    assert diff[inside].min() > 1e-4  # every pixel of the changed region sees the new prompt


def test_one_text_encoder_call_and_one_unet_call_per_step(base):
    pipe, enc = base
    calls = {"text": 0, "unet": 0}
    hooks = [
        pipe.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
        pipe.unet.register_forward_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1)),
    ]
    try:
        regions = [Region("a dog", "ugly", box=LEFT), Region("a cat", box=RIGHT)]
        config = SampleConfig(["a lake", "a sea", "a river"], num_images=2, steps=3, height=SIZE, width=SIZE,
                              regions=regions, batch_size=6, negative_prompt="blurry")
        assert len(generate(pipe, enc, config, progress=False)) == 6
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"text": 1, "unet": 3}
    # and the processors are back to the layer-wise ones
    assert all(isinstance(m.processor, LayerwiseAttnProcessor) for _, m in cross_attention_layers(pipe.unet))


def test_regions_with_a_concept_and_non_square_sizes(concept_loaded):
    pipe, adapter = concept_loaded
    regions = parse_region_string("[<toy1> <toy2>]-*-[]-*-[0, 0, 72, 48]|[a tree]-*-[ugly]-*-[0, 48, 72, 96]")
    config = SampleConfig(["<toy1> <toy2> in a park"], steps=2, height=72, width=96, regions=regions)
    [sample] = generate(pipe, adapter.encoder, config, progress=False)
    assert sample.image.size == (96, 72)
    assert sample.params["regions"][1] == {"prompt": "a tree", "negative_prompt": "ugly", "box": [0, 48, 72, 96]}
    assert sample.params["regions"][0]["negative_prompt"] == ""


@pytest.fixture(scope="module")
def concept_loaded(tmp_path_factory, embedded_pipeline_factory):
    from mixofshow.sample.load import load_adapter
    from tests.test_sample import make_toy_concept

    path = tmp_path_factory.mktemp("concept") / "toy.safetensors"
    make_toy_concept(path, embedded_pipeline_factory)
    pipe = embedded_pipeline_factory()
    return pipe, load_adapter(pipe, path)


# --- region input --------------------------------------------------------------------------------

def test_mixofshow_region_string():
    regions = parse_region_string("[<potter1> <potter2>, robe]-*-[blurry]-*-[14, 20, 512, 244]|[a cat]-*-[]-*-[]")
    assert regions[0] == Region("<potter1> <potter2>, robe", "blurry", (14.0, 20.0, 512.0, 244.0))
    assert regions[1].box is None and regions[1].negative_prompt == ""
    with pytest.raises(ValueError, match="region 0"):
        parse_region_string("a cat-*-[]-*-[0, 0, 1, 1]")


def test_region_file_yaml_and_json_pixels_and_fractions(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "r.yaml").write_text(
        "regions:\n  - {prompt: a dog, box: [0, 0, 32, 32]}\n  - {prompt: a cat, box: [0.5, 0.5, 1, 1], "
        "negative_prompt: ugly}\n  - {prompt: a hat, mask: m.png}\n"
    )
    regions, conditions = load_region_file(tmp_path / "r.yaml")
    assert conditions == [] and regions[2].mask == tmp_path / "m.png"
    maps = region_maps(regions, 64, 64)(8, 8)
    assert maps[0].sum() == 16 and maps[0, :4, :4].all()
    assert maps[1].sum() == 16 and maps[1, 4:, 4:].all()
    assert 0 < maps[2].sum() < 16 and maps[2].max() == 1.0  # area-averaged mask
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": "a dog", "box": [0, 0, 32, 32]}]))
    assert load_region_file(tmp_path / "r.json")[0] == regions[:1]


@pytest.mark.parametrize(
    "region, message",
    [
        (Region("a dog", box=(0, 0, 80, 32)), r"region 0 \('a dog'\).*outside the 64 x 64"),
        (Region("a dog", box=(32, 0, 10, 32)), r"region 0 \('a dog'\).*empty or inverted"),
        (Region("a dog", box=(0, 0, 0, 0)), r"empty or inverted"),
        (Region("  ", box=(0, 0, 1, 1)), r"region 0.*empty prompt"),
        (Region("a dog", box=(0, 0, 1)), r"not \[top, left, bottom, right\]"),
    ],
)
def test_bad_regions_name_the_region_and_value(region, message):
    with pytest.raises(ValueError, match=message):
        check_regions([region], 64, 64)


def test_bad_masks_name_the_region(tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "rgb.png")
    Image.new("L", (32, 64), 255).save(tmp_path / "small.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match=r"region 1 \('a cat'\).*rgb.png.*single-channel"):
        check_regions([Region("a dog"), Region("a cat", mask=tmp_path / "rgb.png")], 64, 64)
    with pytest.raises(ValueError, match=r"region 0.*small.png is 32 x 64.*64 x 64"):
        check_regions([Region("a dog", mask=tmp_path / "small.png")], 64, 64)
    with pytest.raises(ValueError, match="empty"):
        check_regions([Region("a dog", mask=tmp_path / "black.png")], 64, 64)


def test_sampler_checks_sizes_and_region_settings(base):
    pipe, _ = base
    for field, value, message in [
        ("height", 60, "multiple of 8"),
        ("region_strength", 1.5, "region_strength"),
        ("region_steps", (0.5, 0.2), "region_steps"),
    ]:
        config = SampleConfig(["a lake"], regions=[Region("a dog", box=LEFT)])
        setattr(config, field, value)
        with pytest.raises(ValueError, match=message):
            check_inputs(config, pipe)
    config = SampleConfig(["a lake"], height=64, width=64, regions=[Region("a dog", box=(0, 0, 64, 65))])
    with pytest.raises(ValueError, match=r"region 0 \('a dog'\)"):
        check_inputs(config, pipe)


def test_regions_with_a_fused_model(tmp_path, embedded_pipeline_factory):
    fuse_io = pytest.importorskip("mixofshow.fuse.io")
    from mixofshow.concepts.io import load_concept
    from mixofshow.sample.load import load_adapter
    from tests.test_sample import make_toy_concept

    make_toy_concept(tmp_path / "toy.safetensors", embedded_pipeline_factory)
    concept = load_concept(tmp_path / "toy.safetensors")
    meta = fuse_io.FusedMeta(base_model="embedded:tiny-sd", num_layers=concept.meta.num_layers,
                             text_dim=concept.meta.text_dim, words=concept.meta.words)
    path = tmp_path / "fused.safetensors"
    fuse_io.save_fused(path, fuse_io.FusedFile(meta=meta, embeddings=concept.embeddings, deltas={}))
    pipe = embedded_pipeline_factory()
    adapter = load_adapter(pipe, path)
    regions = [Region("<toy1> <toy2>", box=LEFT), Region("a tree", box=RIGHT)]
    config = SampleConfig(["<toy1> <toy2> by a tree"], steps=2, height=SIZE, width=SIZE, regions=regions)
    [sample] = generate(pipe, adapter.encoder, config, progress=False)
    [plain] = generate(pipe, adapter.encoder, SampleConfig(["<toy1> <toy2> by a tree"], steps=2, height=SIZE,
                                                          width=SIZE), progress=False)
    assert np.abs(np.asarray(sample.image, np.int16) - np.asarray(plain.image, np.int16)).mean() > 1


def test_config_accepts_json_ready_regions():
    config = SampleConfig(["a lake"], regions=[{"prompt": "a dog", "box": [0, 0, 1, 0.5]}])
    assert config.regions == [Region("a dog", box=(0.0, 0.0, 1.0, 0.5))]
