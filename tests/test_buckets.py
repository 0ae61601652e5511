"""Aspect-ratio bucketing: bucket sizes, assignment, seeded batch plans, the dataset and a training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mixofshow.data import ConceptDataset, ConceptSource
from mixofshow.data.buckets import batches_per_epoch, bucket_sizes, epoch_batches, nearest_bucket


def test_bucket_sizes_fit_the_area_and_the_step():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 2
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios)
    with pytest.raises(ValueError, match="smaller than the bucket step"):
        bucket_sizes(32, 64)


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    sizes = bucket_sizes(512, 64)
    for w, h in ((1000, 1000), (600, 1200), (1920, 1080), (800, 600)):
        chosen = sizes[nearest_bucket(w, h, sizes)]
        best = min(abs(math.log(a / b) - math.log(w / h)) for a, b in sizes)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == best


def test_epoch_plans_are_seeded_one_bucket_per_batch_and_cover_every_image():
    bucket_of = [0, 0, 0, 1, 1, 2, 0, 1]
    plan = epoch_batches(bucket_of, 2, torch.Generator().manual_seed(3))
    assert plan == epoch_batches(bucket_of, 2, torch.Generator().manual_seed(3))
    assert plan != epoch_batches(bucket_of, 2, torch.Generator().manual_seed(4))
    assert len(plan) == batches_per_epoch(bucket_of, 2) == 2 + 2 + 1
    for batch in plan:
        assert len(batch) == 2 and len({bucket_of[i] for i in batch}) == 1
    assert {i for batch in plan for i in batch} == set(range(len(bucket_of)))


def _concept(root, sizes):
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "image" / f"im{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        Image.fromarray(mask).save(root / "mask" / f"im{i}.png")
    return ConceptSource("<TOK>", root / "image", None, root / "mask")


def test_a_bucketed_dataset_resizes_without_crop_or_padding(tmp_path):
    sizes = bucket_sizes(64, 16)
    ds = ConceptDataset([_concept(tmp_path / "c", [(60, 120), (120, 60), (80, 80)])], {"<TOK>": "<a1> <a2>"}, 64,
                        buckets=sizes, flip_p=0.0)
    shapes = [tuple(ds.get(i, torch.Generator().manual_seed(0))["pixel_values"].shape) for i in range(3)]
    assert sizes == [(48, 80), (64, 64), (80, 48)]
    assert shapes == [(3, 80, 48), (3, 48, 80), (3, 64, 64)]  # (c, h, w): portrait, landscape, square
    sample = ds.get(0, torch.Generator().manual_seed(0))
    assert torch.allclose(sample["pixel_values"], torch.full_like(sample["pixel_values"], 120 / 127.5 - 1), atol=1e-2)
    inside = sample["mask"][0, 22:58, 14:34]  # the mask's middle half, resized with the image
    assert sample["mask"].shape == (1, 80, 48) and inside.min() > 0.99 and sample["mask"][0, :16].max() < 0.01
    assert ds.bucket_of() == [0, 2, 1]


def test_training_with_buckets_batches_one_shape_per_step_from_a_seeded_plan(tmp_path, small_train_config):
    from mixofshow.train.build import build_run
    from mixofshow.train.build import make_accelerator
    from mixofshow.train.loop import train

    _concept(tmp_path / "c", [(60, 120), (64, 128), (120, 60), (128, 64)])
    concept_list = tmp_path / "concepts.json"
    concept_list.write_text('[{"instance_prompt": "<TOK>", "instance_data_dir": "c/image", "mask_dir": "c/mask"}]')
    config = small_train_config(tmp_path, **{"data.concept_list": str(concept_list), "data.buckets": True,
                                              "data.resolution": 64, "train.batch_size": 2, "train.max_steps": 3})
    setup = build_run(config, make_accelerator(config))
    shapes = [tuple(setup.micro_batch(step, 0)["pixel_values"].shape) for step in range(4)]
    assert sorted(set(shapes)) == [(2, 3, 48, 80), (2, 3, 80, 48)]  # a landscape pair, a portrait pair
    again = [tuple(setup.micro_batch(step, 0)["pixel_values"].shape) for step in range(4)]
    assert again == shapes  # a pure function of (seed, step): a resume draws the same batches
    assert train(config).finished
