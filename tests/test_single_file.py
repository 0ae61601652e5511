"""Single-file SD 1.x checkpoints (original LDM key names) load offline, train, and sample by their recorded name."""

from __future__ import annotations

import json

import pytest
import torch

from mixofshow.models.embedded import build_embedded_pipeline, build_preset_pipeline
from mixofshow.models.loading import ModelLoadError, load_pipeline
from mixofshow.utils.io import file_sha256
from mixofshow.models.single_file import config_folder, save_single_file, to_original_keys


@pytest.fixture(scope="module")
def embedded_file(tmp_path_factory):
    """The embedded model as one original-layout file, and a diffusers config folder for its architecture."""
    root = tmp_path_factory.mktemp("single")
    path = save_single_file(build_embedded_pipeline(), root / "tiny-sd.safetensors", torch.float32)
    return path, config_folder("embedded", root / "config")


def test_original_key_names(embedded_file):
    keys = set(to_original_keys(build_embedded_pipeline()))
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
                "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in keys, key
    assert not any(".resnets." in k or "down_blocks" in k or "to_q" in k and "first_stage" in k for k in keys)


def test_single_file_loads_offline_with_its_config_and_records_its_identity(embedded_file, monkeypatch):
    path, config = embedded_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(str(path), config=str(config))
    reference = build_embedded_pipeline()
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert pipe.config["_name_or_path"] == str(path.resolve())
    assert pipe.config["_mixofshow_sha256"] == file_sha256(path)


def test_a_file_that_does_not_fit_the_sd15_configs_names_the_cause(embedded_file, monkeypatch):
    path, _ = embedded_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(path))  # the tiny architecture read with SD 1.5's configs
    message = str(err.value)
    assert f"Cannot load base model {path}: The file is not a Stable Diffusion 1.x checkpoint that fits the SD 1.5 configs" in message
    assert "--base-model-config" in message and "PosixPath" not in message and "could not be read" not in message


def test_train_on_a_single_file_then_sample_by_the_recorded_name(embedded_file, tmp_path, monkeypatch, capsys):
    from conftest import EXAMPLE_TRAIN_CONFIG

    from mixofshow.cli import main
    from mixofshow.sample.load import adapter_metadata

    path, config = embedded_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), "--max-steps", "1",
                 "--set", f"base_model={path}", "--set", f"base_model_config={config}",
                 "--set", "validation.every=-1"]) == 0
    concept = run / "robot.safetensors"
    meta, _ = adapter_metadata(concept)
    extra = json.loads(meta["extra"])
    assert meta["base_model"] == str(path.resolve()) and meta["base_model"] != "unknown"
    assert extra["base_model_sha256"] == file_sha256(path) and extra["base_model_config"] == str(config)
    out = tmp_path / "samples"
    assert main(["sample", "--concept", str(concept), "--prompt", "a photo of <robot1> <robot2>", "--steps", "2",
                 "--height", "64", "--width", "64", "--output-dir", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.slow
def test_an_sd15_shaped_single_file_loads_offline_without_a_config(tmp_path, monkeypatch):
    """SD 1.5's architecture with random weights, written with the original key names (2 GB in fp16)."""
    pipe = build_preset_pipeline("sd15")
    path = save_single_file(pipe, tmp_path / "v1-5-random.safetensors")
    del pipe
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pipeline(str(path))  # no --base-model-config: the shipped SD 1.5 configs
    assert loaded.unet.config.cross_attention_dim == 768 and loaded.text_encoder.config.hidden_size == 768
    assert loaded.config["_name_or_path"] == str(path.resolve())
