"""Batch sampling: prompt files, grids, index, resume after a kill, presets, long prompts, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mixofshow.sample.batch import PRESETS, load_prompt_file
from mixofshow.sample.files import read_png_parameters
from mixofshow.sample.load import load_base
from mixofshow.sample.pipeline import PromptSpec, SampleConfig, generate, iter_samples
from mixofshow.sample.regions import Region

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"steps": 2, "height": 64, "width": 64, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def base(embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    return pipe, load_base(pipe).encoder


def _unet_calls(pipe):
    calls = []
    return calls, pipe.unet.register_forward_hook(lambda *a: calls.append(1))


def test_yaml_prompt_file_entries(tmp_path):
    (tmp_path / "regions.yaml").write_text("- {prompt: a dog, box: [0, 0, 1, 0.5]}\n")
    (tmp_path / "p.yaml").write_text(
        "- a lake\n"
        "- prompt: a sea\n  negative_prompt: blurry\n  seeds: [7, 9]\n  regions: regions.yaml\n"
        "- prompt: a hill\n  count: 3\n  regions: '[a cat]-*-[]-*-[0, 0, 32, 32]'\n"
        "- prompt: a road\n  conditions: [{adapter: x/y, image: pose.png, weight: 0.5}]\n"
    )
    entries = load_prompt_file(tmp_path / "p.yaml")
    assert entries[0] == "a lake"
    assert entries[1].seeds == [7, 9] and entries[1].negative_prompt == "blurry"
    assert entries[1].regions == [Region("a dog", box=(0.0, 0.0, 1.0, 0.5))]
    assert entries[2].num_images == 3 and entries[2].regions[0].prompt == "a cat"
    assert entries[3].conditions[0].image == tmp_path / "pose.png" and entries[3].conditions[0].weight == 0.5
    (tmp_path / "bad.yaml").write_text("- prompt: a sea\n  seed: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: entry 0: unknown key 'seed'"):
        load_prompt_file(tmp_path / "bad.yaml")
    (tmp_path / "plain.txt").write_text("# c\na lake\n\na sea\n")
    assert load_prompt_file(tmp_path / "plain.txt") == ["a lake", "a sea"]


def test_every_image_grids_index_and_resume(base, tmp_path):
    pipe, enc = base
    prompts = ["a lake", PromptSpec("a sea", negative_prompt="blurry", seeds=[7, 9]),
               PromptSpec("a hill", num_images=3, regions=[Region("a dog", box=(0, 0, 1, 0.5))])]
    config = SampleConfig(prompts, num_images=2, seed=1, output_dir=tmp_path, grids=True, batch_size=2, **FAST)
    # a run killed after 3 of 7 images: what it wrote stays, and the index lists exactly those
    run = iter_samples(pipe, enc, config, progress=False)
    first = [next(run) for _ in range(3)]
    run.close()
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["file"] for e in index["images"]] == [s.path.name for s in first[:2]]  # the finished batch
    calls, hook = _unet_calls(pipe)
    try:
        samples = generate(pipe, enc, config, progress=False)
    finally:
        hook.remove()
    assert len(samples) == 7
    assert len(calls) == 3 * 2  # left: [sea 9], [hill 1, 2], [hill 3]; 2 steps each
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "mixofshow.samples/1" and index["base_model"] == "embedded:tiny-sd"
    files = [e["file"] for e in index["images"]]
    assert files == sorted(files) and len(files) == 7
    seeds = {(e["prompt"], e["seed"]) for e in index["images"]}
    assert seeds == {("a lake", 1), ("a lake", 2), ("a sea", 7), ("a sea", 9), ("a hill", 1), ("a hill", 2), ("a hill", 3)}
    for entry in index["images"]:
        assert {"file", "prompt", "seed", "negative_prompt", "steps", "guidance_scale", "scheduler"} <= set(entry)
        assert read_png_parameters(tmp_path / entry["file"])["seed"] == entry["seed"]
    hill = next(e for e in index["images"] if e["prompt"] == "a hill")
    assert hill["regions"][0]["prompt"] == "a dog" and hill["negative_prompt"] == ""
    assert [g["file"] for g in index["grids"]] == ["grids/000_a-lake.png", "grids/001_a-sea.png", "grids/002_a-hill.png"]
    with Image.open(tmp_path / "grids/002_a-hill.png") as grid:  # 3 images: 2 x 2 sheet
        assert grid.size == (2 * 64 + 2, 2 * 64 + 2)
    # a third run finds everything on disk and makes nothing
    calls, hook = _unet_calls(pipe)
    try:
        again = generate(pipe, enc, config, progress=False)
    finally:
        hook.remove()
    assert not calls and [s.params for s in again] == [s.params for s in sorted(samples, key=lambda s: s.path.name)]
    # changed settings make the image again
    calls, hook = _unet_calls(pipe)
    try:
        generate(pipe, enc, SampleConfig(["a lake"], num_images=1, seed=1, output_dir=tmp_path, **{**FAST, "steps": 1}), progress=False)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_progress_bar_counts_images(base, tmp_path, capsys):
    pipe, enc = base
    generate(pipe, enc, SampleConfig(["a lake"], num_images=2, batch_size=1, **FAST), progress=True)
    err = capsys.readouterr().err
    assert "2.0/2" in err and ("img/s" in err or "s/img" in err)  # fractions of an image: one decimal


def test_long_prompt_warns_and_index_records_what_the_model_read(base, tmp_path, caplog):
    pipe, enc = base
    long = "a photo of a lake" + " with many small boats" * 30
    with caplog.at_level(logging.WARNING):
        [sample] = generate(pipe, enc, SampleConfig([long], output_dir=tmp_path, **FAST), progress=False)
    tokens = len(pipe.tokenizer(long, verbose=False).input_ids)
    assert tokens > 77
    assert f"{tokens} tokens" in caplog.text and "77" in caplog.text
    entry = json.loads((tmp_path / "index.json").read_text())["images"][0]
    assert entry["full_prompt"] == long and entry["prompt"] != long
    assert long.startswith(entry["prompt"]) and len(pipe.tokenizer(entry["prompt"]).input_ids) == 77
    assert sample.params["prompt"] == entry["prompt"]


def test_truncation_keeps_concept_words(tmp_path, embedded_pipeline_factory):
    from mixofshow.sample.load import load_adapter
    from tests.test_sample import make_toy_concept

    path = tmp_path / "toy.safetensors"
    make_toy_concept(path, embedded_pipeline_factory)
    adapter = load_adapter(embedded_pipeline_factory(), path)
    long = "<toy1> <toy2> " + "very " * 100
    tokens, text = adapter.encoder.window(long)
    assert tokens == 2 + 2 + 100 and text.startswith("<toy1> <toy2> very") and text.count("very") == 73
    assert adapter.encoder.window("<toy1> <toy2> on a beach") == (7, "<toy1> <toy2> on a beach")


def test_eval_preset_is_mixofshows_protocol():
    assert PRESETS["mixofshow-eval"] == {"scheduler": "ddim", "steps": 50, "guidance_scale": 7.5, "num_images": 50}


def test_cli_base_model_regions_and_preset(tmp_path, capsys):
    from mixofshow.cli import main

    (tmp_path / "r.json").write_text(json.dumps({"regions": [
        {"prompt": "a dog", "box": [0, 0, 64, 32]}, {"prompt": "a cat", "negative_prompt": "ugly", "box": [0, 32, 64, 64]},
    ]}))
    out = tmp_path / "out"
    argv = ["sample", "--base-model", "embedded", "--prompt", "a lake", "--regions", str(tmp_path / "r.json"),
            "--preset", "mixofshow-eval", "--num-images", "2", "--steps", "2", "--height", "64", "--width", "64",
            "--output-dir", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    entry = index["images"][1]
    assert (entry["scheduler"], entry["guidance_scale"], entry["steps"], entry["seed"]) == ("ddim", 7.5, 2, 1)
    assert entry["regions"][1]["negative_prompt"] == "ugly" and index["concept"] is None
    assert (out / "grids" / "000_a-lake.png").is_file()
    string = "[a dog]-*-[]-*-[0, 0, 64, 32]|[a cat]-*-[ugly]-*-[0, 32, 64, 64]"
    assert main([*argv[:6], string, *argv[7:], "--output-dir", str(tmp_path / "out2")]) == 0
    again = json.loads((tmp_path / "out2" / "index.json").read_text())["images"][1]
    assert again["regions"] == entry["regions"]
    a, b = (np.asarray(Image.open(d / entry["file"])) for d in (out, tmp_path / "out2"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--regions", "[a dog]-*-[]-*-[0, 0, 64, 100]"], r"region 0 \('a dog'\).*outside"),
        (["--regions", "[ ]-*-[]-*-[0, 0, 64, 32]"], r"region 0.*empty prompt"),
        (["--regions", "missing.yaml"], "missing.yaml"),
        (["--height", "60"], "multiple of 8"),
        (["--condition", "x/y"], "ADAPTER IMAGE"),
        ([], None),
    ],
)
def test_cli_bad_input_exit_2(tmp_path, capsys, extra, message):
    from mixofshow.cli import main

    argv = ["sample", "--prompt", "a lake", "--height", "64", "--width", "64", "--output-dir", str(tmp_path), *extra]
    if message is None:  # neither --concept nor --base-model
        message = "--base-model"
    else:
        argv += ["--base-model", "embedded"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert torch.get_num_threads() >= 1


def test_a_changed_concept_file_makes_the_images_again(base, tmp_path):
    pipe, enc = base
    concept = tmp_path / "concept.safetensors"  # provenance only here: its bytes are hashed
    concept.write_bytes(b"first")
    config = SampleConfig(["a lake"], output_dir=tmp_path / "out", concept=str(concept), **FAST)
    [first] = generate(pipe, enc, config, progress=False)
    assert len(first.params["concept_sha256"]) == 64
    concept.write_bytes(b"retrained")
    calls, hook = _unet_calls(pipe)
    try:
        generate(pipe, enc, config, progress=False)
    finally:
        hook.remove()
    assert len(calls) == FAST["steps"]
