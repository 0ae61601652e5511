"""``evaluate``: every score against a direct open_clip / timm computation on the same images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image

from mixofshow.cli import main
from mixofshow.concepts.io import ConceptFile, ConceptMeta, save_concept
from mixofshow.evaluate import ClipSpec, MissingWeightsError, evaluate
from mixofshow.evaluate.clip import TINY_CLIP_CONFIG, load_clip
from mixofshow.evaluate.prompts import class_text, concept_classes

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of <robot1> <robot2>", "<robot1> <robot2> on the beach"]


def _image(seed: int, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture
def samples(tmp_path) -> tuple[Path, Path]:
    """A sample folder as `mixofshow sample` writes it (index.json + PNGs) and reference images."""
    concept = tmp_path / "robot.safetensors"
    meta = ConceptMeta(base_model="embedded", rank=1, scale=1.0, words=["<robot1>", "<robot2>"], num_layers=2,
                       text_dim=4, class_words={"<robot1>": None, "<robot2>": "robot"})
    save_concept(concept, ConceptFile(meta, {w: torch.zeros(2, 4) for w in meta.words}, {}))
    folder, refs = tmp_path / "samples", tmp_path / "refs"
    folder.mkdir(), refs.mkdir()
    images = []
    for p, prompt in enumerate(PROMPTS):
        for seed in (0, 1):
            name = f"{p:03d}_x_{seed}.png"
            _image(10 * p + seed).save(folder / name)
            images.append({"file": name, "prompt": prompt, "seed": seed, "steps": 2})
    (folder / "index.json").write_text(json.dumps(
        {"format": "mixofshow.samples/1", "concept": str(concept), "base_model": "embedded", "images": images}))
    for k in range(3):
        _image(100 + k, 48).save(refs / f"ref_{k}.jpg")
    return folder, refs


def _direct_clip():
    """The tiny config's model built by open_clip itself, with the same seed."""
    import open_clip

    open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny_clip")
    return model.eval(), preprocess, open_clip.get_tokenizer("tiny_clip")


def _normed(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_class_words_replace_concept_runs(samples):
    folder, _ = samples
    classes = concept_classes(json.loads((folder / "index.json").read_text())["concept"])
    assert class_text("a photo of <robot1> <robot2> on the beach", classes) == "a photo of robot on the beach"
    assert class_text("<robot2>, smiling", classes) == "robot, smiling"
    with pytest.raises(ValueError, match="<cat1>"):
        class_text("a <cat1> on a sofa", classes)
    assert class_text("a <cat1> on a sofa", {"<cat1>": "cat"}) == "a cat on a sofa"


def test_scores_match_direct_open_clip(samples):
    folder, refs = samples
    report = evaluate(folder, refs, ClipSpec("tiny"), out=folder / "eval", device="cpu")
    model, preprocess, tokenizer = _direct_clip()
    index = json.loads((folder / "index.json").read_text())["images"]
    with torch.no_grad():
        img = _normed(model.encode_image(torch.stack([preprocess(Image.open(folder / e["file"]).convert("RGB"))
                                                      for e in index])))
        ref = _normed(model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB"))
                                                      for p in sorted(refs.iterdir())])))
        texts = ["A photo depicts " + e["prompt"].replace("<robot1> <robot2>", "robot") for e in index]
        txt = _normed(model.encode_text(tokenizer(texts)))
    t_cos = (img * txt).sum(-1)
    pairs = img @ ref.T
    assert report["clip"]["weights"].startswith("random") and "2.5 * max(cos, 0)" in report["clip"]["formula"]
    for i, row in enumerate(report["images"]):
        assert row["text"] == texts[i]
        assert row["clip_t_cos"] == pytest.approx(float(t_cos[i]), abs=1e-5)
        assert row["clip_t"] == pytest.approx(2.5 * max(float(t_cos[i]), 0.0), abs=1e-5)
        assert row["clip_i_cos"] == pytest.approx(float(pairs[i].mean()), abs=1e-5)
        assert row["clip_i"] == pytest.approx(float(pairs[i].clamp_min(0).mean()), abs=1e-5)
        assert row["dino"] is None
    overall = report["overall"]
    assert overall["clip_i"]["mean"] == pytest.approx(float(pairs.clamp_min(0).mean()), abs=1e-5)  # all pairs
    assert overall["clip_t_cos"]["std"] == pytest.approx(float(t_cos.std()), abs=1e-5)  # sample std
    first = report["prompts"][0]
    assert first["n"] == 2 and first["clip_t_cos"]["mean"] == pytest.approx(float(t_cos[:2].mean()), abs=1e-5)
    assert any("DINO skipped" in n for n in report["notes"])
    # the files hold the same numbers and name model, weights and scale
    assert json.loads((folder / "eval.json").read_text())["overall"] == overall
    rows = list(csv.DictReader((folder / "eval.csv").open()))
    assert rows[0]["level"] == "overall" and float(rows[0]["clip_t_mean"]) == pytest.approx(overall["clip_t"]["mean"], abs=1e-5)
    assert rows[0]["clip_weights"].startswith("random") and "2.5" in rows[0]["clip_scale"]
    assert [r["level"] for r in rows].count("image") == 4


def test_evaluate_reports_progress_and_can_be_cancelled(samples):
    from mixofshow.evaluate import Cancelled

    folder, refs = samples
    seen = []
    evaluate(folder, refs, ClipSpec("tiny"), device="cpu", progress=seen.append)
    assert seen[-1].phase == "done" and seen[-1].step == seen[-1].total == 4 + 3
    with pytest.raises(Cancelled):
        evaluate(folder, refs, ClipSpec("tiny"), device="cpu", should_stop=lambda: True)


def test_weights_file_is_loaded(tmp_path, samples):
    from safetensors.torch import save_file

    model, _, _ = _direct_clip()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # different from the seed-0 random weights
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    scorer = load_clip(ClipSpec("tiny", weights=str(path)), "cpu")
    assert scorer.info["weights_file"] == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(scorer.model.state_dict()[key], value)


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch, samples, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        load_clip(ClipSpec(cache_dir=str(tmp_path / "cache")), "cpu")
    msg = str(err.value)
    assert "ViT-B-32-quickgelu/openai" in msg and "open_clip_model.safetensors" in msg and "--clip-weights" in msg
    assert "ViT-B-32.pt" in msg  # the OpenAI file and where it goes
    # the CLI with its defaults: one line, exit 2 (no weights in the hub cache nor in ~/.cache/clip)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    folder, _ = samples
    assert main(["evaluate", str(folder)]) == 2
    assert "are not available" in capsys.readouterr().err


def test_cli_evaluate_writes_json_and_csv(samples, capsys):
    folder, refs = samples
    assert main(["evaluate", str(folder), "--reference-images", str(refs), "--clip", "tiny",
                 "--out", str(folder / "scores.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CLIP-T" in out and "random" in out
    assert (folder / "scores.json").is_file() and (folder / "scores.csv").is_file()
    assert main(["evaluate", str(folder / "missing"), "--clip", "tiny"]) == 2
    assert "index.json" in capsys.readouterr().err


def _tiny_vit():
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, embed_dim=64,
                             depth=1, num_heads=1).eval()


@pytest.mark.parametrize("layout", ["timm", "hub"])
def test_dino_matches_direct_timm(tmp_path, samples, layout):
    from torchvision import transforms

    folder, refs = samples
    vit = _tiny_vit()
    if layout == "timm":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    else:  # a DINO training checkpoint: teacher entry, DDP "module." prefix, projection head
        path = tmp_path / "dino.pth"
        state = {f"module.{k}": v for k, v in vit.state_dict().items()}
        state["module.head.mlp.0.weight"] = torch.zeros(2, 64)
        torch.save({"teacher": state}, path)
    report = evaluate(folder, refs, ClipSpec("tiny"), dino_weights=path, device="cpu")
    tf = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    index = json.loads((folder / "index.json").read_text())["images"]
    with torch.no_grad():
        img = _normed(vit(torch.stack([tf(Image.open(folder / e["file"]).convert("RGB")) for e in index])))
        ref = _normed(vit(torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(refs.iterdir())])))
    expected = (img @ ref.T).mean(-1)
    assert [r["dino"] for r in report["images"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert report["dino"]["weights"] == str(path) and not any("DINO" in n for n in report["notes"])


def test_identity_is_scored_on_toy_world_images_of_a_named_concept(samples):
    """The robot's own images score ~1 for the robot and ~0 for the cat; images of another model
    are skipped with a note; images whose prompt names no shipped concept get no score."""
    folder, refs = samples
    index = json.loads((folder / "index.json").read_text())
    robots = sorted((REPO / "datasets" / "concepts" / "robot" / "image").glob("*.jpg"))
    for entry, src in zip(index["images"], robots):  # 2 prompts x 2 seeds: the robot's images
        Image.open(src).convert("RGB").resize((64, 64), Image.Resampling.BOX).save(folder / entry["file"])
    skipped = evaluate(folder, refs, ClipSpec("tiny"), device="cpu")  # base_model: embedded
    assert skipped["overall"]["identity"]["n"] == 0 and any("identity skipped" in n for n in skipped["notes"])
    index["base_model"] = "toyworld"
    index["images"][-1]["prompt"] = "a photo of a robot"  # names no concept: no identity
    (folder / "index.json").write_text(json.dumps(index))
    report = evaluate(folder, refs, ClipSpec("tiny"), device="cpu", out=folder / "scores")
    scores = [row["identity"] for row in report["images"]]
    assert all(s > 0.9 for s in scores[:3]) and scores[3] is None
    assert report["overall"]["identity"]["n"] == 3
    as_cat = evaluate(folder, refs, ClipSpec("tiny"), device="cpu", identity="cat")
    assert all(row["identity"] < 0.1 for row in as_cat["images"])
    assert "identity_mean" in (folder / "scores.csv").read_text().splitlines()[0]
