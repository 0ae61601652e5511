"""The web app through gradio_client against a launched server (embedded model, loopback only):
train, stop and resume, sample, fuse, the file route, a client that disconnects mid-training,
and a server killed mid-job."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.app_helpers import AppServer, job, train_args, wait_for

pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("app") / "runs"
    app = AppServer(runs)
    yield app
    app.stop()


def _submit(client, *args, **kwargs) -> int:
    _, job_id = client.predict(*train_args(*args, **kwargs), api_name="/train_submit")
    return int(job_id)


def test_train_stop_resume_sample_and_export(server):
    client = server.client()
    job_id = _submit(client, "robot", 40, checkpoint_every=0)
    info = wait_for(client, job_id, lambda j: j["state"] == "running" and (j["progress"].get("step") or 0) >= 2)
    client.predict(str(job_id), api_name="/train_save_now")
    client.predict(str(job_id), api_name="/train_stop")
    info = wait_for(client, job_id, lambda j: j["state"] in ("stopped", "done", "failed"))
    assert info["state"] == "stopped", info
    stopped_at = info["progress"]["step"]
    assert 2 <= stopped_at < 40
    ckpts = sorted((Path(info["run_dir"]) / "checkpoints").iterdir())
    assert len(ckpts) >= 1  # "save now" and the stop each wrote one (keep_checkpoints prunes)
    # choosing the job shows its settings in the form: the run name, words and steps it was given
    values = client.predict(str(job_id), api_name="/train_job_settings")
    assert "robot" in values and "<robot1> <robot2>" in values and 40 in values

    client.predict(str(job_id), api_name="/train_resume")
    info = wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "done", info
    assert info["progress"]["step"] == 40 and info["resume"] is True
    concept = Path(info["progress"]["concept"])
    assert concept.is_file() and concept.parent == Path(info["run_dir"])
    log = (Path(info["run_dir"]) / "app.log").read_text()
    assert f"resumed from" in log and "checkpoint" in log

    # picking the concept writes a prompt with its words; sample it, 2 seeds, at 96 x 64;
    # the gallery lists both with their parameters
    assert client.predict(str(concept), api_name="/sample_default_prompt") == "a photo of <robot1> <robot2>"
    _, sample_id = client.predict(str(concept), "a photo of <robot1> <robot2>", "", 3, 2, 2, 7.5, "dpm", 1.0, "",
                                  "", None, 1.0, 96, 64, api_name="/sample_submit")
    info = wait_for(client, sample_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "done", info
    _, status, gallery = client.predict(str(sample_id), api_name="/sample_refresh")
    assert len(gallery) == 2 and "seed 3" in gallery[0]["caption"] and "seed 4" in gallery[1]["caption"]
    from PIL import Image

    assert Image.open(gallery[0]["image"]).size == (96, 64)
    assert "done" in status

    # fuse it (one concept re-solves it); the fused file is a model the Sample tab offers
    table = {"headers": ["concept file", "text_encoder_alpha", "unet_alpha"],
             "data": [["robot/robot.safetensors", 1.0, 0.8]], "metadata": None}
    _, fuse_id = client.predict([], table, "closed-form", "solo", api_name="/fuse_submit")
    fused = wait_for(client, fuse_id, lambda j: j["state"] in ("done", "failed"))
    assert fused["state"] == "done", fused
    assert Path(fused["progress"]["output"]).is_file()

    # the Runs tab lists it and exports the concept as kohya (LoRA + embeddings files)
    runs = client.predict(None, api_name="/runs_list")
    listed = [choice[1] if isinstance(choice, (list, tuple)) else choice for choice in runs["choices"]]
    robot_run = Path(info["run_dir"]).parent.parent / "robot"  # info: the sample job, in <runs>/samples/<id>
    assert str(robot_run) in listed and info["run_dir"] in listed, listed  # the trained run and the samples
    files = client.predict(str(robot_run), "kohya", api_name="/runs_export")
    names = sorted(Path(f).name for f in files)
    assert names == ["robot.kohya.embeddings.safetensors", "robot.kohya.safetensors", "robot_edlora.safetensors"], names


def test_user_errors_are_messages_not_tracebacks(server):
    from gradio_client.exceptions import AppError

    client = server.client()
    args = train_args("bad", 4)
    args[7] = "robot1"  # concept words without <...>
    # escaped once (app/errors.py): the page renders the message as HTML and shows "<robot1> <robot2>"
    with pytest.raises(AppError, match="concept words 'robot1': expected words like &lt;robot1&gt; &lt;robot2&gt;"):
        client.predict(*args, api_name="/train_submit")
    args = train_args("bad-base", 4)
    args[9] = "/no/such/model.safetensors"  # a path outside the runs folder and --models-dir
    with pytest.raises(AppError, match="must lie inside the runs folder or the app's --models-dir"):
        client.predict(*args, api_name="/train_submit")
    args[9] = str(server.runs_dir / "missing.safetensors")  # refused at submit, not later in the worker
    with pytest.raises(AppError, match="missing.safetensors: no such file or folder"):
        client.predict(*args, api_name="/train_submit")
    with pytest.raises(AppError, match="not inside the app's runs folder"):
        client.predict("/etc/passwd", "x", "", 0, 1, 2, 7.5, "dpm", 1.0, "", api_name="/sample_submit")
    with pytest.raises(AppError, match="no job #9999"):
        client.predict(9999, api_name="/queue_cancel")


def test_file_route_serves_only_the_runs_folder(server):
    inside = server.runs_dir / "presets" / "probe.yaml"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text("probe: 1\n")
    ok = urllib.request.urlopen(f"{server.url}gradio_api/file={inside}", timeout=10)
    assert ok.status == 200 and ok.read() == b"probe: 1\n"
    for outside in ("/etc/passwd", str(Path(__file__).resolve()), str(server.runs_dir.parent / f"app-{server.port}.log")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}gradio_api/file={outside}", timeout=10)
        assert err.value.code in (403, 404), outside


def test_a_disconnected_client_loses_nothing(server):
    first = server.client()
    job_id = _submit(first, "reload", 12)
    first.close()  # the browser tab goes away at once (no race with the job's start)
    second = server.client()
    info = wait_for(second, job_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "done" and info["progress"]["step"] == 12


@pytest.mark.slow
def test_queue_waits_reorders_and_cancels(server):
    client = server.client()
    running = _submit(client, "q-run", 30)
    wait_for(client, running, lambda j: j["state"] == "running")
    a, b, c = (_submit(client, f"q-{n}", 2) for n in "abc")
    table, _ = client.predict(c, api_name="/queue_up")  # c before b
    queued = [row[0] for row in table["data"] if row[3] == "queued"]
    assert queued == [a, c, b]
    client.predict(b, api_name="/queue_cancel")
    assert job(client, b)["state"] == "cancelled"
    client.predict(running, api_name="/queue_cancel")  # a running training: stop after a checkpoint
    wait_for(client, running, lambda j: j["state"] == "stopped")
    done = [wait_for(client, j, lambda i: i["state"] in ("done", "failed")) for j in (a, c)]
    assert [d["state"] for d in done] == ["done", "done"]
    assert job(client, a)["started"] < job(client, c)["started"]  # the queue order, c moved ahead of b


@pytest.mark.slow
def test_restart_marks_interrupted_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    app = AppServer(runs)
    try:
        client = app.client()
        job_id = _submit(client, "crash", 60)
        wait_for(client, job_id, lambda j: (j["progress"].get("step") or 0) >= 3)
    finally:
        app.kill()  # SIGKILL: no clean shutdown of the server
    app = AppServer(runs)  # waits for the old worker, then marks the job
    try:
        client = app.client()
        info = job(client, job_id)
        assert info["state"] == "interrupted", info
        client.predict(str(job_id), api_name="/train_resume")
        info = wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
        assert info["state"] == "done" and info["progress"]["step"] == 60, info
        assert "resumed from" in (Path(info["run_dir"]) / "app.log").read_text()
    finally:
        app.stop()


@pytest.mark.slow
def test_ctrl_c_with_piped_output_checkpoints_the_running_job(tmp_path):
    """`mixofshow app | tee log`, then Ctrl+C: the reader dies with the app; the training checkpoints."""
    import signal

    runs = tmp_path / "runs"
    app = AppServer(runs, piped=True)
    client = app.client()
    job_id = _submit(client, "piped", 200)
    wait_for(client, job_id, lambda j: (j["progress"].get("step") or 0) >= 3)
    app.proc.stdout.close()  # tee is gone: any write to the pipe now fails
    app.proc.send_signal(signal.SIGINT)
    app.proc.wait(timeout=120)
    app.log.close()
    app = AppServer(runs)  # waits for the old worker to end, then reads the store
    try:
        info = job(app.client(), job_id)
        assert info["state"] in ("stopped", "interrupted"), info
        assert list((Path(info["run_dir"]) / "checkpoints").glob("step_*")), "no checkpoint was written"
        assert "BrokenPipeError" not in (runs / "worker.log").read_text()
    finally:
        app.stop()


def test_presets_are_the_yaml_the_cli_takes(server):
    from mixofshow.optim import get_spec
    from mixofshow.train.config import load_train_config

    client = server.client()
    args = train_args("preset-run", 7, optimizer="loraplus")

    slots = [""] * 8  # the form's hyper-parameter fields, in the order of the registry's defaults
    ratio = list(get_spec("loraplus").defaults).index("ratio")
    slots[ratio] = "8"
    args[-8:] = slots
    path, _ = client.predict("mine", *args, api_name="/train_save_preset")
    saved = Path(server.runs_dir / "presets" / "mine.yaml")
    assert saved.is_file() and Path(path).name == "mine.yaml"
    config = load_train_config(saved)  # exactly what `mixofshow train PRESET` reads
    assert config.optimizer.name == "loraplus" and config.optimizer.params == {"ratio": 8}
    assert config.train.max_steps == 7 and config.concept.words == ["<robot1>", "<robot2>"]
    values = client.predict("mine", api_name="/train_load_preset")
    # outputs: source, shipped concept, concept list, then the form (name, words, ...), then the hp fields
    assert values[:2] == ("shipped concept", "robot") and values[3:5] == ("preset-run", "<robot1> <robot2>")
    assert values[8] == "loraplus" and values[10] == 7
    assert values[18 + ratio]["label"] == "ratio" and values[18 + ratio]["value"] == "8"  # the form for loraplus


def test_compare_two_optimizers_reports_table_plots_and_curves(server):
    client = server.client()
    _, job_id = client.predict(
        "cmp", "shipped concept", "robot", None, "", 64, ["adamw", "scaled_adamw"], "0", 2, "", 1, 2, 2, "tiny", "",
        api_name="/compare_submit")
    info = wait_for(client, job_id, lambda j: j["state"] in ("done", "failed", "stopped"), timeout=180)
    assert info["state"] == "done", info
    out = Path(info["run_dir"])
    assert out.parent == server.runs_dir / "compare"
    assert info["progress"]["phase"] == "done" and info["progress"]["runs_total"] == 2
    assert sorted(info["progress"]["runs"]) == sorted(p.name for p in (out / "runs").iterdir())
    assert all(done == total == 2 for done, total in info["progress"]["runs"].values())
    _, status, curves, report, plots = client.predict(str(job_id), api_name="/compare_refresh")
    assert "done" in status
    md = (out / "comparison.md").read_text()
    assert report.strip() == md.strip() and "adamw" in md and "scaled_adamw" in md
    assert sorted(p["caption"] for p in plots) == ["grid.png", "loss_curves.png", "scores.png"]
    assert Path(curves).name == "live_loss_curves.png" and Path(curves).stat().st_size > 0
    from app.tab_compare import loss_curves

    frame = loss_curves(out)
    runs = set(frame.run)
    assert len(runs) == 2 and len(frame) == 4  # 2 runs x 2 steps, from the run folders
    first = json.loads((out / "runs" / sorted(runs)[0] / "metrics.json").read_text())["losses"]
    assert frame[frame.run == sorted(runs)[0]].loss.tolist() == pytest.approx(first)

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="seeds"):
        client.predict("bad", "shipped concept", "robot", None, "", 64, ["adamw"], "0, 0", 2, "", 1, 2, 2, "tiny", "",
                       api_name="/compare_submit")
    with pytest.raises(AppError, match="optimizers"):
        client.predict("bad", "shipped concept", "robot", None, "", 64, [], "0", 2, "", 1, 2, 2, "tiny", "",
                       api_name="/compare_submit")


def test_sample_with_two_region_boxes(server):
    client = server.client()
    concept = server.runs_dir / "regions" / "regions.safetensors"
    if not concept.is_file():
        wait_for(client, _submit(client, "regions", 2), lambda j: j["state"] in ("done", "failed"))
    assert concept.is_file()
    boxes = "0, 0, 0.5, 1: a photo of <robot1> <robot2>\n0.5, 0, 1, 1: a photo of a cat"
    preview = client.predict(boxes, api_name="/sample_region_preview")
    assert Path(preview).is_file()
    _, sample_id = client.predict(str(concept), "a photo of <robot1> <robot2> and a cat", "", 0, 1, 2, 7.5, "ddim",
                                  1.0, boxes, api_name="/sample_submit")
    info = wait_for(client, sample_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "done", info
    index = json.loads((Path(info["run_dir"]) / "index.json").read_text())
    [image] = index["images"]
    assert (Path(info["run_dir"]) / image["file"]).is_file()
    assert [r["prompt"] for r in image["regions"]] == ["a photo of <robot1> <robot2>", "a photo of a cat"]
    assert [r["box"] for r in image["regions"]] == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]  # top, left, bottom, right


def test_sample_with_a_t2i_adapter_condition(server, tmp_path):
    import numpy as np
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    from tests.test_adapters import tiny_adapter

    client = server.client()
    concept = server.runs_dir / "regions" / "regions.safetensors"
    if not concept.is_file():
        wait_for(client, _submit(client, "regions", 2), lambda j: j["state"] in ("done", "failed"))
    assert concept.is_file()
    folder = tmp_path / "t2iadapter_tiny"
    tiny_adapter().save_pretrained(folder)
    pose = tmp_path / "pose.png"  # the embedded model samples 128 x 128
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(pose)
    args = [str(concept), "a photo of <robot1> <robot2>", "", 0, 1, 2, 7.5, "ddim", 1.0, ""]
    with pytest.raises(AppError, match="cannot load a diffusers T2IAdapter"):
        client.predict(*args, str(tmp_path / "missing"), handle_file(str(pose)), 1.0, api_name="/sample_submit")
    with pytest.raises(AppError, match="needs both an adapter and a condition image"):
        client.predict(*args, str(folder), None, 1.0, api_name="/sample_submit")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(AppError, match="notes.png: not an image"):
        client.predict(*args, str(folder), handle_file(str(text)), 1.0, api_name="/sample_submit")

    _, sample_id = client.predict(*args, str(folder), handle_file(str(pose)), 0.75, api_name="/sample_submit")
    info = wait_for(client, sample_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "done", info
    [image] = json.loads((Path(info["run_dir"]) / "index.json").read_text())["images"]
    assert (Path(info["run_dir"]) / image["file"]).is_file()
    [cond] = image["conditions"]
    assert cond["adapter"] == str(folder.resolve()) and cond["weight"] == 0.75
    saved = Path(cond["image"])
    assert saved.name == "condition.png" and server.runs_dir.resolve() in saved.resolve().parents
    assert np.array_equal(np.asarray(Image.open(saved)), np.asarray(Image.open(pose)))

    small = tmp_path / "small.png"  # a control image not of the output's size fails the job, saying so
    Image.open(pose).resize((64, 64)).save(small)
    _, bad_id = client.predict(*args, str(folder), handle_file(str(small)), 1.0, api_name="/sample_submit")
    info = wait_for(client, bad_id, lambda j: j["state"] in ("done", "failed"))
    assert info["state"] == "failed" and "condition image is 64 x 64 (w x h), the output is 128 x 128" in info["error"]


def test_dataset_panel_edits_captions_masks_and_images(server, tmp_path):
    """Store an upload as a dataset, see it, edit and template captions, add and remove images, train on it."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    files = []
    for name, colour in (("one", "red"), ("two", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
        files.append(handle_file(str(tmp_path / f"{name}.png")))
    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "masks" / "one.png")
    client = server.client()
    stored, gallery, table = client.predict(files, None, [handle_file(str(tmp_path / "masks" / "one.png"))],
                                            api_name="/dataset_store")
    folder = stored if isinstance(stored, str) else stored["value"]
    assert Path(folder).parent == server.runs_dir.resolve() / "uploads" and len(gallery) == 2
    assert [row[1] for row in table["data"]] == ["<TOK>", "<TOK>"]
    edited = {"headers": ["image", "caption"], "data": [["one", "<TOK>, red"], ["two", "<TOK>, blue, waving"]],
              "metadata": None}
    _, table = client.predict(folder, edited, api_name="/dataset_save_captions")
    assert (Path(folder) / "caption" / "two.txt").read_text() == "<TOK>, blue, waving\n"
    _, table = client.predict(folder, "<TOK>, {class_word}, full body", "robot", api_name="/dataset_template")
    assert [row[1] for row in table["data"]] == ["<TOK>, robot, full body"] * 2
    with pytest.raises(AppError, match="inside the app's --models-dir"):
        client.predict(folder, "/some/where/blip", api_name="/dataset_model_captions")
    Image.new("RGB", (32, 48), "green").save(tmp_path / "three.png")
    _, table, _ = client.predict(folder, [handle_file(str(tmp_path / "three.png"))], api_name="/dataset_add")
    assert len(table["data"]) == 3
    with pytest.raises(AppError, match="tick 'yes, remove it'"):
        client.predict(folder, "one", False, api_name="/dataset_remove")
    _, table, _ = client.predict(folder, "one", True, api_name="/dataset_remove")
    assert [row[0] for row in table["data"]][1] == "two" and len(table["data"]) == 2
    assert not (Path(folder) / "image" / "one.png").exists() and not (Path(folder) / "mask" / "one.png").exists()
    source, concept_list = client.predict(folder, api_name="/dataset_use")
    assert source["value"] == "concept list file" and concept_list == str(Path(folder) / "concept.json")
    # the form trains on it; a concept list outside the runs folder is refused
    args = train_args("from-dataset", 2)
    args[0], args[5] = "concept list file", concept_list  # source, concept-list field
    _, job_id = client.predict(*args, api_name="/train_submit")
    assert job(client, job_id)["config"]["train"]["data"]["concept_list"] == concept_list
    outside = tmp_path / "concept.json"
    outside.write_text("[]")
    args[5] = str(outside)
    with pytest.raises(AppError, match="no such file inside the app's runs folder"):
        client.predict(*args, api_name="/train_submit")
    with pytest.raises(AppError, match="pick a stored upload"):
        client.predict("/etc", api_name="/dataset_open")
