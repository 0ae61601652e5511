"""The app's parts without a server: binding rules, the job store, upload validation, regions."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.command import check_bind
from app.login import parse_auth
from app.jobs import JobStore
from app.uploads import LIMITS, UploadError, UploadLimits, check_image, save_concept_upload
from mixofshow.cli import main


def test_non_loopback_needs_auth(capsys):
    assert main(["app", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve the app beyond this machine without a login" in capsys.readouterr().err
    assert main(["app", "--host", "127.0.0.1", "--auth", "alice:secret"]) == 2
    assert "visible to every user" in capsys.readouterr().err
    check_bind("127.0.0.1", None), check_bind("::1", None), check_bind("localhost", None)
    check_bind("0.0.0.0", parse_auth("alice:secret", "test"))
    with pytest.raises(ValueError, match="--host 192.168.1.5"):
        check_bind("192.168.1.5", None)


def test_app_command_imports_no_gradio():
    import subprocess
    import sys

    code = "import sys, app.command; print('gradio' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.stdout.split() == ["False", "False"]


def test_store_queue_order_cancel_resume_recover(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b, c = (store.submit("train", n, {"train": {}}, str(tmp_path / n), "cpu").id for n in "abc")
    store.move(c, -2)
    assert [j.id for j in store.jobs() if j.state == "queued"] == [c, a, b]
    assert store.cancel(a) == "cancelled"
    first = store.claim("cpu", os.getpid())
    assert first.id == c and store.claim("cpu", os.getpid()) is None  # one job per device
    store.send(c, "checkpoint"), store.send(c, "validate")
    assert store.take_commands(c) == ["checkpoint", "validate"] and store.take_commands(c) == []
    with pytest.raises(ValueError, match="unknown command 'pause'"):
        store.send(c, "pause")
    with pytest.raises(ValueError, match="is cancelled"):
        store.cancel(a)
    store.report(c, {"step": 2}, [(1, 0.5), (2, 0.4)])
    store.report(c, {"step": 2}, [(2, 0.3)])  # a resumed run repeats steps after its checkpoint
    assert store.losses(c) == [(1, 0.5), (2, 0.3)]
    # the worker died with the app: a dead pid makes the job interrupted, and it can resume
    with store._connect() as db:
        db.execute("UPDATE jobs SET worker_pid = ? WHERE id = ?", (2**22 + 12345, c))
    assert store.recover(wait=0) == [c]
    assert store.get(c).state == "interrupted"
    resumed = store.resume(c)
    assert resumed.state == "queued" and resumed.resume
    with pytest.raises(ValueError, match="only stopped, interrupted, failed"):
        store.resume(b)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_uploads_are_checked_by_content_size_and_pixels(tmp_path):
    good = tmp_path / "cat.jpg"
    Image.new("RGB", (32, 24), "red").save(good, format="PNG")  # the name lies; the content decides
    assert check_image(good).size == (32, 24)
    fake = tmp_path / "evil.png"
    fake.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(UploadError, match="evil.png: not an image"):
        check_image(fake)
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    with pytest.raises(UploadError, match="bomb.png: 30000x30000 pixels|bomb.png: too many pixels"):
        check_image(bomb)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "blue").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(UploadError, match="cut.png"):
        check_image(truncated)
    with pytest.raises(UploadError, match="over the 0 MB limit"):
        check_image(good, UploadLimits(max_bytes=10))
    with pytest.raises(UploadError, match="at most 1 images"):
        save_concept_upload([str(good), str(good)], None, None, tmp_path / "up", UploadLimits(max_files=1))
    assert LIMITS.max_pixels == 4096 * 4096


def test_upload_becomes_a_concept_folder_the_loader_reads(tmp_path):
    from mixofshow.data import ConceptDataset

    imgs = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), (i * 100, 50, 50)).save(p)
        imgs.append(str(p))
    cap = tmp_path / "img0.txt"
    cap.write_text("a toy on a table\n")
    mask = tmp_path / "img1.png.mask"
    Image.new("L", (40, 40), 255).save(mask, format="PNG")
    mask = mask.rename(tmp_path / "masks_img1.png")
    with pytest.raises(UploadError, match="mask 'masks_img1' has no image"):
        save_concept_upload(imgs, [str(cap)], [str(mask)], tmp_path / "up")
    concept_list = save_concept_upload(imgs, [str(cap)], None, tmp_path / "up")
    entry = json.loads(concept_list.read_text())[0]
    assert entry["instance_prompt"] == "<TOK>"
    assert (concept_list.parent / "caption" / "img0.txt").read_text() == "<TOK>, a toy on a table\n"
    assert (concept_list.parent / "caption" / "img1.txt").read_text() == "<TOK>\n"
    ds = ConceptDataset(str(concept_list), {"<TOK>": "<toy1> <toy2>"}, 32)
    assert len(ds) == 2


def test_region_lines_and_preview():
    from app.tab_sample import parse_regions, region_preview

    assert parse_regions("0, 0, 0.5, 1: <a1> <a2>\n\n0.5,0,1,1: <b1> <b2>") == [
        ((0.0, 0.0, 0.5, 1.0), "<a1> <a2>"), ((0.5, 0.0, 1.0, 1.0), "<b1> <b2>")]
    with pytest.raises(ValueError, match="region line 1"):
        parse_regions("0.5, 0, 0.2, 1: backwards")
    img = region_preview("0, 0, 0.5, 1: left", 64, 64)
    assert img.getpixel((0, 32)) != img.getpixel((48, 32))  # the box outline is drawn


def test_compare_job_stops_on_request_and_resumes(tmp_path, caplog):
    """A compare job in the worker: "stop" cancels it after a checkpoint; Resume finishes it.

    The stop arrives at a known point, not by racing the job: the store hands "stop" to the job's
    fourth request check (one as the comparison starts, then one before each training step), so the
    job stops after 2 steps."""
    from app.tab_compare import compare_request
    from app.worker import run_job

    class StopOnFourthCheck(JobStore):
        checks = 0

        def take_commands(self, job_id):
            StopOnFourthCheck.checks += 1
            return ["stop"] if StopOnFourthCheck.checks == 4 else super().take_commands(job_id)

    store = StopOnFourthCheck(tmp_path / "jobs.sqlite")
    request = compare_request("shipped concept", "robot", None, "", 64, ["adamw"], "0", 20, "", 1, 2, 2, "tiny", "",
                              runs_dir=tmp_path)
    assert request["train"]["train"]["checkpoint_every"] == 20 and request["optimizers"] == ["adamw"]
    submitted = store.submit("compare", "c", {"compare": request}, str(tmp_path / "compare" / "c"), "cpu")
    job = store.claim("cpu", os.getpid())
    assert run_job(store, job) == "stopped"
    stopped = store.get(job.id)
    assert stopped.state == "stopped", stopped
    run = next((Path(job.run_dir) / "runs").iterdir())
    before = json.loads((run / "metrics.json").read_text())
    steps_at_stop = before["steps"]
    assert steps_at_stop == 2
    store = JobStore(tmp_path / "jobs.sqlite")
    store.resume(submitted.id)
    again = store.claim("cpu", os.getpid())
    with caplog.at_level("INFO", logger="mixofshow.train.loop"):
        assert run_job(store, again) == "done"
    assert f"(step {steps_at_stop})" in caplog.text and "resumed from" in caplog.text
    final = store.get(job.id)
    assert final.progress["phase"] == "done" and (Path(job.run_dir) / "comparison.md").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 20 and len(metrics["losses"]) == 20
    assert metrics["losses"][:steps_at_stop] == before["losses"]  # continued from the stop's checkpoint


def test_runs_tab_reads_nothing_through_links_out_of_the_runs_folder(tmp_path):
    """A link inside a run folder (config.yaml -> a secret, a linked log, image or metrics) shows nothing."""
    from app.runs import images_of, list_runs, read_text

    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    outside_png = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside_png)
    runs = tmp_path / "runs"
    linked = runs / "linked"
    (linked / "samples").mkdir(parents=True)
    (linked / "config.yaml").symlink_to(secret)
    good = runs / "good"
    (good / "samples").mkdir(parents=True)
    (good / "config.yaml").write_text("name: good\n")
    (good / "metrics.json").symlink_to(secret)
    (good / "app.log").symlink_to(secret)
    (good / "samples" / "leak.png").symlink_to(outside_png)
    Image.new("RGB", (4, 4)).save(good / "samples" / "ok.png")
    (runs / "escape").symlink_to(tmp_path, target_is_directory=True)

    listed = {r.name: r for r in list_runs(runs)}
    assert set(listed) == {"good"}  # "linked" has no config inside; "escape" leaves the folder
    assert listed["good"].metrics == {}
    assert read_text(runs, good / "app.log") == "" and read_text(runs, linked / "config.yaml") == ""
    assert read_text(runs, good / "config.yaml") == "name: good\n"
    assert [p.name for p in images_of(runs, good)] == ["ok.png"]


def test_compare_yaml_on_the_server_stays_inside_the_runs_folder(tmp_path):
    import gradio as gr

    from app.tab_compare import compare_request

    runs = tmp_path / "runs"
    runs.mkdir()
    secret = tmp_path / "secret.yaml"
    secret.write_text("data: {x: 1}\nconcept: {}\ntoken: sk-12345\n")
    args = ("training YAML", "robot", None)
    rest = (64, ["adamw"], "0", 20, "", 1, 2, 2, "tiny", "")
    for path in (secret, runs / ".." / "secret.yaml"):
        with pytest.raises(gr.Error, match="inside the app's runs folder"):
            compare_request(*args, str(path), *rest, runs_dir=runs)
    (runs / "link.yaml").symlink_to(secret)
    with pytest.raises(gr.Error, match="inside the app's runs folder"):
        compare_request(*args, str(runs / "link.yaml"), *rest, runs_dir=runs)
    bad = runs / "bad.yaml"
    bad.write_text("data: {x: 1}\nconcept: [sk-67890\n")
    with pytest.raises(gr.Error) as err:
        compare_request(*args, str(bad), *rest, runs_dir=runs)
    assert "bad.yaml: not valid YAML at line" in str(err.value) and "sk-67890" not in str(err.value)


def test_login_comes_from_a_file_or_the_environment_never_argv(tmp_path, capsys):
    from app.login import AUTH_ENV, load_auth

    secret = tmp_path / "login"
    secret.write_text("alice:s3cret\n")
    assert load_auth(str(secret), {}) == ("alice", "s3cret")
    assert load_auth(None, {AUTH_ENV: "bob:pw"}) == ("bob", "pw")
    assert load_auth(str(secret), {AUTH_ENV: "bob:pw"}) == ("alice", "s3cret")  # the file wins
    assert load_auth(None, {}) is None
    (tmp_path / "bad").write_text("no-colon\n")
    with pytest.raises(ValueError, match=r"--auth-file .*bad: expected USER:PASS"):
        load_auth(str(tmp_path / "bad"), {})
    with pytest.raises(ValueError, match="cannot be read"):
        load_auth(str(tmp_path / "missing"), {})
    assert main(["app", "--host", "0.0.0.0", "--auth-file", str(tmp_path / "bad")]) == 2
    assert main(["app", "--ssl-certfile", str(secret)]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["app", "--runs-dir", str(secret)]) == 2  # a file, not a folder: no traceback
    assert f"--runs-dir {secret}: exists and is a file" in capsys.readouterr().err


def test_failed_logins_slow_down_then_lock_out_per_client():
    """The throttle around a stand-in /login route; time and sleep are driven by the test."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.login import LoginThrottle

    now, slept = [1000.0], []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def login(request: Request):
        form = await request.form()
        ok = form.get("password") == "right"
        return JSONResponse({"success": ok}, status_code=200 if ok else 400)

    app = Starlette(routes=[Route("/login", login, methods=["POST"]), Route("/", lambda r: JSONResponse({}))],
                    middleware=[Middleware(LoginThrottle, max_failures=5, window=60.0,
                                           clock=lambda: now[0], sleep=fake_sleep)])
    a = TestClient(app, client=("10.0.0.1", 1))
    b = TestClient(app, client=("10.0.0.2", 1))
    codes = [a.post("/login", data={"username": "u", "password": "wrong"}).status_code for _ in range(6)]
    assert codes == [400] * 5 + [429]
    assert slept == [0.25, 0.5, 1.0, 2.0]  # each retry after a failure waits twice as long
    assert a.post("/login", data={"username": "u", "password": "right"}).status_code == 429  # locked out
    assert b.post("/login", data={"username": "u", "password": "right"}).status_code == 200  # other client
    assert a.get("/").status_code == 200  # only the login route is guarded
    now[0] += 61  # the window has passed since the last failure
    assert a.post("/login", data={"username": "u", "password": "right"}).status_code == 200
    slept.clear()
    assert a.post("/login", data={"username": "u", "password": "wrong"}).status_code == 400
    assert slept == []  # a success cleared the record


def test_app_serves_https_and_locks_out_login_guessing(tmp_path):
    """A real server: TLS with a self-signed certificate, the login from the environment, lockout."""
    import shutil
    import ssl
    import subprocess
    import urllib.error
    import urllib.parse
    import urllib.request

    from app.login import AUTH_ENV
    from tests.app_helpers import AppServer

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(cert))
    server = AppServer(tmp_path / "runs", args=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
                       env={AUTH_ENV: "alice:s3cret"}, ssl_context=context)
    try:
        assert server.url.startswith("https://")
        codes = []
        for _ in range(11):
            data = urllib.parse.urlencode({"username": "alice", "password": "guess"}).encode()
            try:
                urllib.request.urlopen(urllib.request.Request(server.url + "login", data=data), context=context)
                codes.append(200)
            except urllib.error.HTTPError as err:
                codes.append(err.code)
        assert codes == [400] * 10 + [429]
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # it is TLS, with this cert
            urllib.request.urlopen(server.url, context=ssl.create_default_context())
    finally:
        server.stop()


def test_seconds_per_step_and_eta_leave_out_validation_time():
    """Steps of 2 s with a 60 s validation after step 2: the rate stays 2 s/step."""
    from app.worker import TrainingRate

    rate = TrainingRate()
    assert rate.update("train", 1, 0.0) is None
    assert rate.update("train", 2, 2.0) == 2.0
    rate.update("validate", 2, 62.0)  # reported when the samples are written
    assert rate.update("train", 3, 64.0) == 2.0
    rate.update("checkpoint", 3, 70.0)
    assert rate.update("train", 5, 74.0) == 2.0


def test_form_numbers_name_the_field_not_python():
    from app.errors import form_number

    assert form_number("7", "seed") == 7 and form_number(7.0, "seed") == 7 and form_number("2.5", "CFG", float) == 2.5
    for bad in ("abc", "1.5", None, ""):
        with pytest.raises(ValueError, match="seed: expected a whole number, got") as err:
            form_number(bad, "seed")
        assert "invalid literal" not in str(err.value)


def test_user_errors_are_escaped_once_even_when_wrapped_again():
    from app.errors import UserError

    first = UserError("concept words 'x': expected words like <robot1> <robot2>")
    expected = "concept words 'x': expected words like &lt;robot1&gt; &lt;robot2&gt;"
    assert first.message == expected and UserError(first.message).message == expected


def test_the_sample_prompt_follows_the_chosen_concept(tmp_path):
    from safetensors.torch import save_file

    from app.tab_sample import default_prompt

    concept = tmp_path / "cat.safetensors"
    save_file({"embeddings.<cat1>": torch.zeros(2, 4)}, concept,
              metadata={"format": "mixofshow.edlora/1", "words": json.dumps(["<cat1>", "<cat2>"])})
    assert default_prompt(str(concept)) == "a photo of <cat1> <cat2>"
    fused = tmp_path / "fused.safetensors"
    save_file({"x": torch.zeros(1)}, fused, metadata={"format": "mixofshow.fused/1", "concepts": json.dumps(
        [{"words": ["<cat1>", "<cat2>"]}, {"words": ["<robot1>", "<robot2>"]}])})
    assert default_prompt(str(fused)) == "a photo of <cat1> <cat2> and <robot1> <robot2>"
    assert default_prompt("") is None and default_prompt(str(tmp_path / "missing.safetensors")) is None


def test_base_model_picker_and_paths_confined_to_the_runs_and_models_folders(tmp_path):
    from app.context import AppContext, base_model_choices
    from app.errors import UserError
    from app.tab_train import base_config, form_to_config

    models, runs = tmp_path / "models", tmp_path / "runs"
    (models / "sd-folder").mkdir(parents=True)
    (models / "sd-folder" / "model_index.json").write_text("{}")
    (models / "v1-5.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("not a model")
    runs.mkdir()
    ctx = AppContext(runs, JobStore(runs / "jobs.sqlite"), "cpu", models)
    choices = base_model_choices(ctx)
    assert "embedded" in choices and choices[-2:] == [str(models / "sd-folder"), str(models / "v1-5.safetensors")]
    form = ["run", "<robot1> <robot2>", "robot"]
    rest = (64, "adamw", {}, 4, 2, 1, 1e-4, 1e-5, 1e-3, 1, -1, "")
    roots = [runs, models]
    config = form_to_config(base_config(), "c.json", *form, str(models / "sd-folder"), *rest, model_roots=roots)
    assert config["base_model"] == str(models / "sd-folder")
    for named in ("embedded", "toyworld"):  # the shipped models are names, not paths
        assert form_to_config(base_config(), "c.json", *form, named, *rest, model_roots=roots)["base_model"] == named
    outside = tmp_path / "elsewhere"
    (outside / "pipe").mkdir(parents=True)
    (outside / "pipe" / "model_index.json").write_text("{}")
    for path in (str(outside / "pipe"), str(models / ".." / "elsewhere" / "pipe")):
        with pytest.raises(UserError, match="must lie inside the runs folder or the app's --models-dir"):
            form_to_config(base_config(), "c.json", *form, path, *rest, model_roots=roots)


def test_delete_job_and_run_folder_never_a_running_one(tmp_path):
    from app.runs import delete_run
    from mixofshow.train.folder import RunLock

    runs = tmp_path / "runs"
    store = JobStore(runs / "jobs.sqlite")
    done = store.submit("train", "a", {}, str(runs / "a"), "cpu")
    running = store.submit("train", "b", {}, str(runs / "b"), "cpu")
    for folder in ("a", "b", "cli", "uploads"):
        (runs / folder).mkdir(parents=True, exist_ok=True)
        (runs / folder / "metrics.json").write_text("{}")
    claimed = store.claim("cpu", os.getpid())
    assert claimed.id == done.id
    with pytest.raises(ValueError, match="finishes as one of"):
        store.finish(done.id, "queued")
    store.finish(done.id, "done")
    with pytest.raises(ValueError, match=r"job #\d+ is done, not running; it cannot finish as failed"):
        store.finish(done.id, "failed")  # a late worker cannot overwrite a finished job
    store.claim("cpu", os.getpid())  # b is running now
    with pytest.raises(ValueError, match="is running; stop it first"):
        store.delete(running.id)
    assert store.delete(done.id).run_dir == str(runs / "a") and [j.id for j in store.jobs()] == [running.id]
    busy = {runs / "b"}
    with pytest.raises(ValueError, match="a job is running in it"):
        delete_run(runs, runs / "b", busy)
    with RunLock(runs / "cli"):  # a training started from the command line
        with pytest.raises(ValueError, match="in use by a run that is still training"):
            delete_run(runs, runs / "cli")
    for bad in (runs, runs / "uploads", tmp_path, runs / ".." / "runs"):
        with pytest.raises(ValueError):
            delete_run(runs, bad)
    assert delete_run(runs, runs / "a", busy) == (runs / "a").resolve() and not (runs / "a").exists()
    assert (runs / "b").is_dir() and (runs / "cli").is_dir() and (runs / "uploads").is_dir()


def test_a_sample_job_shows_its_eta():
    from app.context import job_summary
    from app.jobs import Job

    job = Job(id=3, kind="sample", name="s", config={}, state="running", progress={
        "phase": "sampling", "done": 2, "total": 8, "seconds_per_image": 1.5, "eta": 9.0}, position=1, device="cpu",
        run_dir="/r", resume=False, error=None, worker_pid=None, created=0.0, started=1.0, finished=None)
    assert "sampling: 2 / 8 images · 1.5s/image · ETA 9.0s" in job_summary(job)
    from app.context import fmt_seconds

    assert [fmt_seconds(s) for s in (0.153, 0.0, 12.4, 75, 3700)] == ["0.15s", "0s", "12s", "1m 15s", "1h 01m"]
    job.kind, job.progress = "fuse", {"phase": "fusing (spatial)", "done": 30, "total": 40, "unit": "layers", "eta": 4.0}
    assert "fusing (spatial): 30 / 40 layers · ETA 4.0s" in job_summary(job)


def test_training_options_come_from_the_config_dataclasses_and_reach_the_yaml():
    from app.tab_train import OPTION_KEYS, base_config, form_to_config, option_fields
    from mixofshow.train.config import TrainLoopConfig

    fields = option_fields()
    assert tuple(fields) == OPTION_KEYS
    assert fields["train.noise_offset"][0] == TrainLoopConfig().noise_offset  # defaults are not typed again
    assert fields["data.buckets"] == (False, bool)
    form = ["run", "<robot1> <robot2>", "robot", "embedded", 64, "adamw", {}, 4, 2, 1, 1e-4, 1e-5, 1e-3, 1, -1, ""]
    chosen = {"train.mixed_precision": "bf16", "train.gradient_checkpointing": True, "data.buckets": True,
              "train.noise_offset": None}
    config = form_to_config(base_config(), "c.json", *form, options=chosen)
    assert config["train"]["mixed_precision"] == "bf16" and config["train"]["gradient_checkpointing"] is True
    assert config["data"]["buckets"] is True
    assert config["train"].get("noise_offset") == base_config()["train"].get("noise_offset")  # empty: unchanged
    from app.errors import UserError

    with pytest.raises(UserError, match="mixed_precision"):
        form_to_config(base_config(), "c.json", *form, options={"train.mixed_precision": "fp8"})


def test_picking_an_optimizer_offers_its_recommended_learning_rates():
    from app.tab_train import base_config, recommended_lrs

    example = base_config()
    assert recommended_lrs("lracs", example["optimizer"]) == (2e-3, 2e-4)  # not AdamW's 1e-4
    assert recommended_lrs("adamw", example["optimizer"]) == (1e-4, 1e-5)
    assert example["base_model"] == "toyworld"  # the form's defaults come from the shipped example
