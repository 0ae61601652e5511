"""Validation grids: one PNG per validation step, a row per LoRA scale, cells = the sampled images."""

from __future__ import annotations

import json

import pytest
from conftest import EMBEDDED, REPO
from PIL import Image

from mixofshow.sample.grid import image_grid, save_grid


def test_image_grid_places_every_image():
    a, b, c = (Image.new("RGB", (4, 3), colour) for colour in ("red", "green", "blue"))
    grid = image_grid([[a, b], [c]], pad=1, min_cell=1)
    assert grid.size == (2 * 4 + 3, 2 * 3 + 3)
    assert grid.getpixel((1, 1)) == (255, 0, 0) and grid.getpixel((6, 1)) == (0, 128, 0)
    assert grid.getpixel((1, 5)) == (0, 0, 255) and grid.getpixel((6, 5)) == (255, 255, 255)  # short row: blank
    with pytest.raises(ValueError, match="no images"):
        image_grid([[]])


def test_small_images_are_enlarged_by_a_whole_factor_pixels_as_squares():
    """64 x 64 toy-world samples are shown at 128 x 128 (nearest neighbour: what the model drew)."""
    image = Image.new("RGB", (64, 64), "white")
    image.putpixel((0, 0), (255, 0, 0))
    grid = image_grid([[image]], pad=0)
    assert grid.size == (128, 128)
    assert [grid.getpixel(xy) for xy in ((0, 0), (1, 1), (2, 2))] == [(255, 0, 0)] * 2 + [(255, 255, 255)]
    assert image_grid([[Image.new("RGB", (512, 512))]], pad=0).size == (512, 512)  # large: unchanged


def test_save_grid_writes_a_png(tmp_path):
    path = save_grid(tmp_path / "g" / "grid.png", [[Image.new("RGB", (2, 2), "white")]])
    assert Image.open(path).format == "PNG"


def test_validation_writes_a_grid_per_step(tmp_path):
    from mixofshow.train.config import load_train_config
    from mixofshow.train.loop import train

    config = load_train_config(REPO / "configs" / "example.yaml", {
        **EMBEDDED, "output_dir": str(tmp_path / "run"), "train.max_steps": 1, "train.batch_size": 1,
        "train.checkpoint_every": 0, "validation.every": 0, "validation.prompts": ["a photo of <robot1> <robot2>"],
        "validation.prompts_file": None, "validation.lora_scales": [0.0, 1.0], "validation.num_images": 2,
        "validation.steps": 1,
    })
    train(config)
    step = tmp_path / "run" / "samples" / "step_000001"
    rows = []
    for scale in ("scale_0", "scale_1"):
        index = json.loads((step / scale / "index.json").read_text())
        # the end-of-run samples name the concept file they were made with, and its base model
        assert index["concept"] == str(tmp_path / "run" / "robot.safetensors") and index["base_model"] == "embedded"
        files = [e["file"] for e in index["images"]]
        rows.append([Image.open(step / scale / f).convert("RGB") for f in files])
    assert [len(r) for r in rows] == [2, 2]
    from mixofshow.train.validation import validation_labels

    labels = validation_labels(config)
    assert labels == {"row_labels": ["LoRA 0", "LoRA 1"],
                      "col_labels": ["seed 0: a photo of <robot1> <robot2>", "seed 1: a photo of <robot1> <robot2>"]}
    grid = Image.open(step / "grid.png").convert("RGB")
    assert grid.tobytes() == image_grid(rows, **labels).tobytes()
    assert grid.width > image_grid(rows).width and grid.height > image_grid(rows).height  # room for the labels
