"""The toy world: deterministic scenes, held-out looks and triples, ground truth, the stage loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mixofshow.toyworld import world
from mixofshow.toyworld.data import load_split, render_split
from mixofshow.toyworld.world import (
    CONCEPT_LOOKS,
    HELD_OUT_TRIPLES,
    attribute_variants,
    mirrored,
    sample_layout,
    scene,
)


def test_scenes_are_deterministic_and_seeded():
    a, sa = scene("train", 7, seed=0)
    b, sb = scene("train", 7, seed=0)
    c, _ = scene("train", 7, seed=1)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_concept_looks_and_held_out_triples_never_in_training_splits():
    rng = random.Random(0)
    seen_colours = {cls: set() for cls in world.CLASS_NAMES}
    for split in ("train", "val"):
        for _ in range(3000):
            background, objects = sample_layout(rng, split)
            for o in objects:
                assert CONCEPT_LOOKS.get(o.cls) != o.colour, (split, o)
                assert (o.cls, o.colour, background) not in HELD_OUT_TRIPLES, (split, o, background)
                seen_colours[o.cls].add(o.colour)
    for cls, colours in seen_colours.items():  # every other colour does occur for every class
        assert colours == set(world.allowed_colours(cls)), cls
    for _ in range(300):
        background, objects = sample_layout(rng, "test")
        assert (objects[0].cls, objects[0].colour, background) in HELD_OUT_TRIPLES
    assert len(HELD_OUT_TRIPLES) == 20


def test_ground_truth_boxes_and_captions_agree_with_the_pixels():
    for i in range(60):
        image, s = scene("val", i)
        assert s.caption.startswith("a photo of ")
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert o.cls in s.caption and o.colour in s.caption
            cx = (x0 + x1) / 2
            expected = {"left": (0, 30), "center": (22, 42), "right": (34, 64)}[o.position]
            assert expected[0] <= cx <= expected[1], (s, o)
        if len(s.objects) == 1:  # the object's body colour dominates its box more than elsewhere
            o = s.objects[0]
            x0, y0, x1, y1 = o.box
            target = np.array(world.COLOURS[o.colour], dtype=float)
            near = np.linalg.norm(image.astype(float) - target, axis=-1) < 40
            inside = near[y0:y1, x0:x1].mean()
            outside = (near.sum() - near[y0:y1, x0:x1].sum()) / (64 * 64 - (y1 - y0) * (x1 - x0))
            assert inside > outside, (s.caption, inside, outside)


def test_mirror_swaps_positions_and_boxes():
    image, s = scene("train", 3)
    m = mirrored(s, 64)
    for a, b in zip(s.objects, m.objects):
        assert {a.position, b.position} in ({"left", "right"}, {"center"})
        assert b.box[0] == 64 - a.box[2] and b.box[2] == 64 - a.box[0]
    assert mirrored(m, 64) == s


def test_attribute_variants_hold_the_true_caption_at_the_truth_index():
    for i in range(40):
        _, s = scene("test", i)
        if len(s.objects) != 1:
            continue
        for attr, (captions, truth) in attribute_variants(s).items():
            assert captions[truth] == s.caption, attr
            assert len(set(captions)) == len(captions)


def test_render_split_is_reused_and_loaded_without_pickles(tmp_path):
    render_split(tmp_path, "val", 12, seed=0)
    stamp = (tmp_path / "val.npy").stat().st_mtime_ns
    render_split(tmp_path, "val", 12, seed=0)
    assert (tmp_path / "val.npy").stat().st_mtime_ns == stamp
    split = load_split(tmp_path, "val")
    assert len(split) == 12 and np.array_equal(split.images[5], scene("val", 5)[0])
    x, scenes = split.batch(np.array([0, 1]), mirror=True)
    assert x.shape == (4, 3, 64, 64) and torch.equal(x[2], x[0].flip(-1))
    assert scenes[2] == mirrored(scenes[0], 64)


def test_stage_loop_resumes_exactly(tmp_path):
    from mixofshow.toyworld import model
    from mixofshow.toyworld.stage import StageConfig
    from mixofshow.toyworld.vae import train_vae

    render_split(tmp_path / "data", "train", 32, seed=0)
    render_split(tmp_path / "data", "val", 8, seed=0)
    train, val = load_split(tmp_path / "data", "train"), load_split(tmp_path / "data", "val")
    cfg = StageConfig(steps=4, batch=4, lr=1e-3, warmup=2, eval_every=2, checkpoint_every=2)
    straight = model.build("vae")
    m1 = train_vae(straight, train, val, tmp_path / "a", 0, cfg)
    first = model.build("vae")
    stopped = train_vae(first, train, val, tmp_path / "b", 0, cfg, max_minutes=1e-9)  # stops at step 1
    assert not stopped.get("done") and stopped["step"] == 1
    resumed = model.build("vae")
    m2 = train_vae(resumed, train, val, tmp_path / "b", 0, cfg)
    assert m2["done"] and [e["psnr_val"] for e in m2["evals"]] == [e["psnr_val"] for e in m1["evals"]]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    from mixofshow.toyworld.vae import scaling_factor

    assert scaling_factor(straight, train) == scaling_factor(resumed, train) > 0


def test_a_checkpoint_refuses_another_config_or_other_inputs(tmp_path):
    """A stage built on another VAE (or with other settings) must start again, not continue."""
    from torch import nn

    from mixofshow.toyworld.stage import StageConfig, run_stage

    module = nn.Linear(2, 1)
    cfg = StageConfig(steps=2, batch=1, lr=1e-3, warmup=1, eval_every=2, checkpoint_every=1)
    loss = lambda step: module(torch.ones(1, 2)).pow(2).sum()  # noqa: E731
    run_stage("t", tmp_path, module, cfg, loss, dict, max_minutes=1e-9, inputs="vae=aaa")  # stops at step 1
    with pytest.raises(ValueError, match=r"made with inputs vae=aaa, now vae=bbb"):
        run_stage("t", tmp_path, module, cfg, loss, dict, inputs="vae=bbb")
    with pytest.raises(ValueError, match=r"made with config .*\"steps\": 2.*now .*\"steps\": 3"):
        run_stage("t", tmp_path, module, StageConfig(**{**cfg.__dict__, "steps": 3}), loss, dict, inputs="vae=aaa")
    assert run_stage("t", tmp_path, module, cfg, loss, dict, inputs="vae=aaa")["done"]


def test_vae_shapes_are_generic_and_deterministic():
    """The VAE's generic half: any colour, reproducible, never a drawing of a shipped concept."""
    from mixofshow.toyworld.vae import shapes_batch

    a, b = shapes_batch("x", 8, seed=0), shapes_batch("x", 8, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, shapes_batch("x", 8, seed=1))
    assert a.shape == (8, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    colours = {tuple(px) for px in ((a + 1) * 127.5).round().permute(0, 2, 3, 1).reshape(-1, 3).int().tolist()}
    assert len(colours) > 1000  # far beyond the world's eight body colours and five backgrounds


def test_shipped_weights_are_checked_against_the_manifest(tmp_path):
    from mixofshow.models.pretrained import build_toyworld_pipeline

    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_toyworld_pipeline(folder=tmp_path)


def test_pretrain_rejects_bad_arguments(capsys):
    from mixofshow.cli import main

    assert main(["pretrain", "--max-minutes", "0"]) == 2
    assert "--max-minutes" in capsys.readouterr().err


def test_class_twins_differ_in_the_class_word_only_and_keep_the_held_out_rules():
    from mixofshow.toyworld.world import class_twin

    rng = random.Random(0)
    for i in range(200):
        _, s = scene("train", i)
        _, twin = class_twin(s, rng)
        a, b = s.objects[0], twin.objects[0]
        assert b.cls != a.cls and (b.colour, b.position, twin.background) == (a.colour, a.position, s.background)
        assert [o.cls for o in twin.objects[1:]] == [o.cls for o in s.objects[1:]]
        assert twin.caption == s.caption.replace(f" {a.cls}", f" {b.cls}")
        assert CONCEPT_LOOKS.get(b.cls) != b.colour and (b.cls, b.colour, twin.background) not in HELD_OUT_TRIPLES


def test_unet_latents_are_cached_for_the_same_vae_only(tmp_path):
    from mixofshow.toyworld import model
    from mixofshow.toyworld.unet import cached_latents

    render_split(tmp_path / "data", "train", 6, seed=0)
    train = load_split(tmp_path / "data", "train")
    vae, path = model.build("vae"), tmp_path / "latents.safetensors"
    first = cached_latents(vae, train, path)
    assert first.shape == (12, 4, 16, 16)  # the scenes, then their mirrors
    stamp = path.stat().st_mtime_ns
    assert torch.equal(cached_latents(vae, train, path), first) and path.stat().st_mtime_ns == stamp
    with torch.no_grad():
        next(vae.parameters()).add_(0.1)  # another VAE: encoded again
    assert not torch.equal(cached_latents(vae, train, path), first)
