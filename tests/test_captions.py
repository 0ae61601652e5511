"""Captions: read and write NAME.txt atomically, the template captioner, the local-model captioner's refusals."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mixofshow.data.captions import CaptionError, model_captions, read_captions, template_captions, write_caption


@pytest.fixture
def images(tmp_path):
    paths = []
    for name in ("a", "b"):
        path = tmp_path / "image" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
        paths.append(path)
    return paths


def test_template_then_edit_then_read(images, tmp_path):
    captions = tmp_path / "caption"
    template_captions(images, captions, class_word="robot")
    assert read_captions(images, captions) == ["<TOK>, robot", "<TOK>, robot"]
    write_caption(images[1], captions, "  <TOK>,  waving \n on the beach ")
    assert read_captions(images, captions) == ["<TOK>, robot", "<TOK>, waving on the beach"]
    assert (captions / "b.txt").read_text() == "<TOK>, waving on the beach\n"
    template_captions(images[:1], captions)  # no class word: just the placeholder
    assert read_captions(images, captions)[0] == "<TOK>"
    with pytest.raises(CaptionError, match="b.png: an empty caption"):
        write_caption(images[1], captions, "   ")
    assert not list(captions.glob(".*tmp"))


def test_the_model_captioner_refuses_clearly_offline(images, tmp_path):
    with pytest.raises(CaptionError, match="no config.json there; point at a local BLIP or Florence-2"):
        model_captions(images, tmp_path / "caption", tmp_path / "no-model")
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CaptionError, match="model_type 'gpt2'; expected one of"):
        model_captions(images, tmp_path / "caption", folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "blip"}))  # a config, but no weights
    with pytest.raises(CaptionError, match="cannot be loaded offline"):
        model_captions(images, tmp_path / "caption", folder)


def test_list_overlay_and_remove_in_a_concept_folder(tmp_path):
    import numpy as np

    from mixofshow.data.edit import list_dataset, mask_overlay, remove_image

    folder = tmp_path / "c"
    for sub in ("image", "caption", "mask"):
        (folder / sub).mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (20, 10), (200, 50, 50)).save(folder / "image" / f"{name}.png")
    (folder / "caption" / "a.txt").write_text("<TOK>, red\n")
    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 255
    Image.fromarray(mask).save(folder / "mask" / "a.png")
    rows = list_dataset(folder)
    assert [(r.stem, r.caption, r.mask is not None) for r in rows] == [("a", "<TOK>, red", True), ("b", "", False)]
    shown = np.asarray(mask_overlay(rows[0].image, rows[0].mask))
    assert (shown[:, :8] == (200, 50, 50)).all() and (shown[:, 12:] != (200, 50, 50)).any()  # outside: dimmed
    assert np.asarray(mask_overlay(rows[1].image, None)).shape == (10, 20, 3)
    removed = remove_image(folder, "a")
    assert sorted(p.name for p in removed) == ["a.png", "a.png", "a.txt"] and [r.stem for r in list_dataset(folder)] == ["b"]
    with pytest.raises(ValueError, match="the last image"):
        remove_image(folder, "b")
    with pytest.raises(ValueError, match="no image named 'zzz'"):
        remove_image(folder, "zzz")
