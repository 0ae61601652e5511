"""Embedded model, the offline CLIP tokenizer, and base-model loading."""

from __future__ import annotations

import pytest
import torch

from mixofshow.models.embedded import build_embedded_pipeline
from mixofshow.models.loading import ModelLoadError, load_pipeline
from mixofshow.models.tokenizer import clip_bpe_tokenizer

SENTENCES = [
    "a photo of a cat, glasses, upper body",
    "Hello World!! it's 3.14 naïve café, <potter1> and   spaces",
    "A RENDERING of an astronaut riding a horse on mars 🚀",
    "",
]


def test_tokenizer_ids_equal_open_clip():
    from open_clip import tokenizer as oc

    ours = clip_bpe_tokenizer()
    reference = oc.SimpleTokenizer()
    for text in SENTENCES:
        ids = ours(text).input_ids
        expected = [reference.encoder["<start_of_text>"], *reference.encode(text), reference.encoder["<end_of_text>"]]
        assert ids == expected, text
    # and padded to 77 like SD's tokenizer, with <|endoftext|> as pad
    padded = ours(SENTENCES[0], padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_embedded_pipeline_is_deterministic_and_sd_shaped():
    a, b = build_embedded_pipeline(), build_embedded_pipeline()
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    assert type(a.unet).__name__ == "UNet2DConditionModel"
    assert type(a.vae).__name__ == "AutoencoderKL"
    assert type(a.text_encoder).__name__ == "CLIPTextModel"


def test_load_embedded_saved_as_folder(tmp_path):
    pipe = build_embedded_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    for (name, pa), pb in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert loaded.tokenizer(SENTENCES[0]).input_ids == pipe.tokenizer(SENTENCES[0]).input_ids
    x = torch.randn(1, 4, 32, 32)
    ctx = torch.randn(1, 77, 32)
    assert torch.allclose(pipe.unet(x, 3, ctx).sample, loaded.unet(x, 3, ctx).sample)


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load_pipeline("some-org/not-a-cached-model")


@pytest.mark.parametrize(
    ("name", "message"),
    [("./missing-folder", "no such file or folder"), ("model.ckpt", "no such file or folder")],
)
def test_missing_paths_give_clear_errors(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(name)


def test_pickled_and_non_pipeline_inputs_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="pickled checkpoints are not loaded"):
        load_pipeline(str(ckpt))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_check_base_model_refuses_what_cannot_load_without_loading(tmp_path, monkeypatch):
    from mixofshow.models.loading import ModelLoadError, check_base_model

    for fine in ("embedded", "toyworld"):
        check_base_model(fine)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    check_base_model(str(tmp_path / "pipe"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        check_base_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        check_base_model(str(tmp_path / "missing.safetensors"))
    (tmp_path / "old.ckpt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a .safetensors"):
        check_base_model(str(tmp_path / "old.ckpt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        check_base_model("nobody/no-such-model")
