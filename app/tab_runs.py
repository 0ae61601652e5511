"""The Runs tab: every run in the runs folder (made by the app or the CLI) with its config,
metrics, samples and log, and downloads of the concept (safetensors, diffusers or kohya layout,
written by ``mixofshow.concepts.export``)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from app.context import AppContext
from app.errors import UserError
from app.runs import delete_run, images_of, list_runs, read_text

__all__ = ["build_runs_tab", "export_concept"]

FORMATS = ("safetensors", "diffusers", "kohya")


def export_concept(ctx: AppContext, concept: Path, fmt: str) -> list[str]:
    """The files to download for ``concept`` in ``fmt`` (exports go to ``<run>/exports/``)."""
    from mixofshow.concepts.export import export_diffusers_lora, export_kohya_lora

    if fmt == "safetensors":
        return [str(concept)]
    out = concept.parent / "exports" / f"{concept.stem}.{fmt}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    lora, emb = (export_diffusers_lora if fmt == "diffusers" else export_kohya_lora)(concept, out)
    files = [lora, emb]
    if fmt == "kohya" and emb is not None:  # A1111 / ComfyUI: the LoRA and a textual-inversion embedding
        from mixofshow.concepts.export import export_textual_inversion, textual_inversion_path
        from mixofshow.concepts.io import load_concept

        loaded = load_concept(concept)
        files.append(export_textual_inversion(loaded, textual_inversion_path(lora, loaded)))
    return [str(p) for p in files if p is not None]


def build_runs_tab(ctx: AppContext):
    with gr.Row():
        run = gr.Dropdown([], label="Run", scale=4, allow_custom_value=True)
        refresh_btn = gr.Button("Refresh", size="sm", scale=1)
    with gr.Row():
        with gr.Column():
            summary = gr.Markdown("")
            metrics = gr.JSON(label="metrics.json / index.json")
            plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Loss", height=200)
            with gr.Row():
                fmt = gr.Radio(list(FORMATS), value="safetensors", label="Concept file format")
                export_btn = gr.Button("Download concept")
            with gr.Row():
                confirm = gr.Checkbox(False, label="yes, delete this run's folder")
                delete_btn = gr.Button("Delete run", variant="stop", size="sm")
            gr.Markdown("**kohya** gives three files: the LoRA (A1111: `models/Lora`, ComfyUI: `models/loras`), "
                        "`<word>_edlora.safetensors`, a textual-inversion embedding of the concept words with the "
                        "layer-wise tokens averaged (A1111: `embeddings/`, ComfyUI: `models/embeddings`; its file "
                        "name is the trigger word), and the layer-wise embeddings only this package reads.")
            files = gr.File(label="Files", file_count="multiple", interactive=False)
        with gr.Column():
            config = gr.Code(label="Config", language="yaml")
            gallery = gr.Gallery(label="Samples", columns=4, height=260)
            logs = gr.Textbox(label="Log (app.log)", lines=8, max_lines=8)

    def choices():
        return [(r.label, str(r.path)) for r in list_runs(ctx.runs_dir)]

    def on_refresh(current):
        c = choices()
        return gr.update(choices=c, value=current if current in [v for _, v in c] else (c[0][1] if c else None))

    refresh_btn.click(on_refresh, run, run, api_name="runs_list")

    def show(path):
        if not path:
            return "No run selected.", None, pd.DataFrame({"step": [], "loss": []}), "", [], ""
        try:
            folder = ctx.path(path)
        except ValueError as err:
            raise UserError(str(err)) from None
        info = next((r for r in list_runs(ctx.runs_dir) if r.path.resolve() == folder), None)
        if info is None:
            raise UserError(f"{path}: no run there any more")
        cfg = read_text(ctx.runs_dir, folder / "config.yaml") or read_text(ctx.runs_dir, folder / "app_request.yaml")
        losses = info.metrics.get("losses") if isinstance(info.metrics.get("losses"), list) else []
        frame = pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses})
        text = f"**{info.label}**  \nfolder: `{folder}`  \nconcept: `{info.concept or '-'}`"
        shown = {k: v for k, v in info.metrics.items() if k not in ("losses", "images")}
        if info.kind == "samples":
            shown["images"] = len(info.metrics.get("images", []))
        imgs = [(str(p), p.name) for p in images_of(ctx.runs_dir, folder, limit=40)]
        return text, json.loads(json.dumps(shown)), frame, cfg, imgs, read_text(ctx.runs_dir, folder / "app.log")

    run.change(show, run, [summary, metrics, plot, config, gallery, logs], api_name="runs_show")

    def on_export(path, kind):
        if not path:
            raise UserError("pick a run first")
        info = next((r for r in list_runs(ctx.runs_dir) if r.path.resolve() == ctx.path(path)), None)
        if info is None or info.concept is None:
            raise UserError("this run has no concept file (yet)")
        if info.kind == "fused" and kind != "safetensors":
            raise UserError("a fused model downloads as its .safetensors file (diffusers/kohya export is for concepts)")
        try:
            return export_concept(ctx, info.concept, kind)
        except ValueError as err:
            raise UserError(str(err)) from None

    export_btn.click(on_export, [run, fmt], files, api_name="runs_export")

    def on_delete(path, confirmed: bool):
        if not path:
            raise UserError("pick a run first")
        if not confirmed:
            raise UserError("tick 'yes, delete this run's folder' to delete it")
        busy = {Path(j.run_dir) for j in ctx.store.jobs() if j.state == "running"}
        try:
            removed = delete_run(ctx.runs_dir, path, busy)
        except ValueError as err:
            raise UserError(str(err)) from None
        gr.Info(f"removed {removed}", duration=4)
        return on_refresh(None), False

    delete_btn.click(on_delete, [run, confirm], [run, confirm], api_name="runs_delete")
    return run, on_refresh
