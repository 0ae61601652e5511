"""The shipped examples run as the README says: the demo, and training the three example concepts then fusing them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import EXAMPLE_TRAIN_CONFIG, REPO
from PIL import Image

from mixofshow.cli import main

FAST = ["--max-steps", "1", "--set", "validation.every=-1", "--set", "train.checkpoint_every=0"]


def _check_fused(root) -> None:
    from mixofshow.fuse.io import load_fused

    fused = load_fused(root / "runs" / "fused" / "example.safetensors")
    words = " ".join(c["prompt"] for c in fused.meta.concepts)
    assert words == "<robot1> <robot2> <cat1> <cat2> <cactus1> <cactus2>"


def test_fusion_example_configs_fit_together():
    """What the slow end-to-end tests run, checked cheaply: the fusion config reads exactly the
    files the three training configs write, of one base model, with distinct words."""
    from mixofshow.fuse.config import FuseConfig
    from mixofshow.train.config import load_train_config
    from mixofshow.utils.config import from_dict, load_yaml

    trains = [load_train_config(REPO / "configs" / f"{n}.yaml") for n in ("example", "cat", "cactus")]
    fuse = from_dict(FuseConfig, load_yaml(REPO / "configs" / "fuse_example.yaml"), "fuse_example.yaml")
    assert [c.file for c in fuse.concepts] == [f"{t.output_dir}/{t.name}.safetensors" for t in trains]
    assert [t.name for t in trains] == ["robot", "cat", "cactus"]
    assert {t.base_model for t in trains} == {"toyworld"} and {t.data.resolution for t in trains} == {64}
    words = [w for t in trains for w in t.concept.words]
    assert len(set(words)) == len(words) == 6
    for t in trains:
        assert Path(t.data.concept_list).is_file() and len(t.validation.prompts) == 4
        assert all(" ".join(t.concept.words) in p for p in t.validation.prompts)
        assert t.name in t.data.concept_list and set(t.data.replace_mapping.values()) == {" ".join(t.concept.words)}
    script = (REPO / "scripts" / "fuse_examples.sh").read_text()
    assert "for config in example cat cactus" in script and "configs/fuse_example.yaml" in script
    readme = (REPO / "README.md").read_text()
    for line in ("mixofshow train configs/example.yaml", "mixofshow train configs/cat.yaml",
                 "mixofshow train configs/cactus.yaml", "mixofshow fuse configs/fuse_example.yaml"):
        assert line in readme


@pytest.mark.slow
def test_readme_fusion_example_trains_three_concepts_then_fuses(tmp_path, monkeypatch):
    """The commands of the README's fusion section, from another folder, with 1 step each."""
    monkeypatch.chdir(tmp_path)
    for name in ("example", "cat", "cactus"):
        assert main(["train", str(REPO / "configs" / f"{name}.yaml"), *FAST]) == 0
    for name in ("robot", "cat", "cactus"):
        assert (tmp_path / "runs" / name / f"{name}.safetensors").is_file()
    assert main(["fuse", str(REPO / "configs" / "fuse_example.yaml"), "--no-progress"]) == 0
    _check_fused(tmp_path)


@pytest.mark.slow
def test_fuse_examples_script_runs_from_a_fresh_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "fuse_examples.sh"), *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_fused(tmp_path)
    assert "runs/fused/example.safetensors" in result.stdout


def test_demo_never_replaces_a_run_it_did_not_make(tmp_path, capsys):
    run = tmp_path / "mine"
    assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), "--max-steps", "1",
                 "--set", "validation.every=-1"]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["demo", "--max-steps", "1", "--output-dir", str(run)]) == 2
    assert "holds a training run the demo did not make" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


@pytest.mark.slow
def test_demo_writes_samples_in_the_training_layout(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--max-steps", "1", "--output-dir", str(out)]) == 0
    assert main(["demo", "--max-steps", "1", "--output-dir", str(out)]) == 0  # its own run: replaced
    step = out / "samples" / "step_000001"
    assert f"{step}/scale_0" in capsys.readouterr().out
    cells = []
    for scale in ("scale_0", "scale_1"):
        pngs = sorted((step / scale).glob("*.png"))
        assert len(pngs) == 4 and (step / scale / "index.json").is_file()  # 2 prompts x 2 seeds
        cells.append([Image.open(p).convert("RGB") for p in pngs])
    grid = Image.open(step / "grid.png").convert("RGB")
    w, h = cells[0][0].size
    assert grid.size == (4 * w + 5 * 2, 2 * h + 3 * 2)  # one row per LoRA scale, 2 px apart
    # the grid's cells are the sampled images: row 1 (scale 1), first cell
    assert grid.crop((2, h + 4, 2 + w, 2 * h + 4)).tobytes() in {im.tobytes() for im in cells[1]}
