"""``compare`` on the embedded model: artefacts, agreement with the run folders, rerun, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mixofshow.evaluate import compare
from mixofshow.optim import get_spec
from conftest import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of <robot1> <robot2>", "<robot1> <robot2> on the beach"]
pytestmark = pytest.mark.usefixtures("one_thread")  # a second thread stalls on a busy 2-core machine
FAST = dict(prompts=PROMPTS, num_images=1, sample_steps=2, heldout_draws=2, clip="tiny")


def write_config(tmp_path: Path, table: dict | None = None) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())
    data["data"]["concept_list"] = str(ROOT / "datasets" / "concepts" / "robot.json")
    data["validation"]["prompts_file"] = str(ROOT / "datasets" / "prompts" / "robot.txt")
    data["train"].update(batch_size=1, checkpoint_every=2)
    data["base_model"], data["data"]["resolution"] = EMBEDDED["base_model"], EMBEDDED["data.resolution"]
    if table:
        data["optimizers"] = table
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_compare_writes_everything_and_rerun_trains_nothing(tmp_path):
    config = write_config(tmp_path, {"scaled_adamw": {"lr_unet": 2.0e-4, "lr_text_encoder": 2.0e-5}})
    out = tmp_path / "cmp"
    seen = []
    result = compare(config, ["adamw", "scaled_adamw"], seeds=[0, 1], steps=2, output_dir=out, progress=seen.append, **FAST)
    assert not result.cancelled and result.clip_note is None
    for name in ("comparison.csv", "comparison.md", "comparison.json", "loss_curves.png", "scores.png", "grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with Image.open(out / "grid.png") as grid:  # optimizer x prompt cells of 128, labels left and above
        assert 2 * (128 + 2) < grid.width < 2 * (128 + 2) + 120 and 2 * (128 + 2) < grid.height < 2 * (128 + 2) + 60
    rows = read_csv(out / "comparison.csv")
    assert [(r["optimizer"], r["seed"]) for r in rows] == [("adamw", "0"), ("adamw", "1"), ("scaled_adamw", "0"), ("scaled_adamw", "1")]
    adamw_lr = get_spec("adamw").recommended_lr.get("unet", 1e-4)
    for row in rows:
        run = Path(row["run_dir"])
        metrics = json.loads((run / "metrics.json").read_text())
        assert int(row["steps"]) == metrics["steps"] == 2
        assert float(row["final_loss"]) == pytest.approx(metrics["final_loss"], rel=1e-5)
        assert float(row["mean_loss_last_10"]) == pytest.approx(metrics["mean_loss_last_10"], rel=1e-5)
        assert float(row["heldout_loss"]) == pytest.approx(json.loads((run / "heldout.json").read_text())["loss"], rel=1e-5)
        scores = json.loads((run / "scores.json").read_text())
        assert float(row["clip_t"]) == pytest.approx(scores["overall"]["clip_t"]["mean"], rel=1e-5)
        assert float(row["clip_i"]) == pytest.approx(scores["overall"]["clip_i"]["mean"], rel=1e-5)
        assert scores["num_references"] == 8 and scores["num_images"] == 2
        index = json.loads((run / "eval_samples" / "index.json").read_text())
        assert [(e["prompt"], e["seed"]) for e in index["images"]] == [(p, 0) for p in PROMPTS]  # same for every run
        config_copy = yaml.safe_load((run / "config.yaml").read_text())
        assert config_copy["seed"] == int(row["seed"]) and config_copy["train"]["max_steps"] == 2
        if row["optimizer"] == "scaled_adamw":
            assert row["lr_source"] == "optimizers table" and float(row["lr_unet"]) == 2.0e-4
        else:
            assert float(row["lr_unet"]) == pytest.approx(adamw_lr)
    # same data and seeds: the first step's loss (before any update) is the same for both optimizers
    first = {(r["optimizer"], r["seed"]): json.loads((Path(r["run_dir"]) / "compare_losses.json").read_text())["losses"][0]
             for r in rows}
    assert first[("adamw", "0")] == pytest.approx(first[("scaled_adamw", "0")], rel=1e-6)
    md = (out / "comparison.md").read_text()
    assert "| `scaled_adamw` |" in md and "±" in md and "random (seed 0" in md and "n/a" in md
    phases = {p.phase for p in seen}
    assert {"train", "sample", "heldout", "score", "report", "done"} <= phases
    assert any(p.eta_seconds is not None for p in seen if p.phase == "train")

    # a rerun trains, samples and scores nothing, and reports the same table
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".json") and "runs" in p.parts}
    again = []
    compare(config, ["adamw", "scaled_adamw"], seeds=[0, 1], steps=2, output_dir=out, progress=again.append, **FAST)
    assert not [p for p in again if p.phase in ("train", "sample", "heldout", "score")]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert read_csv(out / "comparison.csv") == rows


def _finished(run: Path) -> bool:
    metrics = run / "metrics.json"  # written at every checkpoint, "finished" only at the end
    return metrics.is_file() and bool(json.loads(metrics.read_text()).get("finished"))


def _losses(run: Path) -> list[float]:
    return json.loads((run / "compare_losses.json").read_text())["losses"]


def test_killed_and_cancelled_runs_resume(tmp_path):
    config = write_config(tmp_path)
    kw = dict(seeds=[0], steps=4, **FAST)
    straight = compare(config, ["adamw"], output_dir=tmp_path / "straight", **kw)
    run_name = Path(straight.rows[0]["run_dir"]).name

    class Killed(Exception):
        pass

    def kill_at_step_3(p):  # dies without any cleanup after the step-2 checkpoint
        if p.phase == "train" and p.step == 3:
            raise Killed

    with pytest.raises(Killed):
        compare(config, ["adamw"], output_dir=tmp_path / "killed", progress=kill_at_step_3, **kw)
    run = tmp_path / "killed" / "runs" / run_name
    assert not _finished(run) and (run / "checkpoints").is_dir()
    seen = []
    resumed = compare(config, ["adamw"], output_dir=tmp_path / "killed", progress=seen.append, **kw)
    assert [p.step for p in seen if p.phase == "train"] == [3, 4]  # from the checkpoint, not from 0
    assert _losses(run) == pytest.approx(_losses(Path(straight.rows[0]["run_dir"])), rel=1e-6)
    assert resumed.rows[0]["final_loss"] == pytest.approx(straight.rows[0]["final_loss"], rel=1e-6)

    # cancellation: should_stop checkpoints and returns; the next call resumes
    polls = {"n": 0}

    def stop_soon():
        polls["n"] += 1
        return polls["n"] > 3

    cancelled = compare(config, ["adamw"], output_dir=tmp_path / "cancelled", should_stop=stop_soon, **kw)
    assert cancelled.cancelled and not (tmp_path / "cancelled" / "comparison.csv").exists()
    seen = []
    done = compare(config, ["adamw"], output_dir=tmp_path / "cancelled", progress=seen.append, **kw)
    train_steps = [p.step for p in seen if p.phase == "train"]
    assert not done.cancelled and train_steps and train_steps[0] > 1 and train_steps[-1] == 4
    assert done.rows[0]["final_loss"] == pytest.approx(straight.rows[0]["final_loss"], rel=1e-6)


def test_compare_without_clip_weights_reports_losses_and_na(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write_config(tmp_path)
    fast = {**FAST, "clip": None}
    result = compare(config, ["adamw"], seeds=[0], steps=1, output_dir=tmp_path / "cmp", **fast)
    assert result.clip_note and "open_clip_model.safetensors" in result.clip_note
    row = read_csv(tmp_path / "cmp" / "comparison.csv")[0]
    assert row["clip_t"] == "" and row["clip_model"] == "n/a" and float(row["final_loss"]) > 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "CLIP: n/a" in md and "--clip-weights" in md
    assert md.count(result.clip_note) == 1  # the whole message once, in the notes


def test_compare_errors_name_the_problem(tmp_path):
    config = write_config(tmp_path, {"adams": {"lr_unet": "fast"}})
    with pytest.raises(ValueError, match="optimizers.adams.lr_unet"):
        compare(config, ["adams"], output_dir=tmp_path / "x", **FAST)
    config = write_config(tmp_path)
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        compare(config, ["adamw", "nope"], output_dir=tmp_path / "x", **FAST)
    with pytest.raises(ValueError, match="--seeds"):
        compare(config, ["adamw"], seeds=[0, 0], output_dir=tmp_path / "x", **FAST)


@pytest.mark.slow
def test_worker_processes_give_the_same_runs(tmp_path):
    config = write_config(tmp_path)
    kw = dict(seeds=[0, 1], steps=2, **FAST)
    inline = compare(config, ["adamw"], output_dir=tmp_path / "one", **kw)
    pooled = compare(config, ["adamw"], output_dir=tmp_path / "two", jobs=2, **kw)
    for a, b in zip(inline.rows, pooled.rows):
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-5)


def test_a_diverged_run_is_reported_not_dropped(tmp_path):
    from mixofshow.evaluate import report

    rows = [{"optimizer": "adams", "seed": s, "lr_unet": 1e-4, "lr_text_encoder": 1e-5, "lr_source": "x",
             "heldout_loss": v, "final_loss": 1.0} for s, v in ((0, 1.0), (1, float("nan")))]
    summary = report.summarise(rows, ["adams"])
    report.write_csv(rows, tmp_path / "c.csv")
    report.write_markdown(summary, {"config": "c", "settings": {}, "clip": "n/a", "dino": "n/a"}, tmp_path / "c.md")
    assert read_csv(tmp_path / "c.csv")[1]["heldout_loss"] == "nan"
    assert "nan (diverged)" in (tmp_path / "c.md").read_text() and "n/a" in (tmp_path / "c.md").read_text()


@pytest.mark.slow
def test_cli_compare_killed_with_sigkill_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = write_config(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "mixofshow", "compare", str(config), "--optimizers", "adamw", "--seeds", "0",
           "--steps", "6", "--output-dir", str(out), "--clip", "tiny", "--prompts", str(prompts),
           "--num-images", "1", "--sample-steps", "2", "--heldout-draws", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    from mixofshow.train.checkpoint import latest_checkpoint

    def complete() -> bool:  # a checkpoint folder being written is not one yet
        return any(latest_checkpoint(c) is not None for c in out.glob("runs/*/checkpoints"))

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not complete() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert complete() and not any(_finished(r) for r in out.glob("runs/*"))
    seen = []
    result = compare(config, ["adamw"], seeds=[0], steps=6, output_dir=out, progress=seen.append, **FAST)
    steps = [p.step for p in seen if p.phase == "train"]
    assert not result.cancelled and steps[0] > 1 and steps[-1] == 6


def test_lr_grid_picks_the_lowest_heldout_loss(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "cmp"
    result = compare(config, ["adamw"], seeds=[0], steps=1, output_dir=out, lr_grid=[0.5, 4.0], **FAST)
    grid = {float(p.parent.name[1:]): json.loads((p / "heldout.json").read_text())["loss"]
            for p in out.glob("grid/*/*")}
    assert sorted(grid) == [0.5, 4.0]
    best = min(grid, key=grid.get)
    row = result.rows[0]
    base_lr = get_spec("adamw").recommended_lr.get("unet", 1e-4)
    assert row["lr_unet"] == pytest.approx(base_lr * best) and f"x {best:g} (lr grid)" in row["lr_source"]
    md = (out / "comparison.md").read_text()
    assert "Learning-rate grid" in md and md.count("| yes |") == 1


def test_a_diverging_optimizer_is_reported_and_the_others_scored(tmp_path):
    config = write_config(tmp_path, {"loraplus": {"lr_unet": 1.0e12, "lr_text_encoder": 1.0e12}})
    out = tmp_path / "cmp"
    result = compare(config, ["adamw", "loraplus"], seeds=[0], steps=3, output_dir=out, **FAST)
    status = {r["optimizer"]: r["status"] for r in result.rows}
    assert status == {"adamw": "done", "loraplus": "diverged"}
    rows = {r["optimizer"]: r for r in read_csv(out / "comparison.csv")}
    assert rows["loraplus"]["heldout_loss"] == "nan" and rows["adamw"]["clip_t"] not in ("", "nan")
    md = (out / "comparison.md").read_text()
    assert "nan (diverged)" in md and "loraplus seed 0 diverged" in md
    again = []
    compare(config, ["adamw", "loraplus"], seeds=[0], steps=3, output_dir=out, progress=again.append, **FAST)
    assert not [p for p in again if p.phase == "train"]  # a diverged run is not retried
