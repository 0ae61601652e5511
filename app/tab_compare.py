"""The Compare tab: optimizers x seeds on one concept -> a compare job, live curves, the report.

The job runs ``mixofshow.evaluate.compare`` (what ``mixofshow compare`` runs; README "Evaluation
and optimizer comparison") into ``<runs>/compare/<name>/``. The base training config is a
shipped concept on ``configs/example.yaml`` (as in the Train tab) or a training YAML (upload or a
path on the server; it may hold an ``optimizers:`` lr table). The loss curves are read from each
run folder's ``compare_losses.json`` / ``metrics.json``, which the training rewrites at every
checkpoint, and drawn with the report's own chart (``live_loss_curves.png``); when the job is done the tab shows ``comparison.md`` and the PNGs beside it.
Stop cancels the comparison after a checkpoint; Resume continues it (finished runs are kept).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from app.context import AppContext, job_choices, job_summary, unique_name
from app.errors import UserError
from app.runs import confined
from app.tab_train import _absolute, base_config, job_command, shipped_concepts

__all__ = ["build_compare_tab", "compare_request", "live_plot", "loss_curves"]

SOURCES = ("shipped concept", "training YAML")
_PLOTS = ("loss_curves.png", "scores.png", "grid.png")
_LIVE = "live_loss_curves.png"  # drawn by the page from the run folders, beside compare's own files


def live_plot(compare_dir: str | Path, cache: dict[str, Any]) -> str | None:
    """``<compare_dir>/live_loss_curves.png`` (README report's loss chart), redrawn when a run saved losses."""
    from mixofshow.evaluate.report import plot_losses

    folder = Path(compare_dir)
    frame = loss_curves(folder)
    if frame.empty:
        return None
    key = (str(folder), len(frame), float(frame["loss"].sum()))
    path = folder / _LIVE
    if cache.get("key") != key or not path.is_file():
        curves: dict[str, list[tuple[int, list[float]]]] = {}
        for run, rows in frame.groupby("run", sort=True):
            real = confined(folder, folder / "runs" / run / "config.yaml")
            try:
                saved = (yaml.safe_load(real.read_text(encoding="utf-8")) or {}) if real else {}
            except (OSError, yaml.YAMLError):
                saved = {}
            name = (saved.get("optimizer") or {}).get("name", run)
            curves.setdefault(name, []).append((saved.get("seed", "?"), rows["loss"].tolist()))
        plot_losses(curves, path)
        cache["key"] = key
    return str(path)


def _yaml_config(upload, server_path: str, runs_dir: Path) -> dict[str, Any]:
    """The uploaded YAML, or a file on the server inside the runs folder (symlinks resolved).

    Errors name the file and the line, never quote its content.
    """
    if upload:
        path = Path(upload)
    elif server_path and server_path.strip():
        path = confined(runs_dir, server_path.strip())
        if path is None:
            raise UserError(f"training YAML {server_path.strip()!r}: a file on the server must lie inside the "
                           f"app's runs folder {runs_dir} (or upload it)")
    else:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"training YAML {str(path or '')!r}: upload one or give a file on the server")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path.name}: not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path.name}: not a readable text file ({type(err).__name__})") from None
    if not isinstance(data, dict) or "data" not in data or "concept" not in data:
        raise UserError(f"{path.name}: not a training config (expected data: and concept: sections)")
    return _absolute(data, path.parent)


def _shipped_config(name: str, resolution, prompts: list[str]) -> dict[str, Any]:
    shipped = shipped_concepts()
    if name not in shipped:
        raise UserError(f"shipped concept {name!r}: pick one of {', '.join(shipped)}")
    data = base_config(name)  # its shipped config: words, class word and world prompts of its own
    data["data"].update(concept_list=str(shipped[name]), resolution=int(resolution))
    if prompts:
        data["validation"].update(prompts=prompts, prompts_file=None)
    return data


def compare_request(source: str, concept: str, upload, server_path: str, resolution, optimizers: list[str],
                    seeds: str, steps, prompts: str, num_images, sample_steps, heldout_draws, clip: str,
                    clip_weights: str, *, runs_dir: Path) -> dict[str, Any]:
    """The compare job's config: ``{"train": training YAML dict, "optimizers", "seeds", "steps", "options"}``;
    a server-side YAML must lie inside ``runs_dir``."""
    from mixofshow.evaluate.plan import COMPARE_KEYS, check_names
    from mixofshow.train.config import TrainConfig
    from mixofshow.utils.config import from_dict

    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    data = _shipped_config(concept, resolution, lines) if source == SOURCES[0] else _yaml_config(upload, server_path, runs_dir)
    data.pop("output_dir", None)
    try:
        names = check_names(list(optimizers or []))
        seed_list = [int(s) for s in str(seeds).replace(",", " ").split()]
    except ValueError as err:
        raise UserError(str(err) if optimizers else "optimizers: tick at least one") from None
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise UserError(f"seeds {seeds!r}: expected distinct integers, e.g. 0, 1, 2")
    if int(steps) < 1:
        raise UserError(f"steps: expected a positive number, got {steps}")
    train = data.setdefault("train", {})
    train["checkpoint_every"] = max(1, min(int(train.get("checkpoint_every") or steps), int(steps)))
    check = {k: v for k, v in copy.deepcopy(data).items() if k not in COMPARE_KEYS}
    try:
        from_dict(TrainConfig, check, where="compare base config")
    except ValueError as err:
        raise UserError(str(err)) from None
    options: dict[str, Any] = {"num_images": int(num_images), "sample_steps": int(sample_steps),
                               "heldout_draws": int(heldout_draws), "clip": clip.strip() or None,
                               "clip_weights": clip_weights.strip() or None}
    if source != SOURCES[0] and lines:
        options["prompts"] = lines
    return {"train": data, "optimizers": names, "seeds": seed_list, "steps": int(steps), "options": options}


def loss_curves(compare_dir: str | Path) -> pd.DataFrame:
    """step / loss / run rows of every run folder under ``<compare_dir>/runs`` (as saved so far)."""
    rows = []
    for run in sorted((Path(compare_dir) / "runs").glob("*/")):
        losses = []
        for name in ("compare_losses.json", "metrics.json"):
            try:
                real = confined(compare_dir, run / name)
                losses = (json.loads(real.read_text(encoding="utf-8")).get("losses") or []) if real else []
            except (OSError, ValueError):
                continue
            if losses:
                break
        rows += [(i + 1, float(x), run.name) for i, x in enumerate(losses) if x is not None]
    frame = pd.DataFrame(rows, columns=["step", "loss", "run"])
    return frame.astype({"step": "int64", "loss": "float64", "run": "str"})  # typed even when empty (the plot's axes)


def _report(compare_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    md = confined(compare_dir, compare_dir / "comparison.md")
    text = md.read_text(encoding="utf-8") if md and md.is_file() else "The report appears here when the comparison is done."
    return text, [(str(compare_dir / p), p) for p in _PLOTS if confined(compare_dir, compare_dir / p) and (compare_dir / p).is_file()]


def build_compare_tab(ctx: AppContext) -> None:
    from mixofshow.optim.registry import SPECS

    shipped = shipped_concepts()
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### Base training config")
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Concept")
            concept = gr.Dropdown(list(shipped), value="robot" if "robot" in shipped else None, label="Shipped concept")
            with gr.Group(visible=False) as yaml_box:
                upload = gr.File(label="Training YAML (may hold an optimizers: lr table)", file_types=[".yaml", ".yml"])
                server_path = gr.Textbox(label="...or a training YAML on the server")
            name = gr.Textbox("compare", label="Comparison name")
            gr.Markdown("### Runs")
            optimizers = gr.CheckboxGroup(sorted(SPECS), value=["adamw", "scaled_adamw"], label="Optimizers")
            with gr.Row():
                seeds = gr.Textbox("0, 1, 2", label="Seeds")
                steps = gr.Number(base_config()["train"]["max_steps"], label="Steps per run", precision=0)
                resolution = gr.Number(base_config()["data"]["resolution"], label="Resolution (shipped concept)",
                                       precision=0)
            gr.Markdown("### Sampling and scores")
            prompts = gr.Textbox("", lines=2, label="Prompts (one per line; empty: the config's validation prompts)")
            with gr.Row():
                num_images = gr.Number(2, label="Images per prompt", precision=0)
                sample_steps = gr.Number(20, label="Sampler steps", precision=0)
                heldout = gr.Number(16, label="Held-out loss draws", precision=0)
            with gr.Row():
                clip = gr.Textbox("", label="CLIP model (empty: the toy world's own on the toy world, else "
                                  "ViT-B-32-quickgelu; 'tiny': random, a pipeline check)")
                clip_weights = gr.Textbox("", label="CLIP weights (empty: openai; missing: scores n/a)")
            submit = gr.Button("Queue comparison", variant="primary", elem_id="compare-submit")
        with gr.Column(scale=3):
            job = gr.Dropdown(job_choices(ctx, "compare"), label="Compare job", allow_custom_value=True)
            status = gr.Markdown("No comparison yet.", elem_id="compare-status")
            with gr.Row():
                stop = gr.Button("Stop (checkpoint)", size="sm")
                resume = gr.Button("Resume", size="sm")
            plot = gr.Image(label="Training loss per run (updated at each checkpoint)", height=320,
                            interactive=False, elem_id="compare-curves")
    report = gr.Markdown("The report appears here when the comparison is done.", elem_id="compare-report")
    plots = gr.Gallery(label="Loss curves, scores, image grid", columns=3, height=320, elem_id="compare-plots")

    source.change(lambda s: (gr.update(visible=s == SOURCES[0]), gr.update(visible=s == SOURCES[1])),
                  source, [concept, yaml_box], api_visibility="private")
    job_id_out = gr.Textbox(visible=False)

    def on_submit(*values):
        title, rest = values[0], values[1:]
        request = compare_request(*rest, runs_dir=ctx.runs_dir)
        run = unique_name(ctx, title or "compare", ctx.runs_dir / "compare")
        j = ctx.store.submit("compare", run, {"compare": request}, str(ctx.runs_dir / "compare" / run), ctx.device)
        gr.Info(f"queued job #{j.id}: compare {run}", duration=4)
        return gr.update(choices=job_choices(ctx, "compare"), value=str(j.id)), str(j.id)

    submit.click(on_submit, [name, source, concept, upload, server_path, resolution, optimizers, seeds, steps,
                             prompts, num_images, sample_steps, heldout, clip, clip_weights],
                 [job, job_id_out], api_name="compare_submit")

    def refresh(job_id):
        choices = job_choices(ctx, "compare")
        if not job_id and choices:
            job_id = choices[0][1]
        if not job_id:
            return (gr.update(choices=choices), "No comparison yet.", None,
                    "The report appears here when the comparison is done.", [])
        j = ctx.store.get(int(job_id))
        text, images = _report(Path(j.run_dir))
        return gr.update(choices=choices, value=str(j.id)), job_summary(j), live_plot(j.run_dir, cache), text, images

    cache: dict[str, Any] = {}
    monitor = [job, status, plot, report, plots]
    gr.Timer(1.0).tick(refresh, job, monitor, api_visibility="private", show_progress="hidden")
    job.change(refresh, job, monitor, api_name="compare_refresh", show_progress="hidden")

    stop.click(job_command(ctx, "stop", "compare"), job, job_id_out, api_name="compare_stop")
    resume.click(job_command(ctx, "resume", "compare"), job, job_id_out, api_name="compare_resume")
