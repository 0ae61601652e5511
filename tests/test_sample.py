"""Sampling with ED-LoRA concepts: files, PNG parameters, index, seeds, schedulers, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.io import save_concept
from mixofshow.concepts.lora import LoRALinear
from mixofshow.sample.load import load_adapter
from mixofshow.sample.pipeline import (
    SCHEDULERS,
    SampleConfig,
    check_inputs,
    default_resolution,
    generate,
    image_filename,
    read_png_parameters,
)

PROMPTS = ["a photo of <toy1> <toy2>", "<toy1> <toy2> on the beach"]
FAST = {"steps": 2, "height": 64, "width": 64}  # latents 8 x 8: small and quick


def make_toy_concept(path, factory) -> None:
    model = EDLoRA(factory(), ["<toy1>", "<toy2>"], init={"<toy2>": "toy"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.all_layers().values():
            layer.lora_down.copy_(torch.randn(layer.lora_down.shape, generator=gen) * 0.3)
            layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=gen) * 0.3)
    save_concept(path, model.to_concept_file(model.meta()))


@pytest.fixture(scope="module")
def concept_path(tmp_path_factory, embedded_pipeline_factory):
    path = tmp_path_factory.mktemp("concept") / "toy.safetensors"
    make_toy_concept(path, embedded_pipeline_factory)
    return path


@pytest.fixture(scope="module")
def loaded(concept_path, embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    adapter = load_adapter(pipe, concept_path)
    return pipe, adapter


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


def test_images_png_parameters_and_index(loaded, concept_path, tmp_path):
    pipe, adapter = loaded
    config = SampleConfig(
        PROMPTS, negative_prompt="blurry", num_images=2, seed=5, output_dir=tmp_path,
        concept=str(concept_path), base_model="embedded", batch_size=4, **FAST,
    )
    samples = generate(pipe, adapter.encoder, config, progress=False)
    assert len(samples) == 4
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = sorted(image_filename(i, p, s) for i, p in enumerate(PROMPTS) for s in (5, 6))
    assert names == expected and names[0] == "000_a-photo-of-toy1-toy2_5.png"
    for sample in samples:
        assert sample.image.size == (64, 64)
        params = read_png_parameters(sample.path)
        assert params == sample.params
        assert params["prompt"] == PROMPTS[params["prompt_index"]]
        assert params["seed"] == 5 + params["image_index"]
        assert params["negative_prompt"] == "blurry"
        assert (params["steps"], params["guidance_scale"], params["scheduler"]) == (2, 7.5, "dpm")
        assert params["lora_scale"] == 1.0
        assert params["concept"] == str(concept_path) and params["base_model"] == "embedded"
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["file"] for e in index["images"]] == [s.path.name for s in samples]
    assert index["images"][3]["seed"] == 6 and index["images"][3]["prompt"] == PROMPTS[1]
    assert index["concept"] == str(concept_path)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_seeds_do_not_depend_on_batch_size(loaded):
    pipe, adapter = loaded
    runs = [
        generate(pipe, adapter.encoder, SampleConfig(PROMPTS, num_images=2, batch_size=bs, **FAST), progress=False)
        for bs in (1, 3)  # batch 3 mixes the two prompts
    ]
    for a, b in zip(*runs):
        assert a.params == b.params
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 2  # equal up to float rounding in batched ops
    # and the seeds matter: image 0 and image 1 of a prompt differ
    assert np.abs(_pixels(runs[0][0]) - _pixels(runs[0][1])).mean() > 1


def test_lora_scale_changes_images_and_is_restored(loaded):
    pipe, adapter = loaded
    out = {
        s: generate(pipe, adapter.encoder, SampleConfig(PROMPTS[:1], lora_scale=s, **FAST), progress=False)[0]
        for s in (0.0, 1.0)
    }
    assert np.abs(_pixels(out[0.0]) - _pixels(out[1.0])).mean() > 1
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.multiplier == 1.0 for m in layers)  # load_adapter's multiplier is back


def test_default_resolution_is_the_models_native_size(loaded):
    from mixofshow.models.embedded import EMBEDDED_RESOLUTION

    assert default_resolution(loaded[0]) == (EMBEDDED_RESOLUTION, EMBEDDED_RESOLUTION)


def test_scheduler_choice(loaded):
    pipe, adapter = loaded
    before = pipe.scheduler
    images = {}
    for name in sorted(SCHEDULERS):
        config = SampleConfig(PROMPTS[:1], scheduler=name, guidance_scale=1.0, **FAST)
        [sample] = generate(pipe, adapter.encoder, config, progress=False)
        assert sample.params["scheduler"] == name
        assert pipe.scheduler is before  # restored
        images[name] = _pixels(sample)
    assert np.abs(images["dpm"] - images["ddim"]).max() > 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompts", []),
        ("prompts", ["ok", "  "]),
        ("num_images", 0),
        ("seed", -1),
        ("steps", 0),
        ("steps", 5000),
        ("guidance_scale", float("nan")),
        ("scheduler", "lms"),
        ("lora_scale", float("inf")),
        ("height", 30),
        ("batch_size", 0),
        ("negative_prompt", None),
    ],
)
def test_bad_inputs_name_the_argument(loaded, field, value):
    pipe, _ = loaded
    config = SampleConfig(["a photo"])
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        check_inputs(config, pipe)


def test_load_adapter_rejects_unknown_format_and_wrong_shapes(tmp_path, concept_path, embedded_pipeline_factory):
    from mixofshow.utils.io import load_safetensors, save_safetensors

    tensors, meta = load_safetensors(concept_path)
    odd = tmp_path / "odd.safetensors"
    save_safetensors(odd, tensors, {**meta, "format": "something/9"})
    with pytest.raises(ValueError, match="odd.safetensors.*something/9"):
        load_adapter(embedded_pipeline_factory(), odd)
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith(".lora_down"))
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, {**tensors, key: torch.zeros(4, 7)}, meta)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_adapter(embedded_pipeline_factory(), bad)


def test_load_adapter_warns_on_other_base_model_name(tmp_path, concept_path, embedded_pipeline_factory, caplog):
    from mixofshow.utils.io import load_safetensors, save_safetensors

    tensors, meta = load_safetensors(concept_path)
    other = tmp_path / "other.safetensors"
    save_safetensors(other, tensors, {**meta, "base_model": "some/finetune"})
    with caplog.at_level("WARNING"):
        adapter = load_adapter(embedded_pipeline_factory(), other)
    assert adapter.words == ["<toy1>", "<toy2>"]
    assert "some/finetune" in caplog.text


def test_load_adapter_dispatches_fused_models(tmp_path, concept_path, embedded_pipeline_factory):
    fuse_io = pytest.importorskip("mixofshow.fuse.io")
    from mixofshow.concepts.io import load_concept

    concept = load_concept(concept_path)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    shape = embedded_pipeline_factory().unet.get_submodule(key.partition(".")[2]).weight.shape
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1
    meta = fuse_io.FusedMeta(
        base_model="embedded:tiny-sd", num_layers=concept.meta.num_layers, text_dim=concept.meta.text_dim,
        words=concept.meta.words,
    )
    path = tmp_path / "fused.safetensors"
    fuse_io.save_fused(path, fuse_io.FusedFile(meta=meta, embeddings=concept.embeddings, deltas={key: delta}))
    pipe, base = embedded_pipeline_factory(), embedded_pipeline_factory()
    adapter = load_adapter(pipe, path, lora_scale=0.5)
    assert adapter.words == ["<toy1>", "<toy2>"]
    module = key.partition(".")[2]
    expected = base.unet.get_submodule(module).weight + 0.5 * delta
    assert torch.allclose(pipe.unet.get_submodule(module).weight, expected, atol=1e-6)
    [sample] = generate(pipe, adapter.encoder, SampleConfig(PROMPTS[:1], guidance_scale=1.0, **FAST), progress=False)
    assert sample.image.size == (64, 64)


def test_cli_sample(concept_path, tmp_path, capsys):
    from mixofshow.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of <toy1> <toy2>\n\n<toy1> <toy2> in the snow\n")
    out = tmp_path / "out"
    code = main([
        "sample", "--concept", str(concept_path), "--prompts", str(prompts), "--steps", "2",
        "--cfg", "1", "--seed", "3", "--output-dir", str(out), "--scheduler", "ddim",
        "--device", "cpu", "--no-progress", "--height", "64", "--width", "64",
    ])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "000_a-photo-of-toy1-toy2_3.png", "001_toy1-toy2-in-the-snow_3.png"
    ]
    index = json.loads((out / "index.json").read_text())
    assert index["base_model"] == "embedded:tiny-sd"  # from the concept's metadata
    assert index["images"][0]["width"] == 64
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--steps", "0"], "steps"),
        (["--prompt", "x", "--scheduler-typo"], None),
        ([], "prompt"),
    ],
)
def test_cli_sample_errors_exit_2(concept_path, tmp_path, capsys, extra, message):
    from mixofshow.cli import main

    argv = ["sample", "--concept", str(concept_path), "--output-dir", str(tmp_path), *extra]
    if message is None:  # argparse usage error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err and "Traceback" not in err


def test_cli_sample_missing_concept_exits_2(tmp_path, capsys):
    from mixofshow.cli import main

    assert main(["sample", "--concept", str(tmp_path / "nope.safetensors"), "--prompt", "x"]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_the_progress_bar_moves_every_denoising_step(loaded, monkeypatch):
    """A batch of 4 images over 3 steps: 3 moves of 4/3 image each, not one jump of 4 at the end."""
    import mixofshow.sample.pipeline as pipeline_module

    moves = []

    class Bar:
        def __init__(self, total, initial, **_):
            self.n = initial

        def update(self, value):
            moves.append(value)

        def refresh(self):
            moves.append(("at", self.n))

        def close(self):
            pass

    monkeypatch.setattr(pipeline_module, "tqdm", Bar)
    pipe, adapter = loaded
    config = SampleConfig(PROMPTS[:1], num_images=4, batch_size=4, **{**FAST, "steps": 3})
    generate(pipe, adapter.encoder, config, progress=True)
    assert moves == [pytest.approx(4 / 3)] * 3 + [("at", 4)]
