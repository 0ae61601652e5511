"""Concept datasets: shipped examples, transforms, seeding, validation errors, example script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixofshow.data import (
    ConceptDataError,
    ConceptDataset,
    ConceptSource,
    collate,
    load_concept_list,
    load_prompt_list,
    pad_to_square,
    replace_tokens,
    shuffle_caption_tags,
)

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"
SCRIPT = ROOT / "scripts" / "make_example_datasets.py"
EXAMPLES = ("robot", "cat", "cactus")
MAPPING = {"<TOK>": "<a1> <a2>"}


def make_concept(
    root: Path,
    n: int = 2,
    size: tuple[int, int] = (32, 32),
    caption: str | None = "<TOK>, red, small",
    masks: bool = True,
) -> ConceptSource:
    """A tiny concept folder: n PNG images of random colours, captions and full masks."""
    rng = np.random.default_rng(0)
    (root / "image").mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "image" / f"img{i}.png")
        if caption is not None:
            (root / "caption").mkdir(exist_ok=True)
            (root / "caption" / f"img{i}.txt").write_text(caption + "\nsecond line ignored\n")
        if masks:
            (root / "mask").mkdir(exist_ok=True)
            Image.new("L", size, 255).save(root / "mask" / f"img{i}.png")
    return ConceptSource(
        "<TOK>",
        root / "image",
        root / "caption" if caption is not None else None,
        root / "mask" if masks else None,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- shipped examples


@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_examples_load(name: str) -> None:
    words = f"<{name}1> <{name}2>"
    ds = ConceptDataset(DATASETS / "concepts" / f"{name}.json", {"<TOK>": words}, resolution=64)
    assert len(ds) == 8
    for i in range(len(ds)):
        s = ds.get(i, gen(i))
        assert s["pixel_values"].shape == (3, 64, 64) and s["pixel_values"].dtype == torch.float32
        assert s["mask"].shape == (1, 64, 64) and s["mask"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
        assert 0.0 <= s["mask"].min() and s["mask"].max() <= 1.0
        assert 0.02 < s["mask"].mean() < 0.95  # real subject masks, neither empty nor full
        assert words in s["prompt"] and "<TOK>" not in s["prompt"]
        assert Path(s["path"]).is_file()
    prompts = load_prompt_list(DATASETS / "prompts" / f"{name}.txt")
    assert 6 <= len(prompts) <= 10 and all(words in p for p in prompts)
    assert all(not p.startswith("#") for p in prompts)


def test_shipped_examples_are_small_and_multi_prompts_load() -> None:
    total = sum(p.stat().st_size for p in DATASETS.rglob("*") if p.is_file())
    assert total < 1_000_000
    assert len(load_prompt_list(DATASETS / "prompts" / "multi.txt")) >= 3


# ----------------------------------------------------------------------------- transforms


def test_padding_gets_mask_zero(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1, size=(40, 80))  # portrait, full white mask
    ds = ConceptDataset([src], MAPPING, resolution=32, crop_p=0.0, flip_p=0.0)
    for seed in range(5):
        s = ds.get(0, gen(seed))
        mask, pix = s["mask"][0], s["pixel_values"]
        cols = mask.sum(0) > 0
        assert cols.sum() == 16  # 40x80 fitted into 32: 16 columns wide, placed at random
        assert torch.all(mask[:, cols] == 1.0) and torch.all(mask[:, ~cols] == 0.0)
        assert torch.all(pix[:, :, ~cols] == -1.0)


def test_no_mask_is_ones_inside_and_zero_on_padding(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1, size=(80, 40), masks=False)  # landscape, no mask
    s = ConceptDataset([src], MAPPING, resolution=32, crop_p=0.0).get(0, gen(0))
    rows = s["mask"][0].sum(1) > 0
    assert rows.sum() == 16 and torch.all(s["mask"][0, rows] == 1.0)
    assert torch.all(s["mask"][0, ~rows] == 0.0)


def test_an_all_black_mask_is_an_error_naming_it_unless_masks_are_off(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1)
    Image.new("L", (32, 32), 0).save(src.mask_dir / "img0.png")  # type: ignore[operator]
    for cache in (True, False):  # decoded at construction, or at first use
        with pytest.raises(ConceptDataError, match=r"mask .*img0\.png is all black .*data\.use_masks"):
            ConceptDataset([src], MAPPING, 16, cache_images=cache).get(0, gen(0))
    no_masks = ConceptDataset([src], MAPPING, 16, use_masks=False)
    assert torch.all(no_masks.get(0, gen(0))["mask"] == 1)


def test_full_crop_fills_the_canvas() -> None:
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    pix, mask = pad_to_square(image, None, 16, gen(0), crop_p=1.0, flip_p=0.0)
    # crop_p=1 draws a window between square and full; any window fits, so mask > 0 somewhere
    assert mask.sum() >= 16 * 8 and torch.allclose(pix[0][mask[0] > 0], torch.tensor(1.0))


def test_scale_range_shrinks_square_images() -> None:
    image = Image.new("RGB", (32, 32), (0, 255, 0))
    _, mask = pad_to_square(image, None, 32, gen(0), scale_range=(0.5, 0.5))
    assert mask.sum() == 16 * 16


# ----------------------------------------------------------------------------- seeding


def test_same_seed_same_sample_and_global_rng_untouched(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=2, size=(48, 24), caption="<TOK>, a, b, c, d")
    ds = ConceptDataset([src], MAPPING, resolution=16, crop_p=1.0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = ds.get(1, gen(7)), ds.get(1, gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
    assert a["prompt"] == b["prompt"]


def test_different_seeds_differ(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1, size=(48, 24), caption="<TOK>, a, b, c, d")
    ds = ConceptDataset([src], MAPPING, resolution=16, crop_p=1.0)
    samples = [ds.get(0, gen(seed)) for seed in range(12)]
    assert len({s["pixel_values"].numpy().tobytes() for s in samples}) > 6  # crops, placements
    assert len({s["prompt"] for s in samples}) > 6  # templates, tag orders
    # flips alone: a square image is only ever itself or its mirror image
    square = ConceptDataset([make_concept(tmp_path / "sq", n=1)], MAPPING, resolution=32)
    views = [square.get(0, gen(seed))["pixel_values"] for seed in range(12)]
    assert len({v.numpy().tobytes() for v in views}) == 2
    assert any(torch.equal(views[0].flip(-1), v) for v in views[1:])


def test_getitem_uses_global_rng(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1, size=(48, 24), caption="<TOK>, a, b, c")
    ds = ConceptDataset([src], MAPPING, resolution=16, crop_p=1.0)
    torch.manual_seed(3)
    a = ds[0]
    torch.manual_seed(3)
    b = ds[0]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["prompt"] == b["prompt"]


# ----------------------------------------------------------------------------- prompts


def test_replace_mapping_and_templates(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", caption="<TOK>, red, small")
    ds = ConceptDataset([src], {"<TOK>": "<potter1> <potter2>"}, 16, templates=["a photo of a {}"])
    prompt = ds.get(0, gen(0))["prompt"]
    assert prompt.startswith("a photo of a <potter1> <potter2>, ") and "<TOK>" not in prompt
    as_is = ConceptDataset([src], MAPPING, 16, templates=None, shuffle_tags=False)
    assert as_is.get(0, gen(0))["prompt"] == "<a1> <a2>, red, small"
    mixed = ConceptDataset([src], MAPPING, 16, templates=[None, "{} art"], shuffle_tags=False)
    assert {mixed.get(0, gen(s))["prompt"] for s in range(20)} == {
        "<a1> <a2>, red, small", "<a1> <a2>, red, small art"}
    assert replace_tokens("<A> and <AB>", {"<A>": "<AB>", "<AB>": "x"}) == "<AB> and x"


def test_without_captions_the_caption_is_the_instance_prompt(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", caption=None)
    ds = ConceptDataset([src], MAPPING, 16, templates=None)
    assert ds.get(0, gen(0))["prompt"] == "<a1> <a2>"


def test_tag_shuffle_keeps_the_first_tag(tmp_path: Path) -> None:
    caption = "<TOK>, a, b, c, d, e"
    seen = {shuffle_caption_tags(caption, gen(s)) for s in range(20)}
    assert len(seen) > 5
    for s in seen:
        tags = s.split(", ")
        assert tags[0] == "<TOK>" and sorted(tags[1:]) == ["a", "b", "c", "d", "e"]
    src = make_concept(tmp_path / "c", caption=caption)
    fixed = ConceptDataset([src], MAPPING, 16, templates=None, shuffle_tags=False)
    assert {fixed.get(0, gen(s))["prompt"] for s in range(5)} == {"<a1> <a2>, a, b, c, d, e"}


def test_load_prompt_list(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("# comment\n\n a photo of <a1> <a2> \n  # indented comment\nsecond # kept\n")
    assert load_prompt_list(path) == ["a photo of <a1> <a2>", "second # kept"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConceptDataError, match="empty.txt"):
        load_prompt_list(tmp_path / "empty.txt")
    with pytest.raises(ConceptDataError, match="missing.txt"):
        load_prompt_list(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- dataset mechanics


def test_concept_list_relative_paths_repeats_and_collate(tmp_path: Path) -> None:
    make_concept(tmp_path / "c", n=3)
    entry = {"instance_prompt": "<TOK>", "instance_data_dir": "c/image", "caption_dir": "c/caption",
             "mask_dir": None}
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    [src] = load_concept_list(tmp_path / "list.json")
    assert src.instance_data_dir == tmp_path / "c" / "image" and src.mask_dir is None
    ds = ConceptDataset(tmp_path / "list.json", MAPPING, 16, repeats=4)
    assert len(ds) == 12 and ds.get(10, gen(0))["path"] == ds.get(1, gen(0))["path"]
    with pytest.raises(IndexError):
        ds.get(12)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["mask"].shape == (5, 1, 16, 16)
    assert len(batch["prompt"]) == 5 and len(batch["path"]) == 5


# ----------------------------------------------------------------------------- errors


def _break(kind: str, root: Path) -> tuple[list[ConceptSource], dict[str, str], str]:
    """Build a broken concept; returns (sources, mapping, text the error must contain)."""
    src = make_concept(root, n=2)
    mapping = dict(MAPPING)
    if kind == "missing image folder":
        return [ConceptSource("<TOK>", root / "nope")], mapping, "nope"
    if kind == "missing caption folder":
        return [ConceptSource("<TOK>", src.instance_data_dir, root / "caps")], mapping, "caps"
    if kind == "no images":
        for p in src.instance_data_dir.iterdir():
            p.unlink()
        (src.instance_data_dir / "notes.txt").write_text("x")
        return [src], mapping, "image"
    if kind == "image without caption":
        (root / "caption" / "img1.txt").unlink()
        return [src], mapping, "img1.txt"
    if kind == "image without mask":
        (root / "mask" / "img1.png").unlink()
        return [src], mapping, "img1.png"
    if kind == "mask size":
        Image.new("L", (31, 32), 255).save(root / "mask" / "img1.png")
        return [src], mapping, "img1.png"
    if kind == "corrupt image":
        (root / "image" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        return [src], mapping, "img1.png"
    if kind == "corrupt mask":
        (root / "mask" / "img0.png").write_bytes(b"garbage")
        return [src], mapping, "img0.png"
    if kind == "caption without token":
        (root / "caption" / "img1.txt").write_text("a red thing, small\n")
        return [src], mapping, "img1.txt"
    if kind == "empty caption":
        (root / "caption" / "img0.txt").write_text("\n\n")
        return [src], mapping, "img0.txt"
    if kind == "token missing from mapping":
        return [src], {"<OTHER>": "<b1> <b2>"}, "<TOK>"
    if kind == "unknown placeholder in caption":
        (root / "caption" / "img1.txt").write_text("<TOK>, with <dog>\n")
        return [src], mapping, "img1.txt"
    if kind == "caption without image":  # the image was lost: training would use 1 of 2
        (root / "image" / "img1.png").unlink()
        return [src], mapping, f"caption {root / 'caption' / 'img1.txt'} has no image: expected {root / 'image' / 'img1'}"
    if kind == "mask without image":
        src = ConceptSource("<TOK>", src.instance_data_dir, None, src.mask_dir)
        (root / "image" / "img0.png").unlink()
        return [src], mapping, f"mask {root / 'mask' / 'img0.png'} has no image: expected {root / 'image' / 'img0'}"
    if kind == "duplicate stem":
        Image.new("RGB", (32, 32)).save(root / "image" / "img0.jpg")
        return [src], mapping, "img0"
    raise AssertionError(kind)


ERROR_KINDS = [
    "missing image folder", "missing caption folder", "no images", "image without caption",
    "image without mask", "mask size", "corrupt image", "corrupt mask", "caption without token",
    "empty caption", "token missing from mapping", "unknown placeholder in caption",
    "duplicate stem", "caption without image", "mask without image",
]


def test_hidden_files_and_other_suffixes_beside_captions_are_not_orphans(tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=2)
    (tmp_path / "c" / "caption" / ".DS_Store").write_text("x")
    (tmp_path / "c" / "caption" / "notes.md").write_text("x")
    assert len(ConceptDataset([src], MAPPING, resolution=16)) == 2


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_broken_concepts_raise_naming_the_file(kind: str, tmp_path: Path) -> None:
    sources, mapping, needle = _break(kind, tmp_path / "c")
    with pytest.raises(ConceptDataError) as info:
        ConceptDataset(sources, mapping, resolution=16)
    assert needle in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"instance_prompt": "<TOK>"}]', "instance_data_dir"),
        ('[{"instance_prompt": "<TOK>", "instance_data_dir": "x", "captions": "y"}]', "captions"),
        ('[{"instance_prompt": "", "instance_data_dir": "x"}]', "instance_prompt"),
    ],
)
def test_bad_concept_lists(content: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(content)
    with pytest.raises(ConceptDataError, match="list.json") as info:
        load_concept_list(path)
    assert needle in str(info.value)
    with pytest.raises(ConceptDataError, match="absent.json"):
        load_concept_list(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"resolution": 0}, "resolution"),
        ({"flip_p": 1.5}, "flip_p"),
        ({"repeats": 0}, "repeats"),
        ({"templates": ["no placeholder"]}, "template"),
        ({"replace_mapping": {}}, "replace_mapping"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
    ],
)
def test_bad_arguments(kwargs: dict, needle: str, tmp_path: Path) -> None:
    src = make_concept(tmp_path / "c", n=1)
    args = {"replace_mapping": MAPPING, "resolution": 16} | kwargs
    with pytest.raises(ConceptDataError, match=needle):
        ConceptDataset([src], **args)


# ----------------------------------------------------------------------------- example script


def _run_script(out: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_script_is_deterministic_and_matches_shipped_files(tmp_path: Path) -> None:
    _run_script(tmp_path / "a")
    _run_script(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) > 3 * 8 * 3
    shipped = _files(DATASETS)
    assert set(shipped) == set(a), "datasets/ is stale: rerun scripts/make_example_datasets.py"
    for name, data in a.items():
        if name.endswith((".txt", ".json", ".md")):
            assert shipped[name] == data, name
        elif name.endswith(".png"):  # compare decoded masks: PNG bytes depend on the zlib build
            fresh = np.asarray(Image.open(tmp_path / "a" / name))
            assert np.array_equal(fresh, np.asarray(Image.open(DATASETS / name))), name
