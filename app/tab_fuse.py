"""The Fuse tab: pick trained concepts and their weights, queue a fusion job, watch it.

The job runs ``mixofshow.fuse.run.fuse_concepts`` (the same as ``mixofshow fuse CONFIG``); the
fused file lands in ``<runs>/fused/<name>/<name>.safetensors`` and appears in the Sample tab.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.context import AppContext, job_choices, job_summary, unique_name
from app.errors import UserError
from app.runs import list_runs

__all__ = ["build_fuse_tab"]

_COLUMNS = ["concept file", "text_encoder_alpha", "unet_alpha"]


def _trained(ctx: AppContext) -> list[tuple[str, str]]:
    return [(f"{r.name} ({r.concept.name})", str(r.concept)) for r in list_runs(ctx.runs_dir)
            if r.kind == "train" and r.concept is not None]


def _short(ctx: AppContext, file: str) -> str:
    """A concept file as the table shows it: relative to the runs folder."""
    try:
        return str(ctx.path(file).relative_to(ctx.runs_dir.resolve()))
    except ValueError:
        return file


def build_fuse_tab(ctx: AppContext):
    from mixofshow.fuse.config import METHODS

    with gr.Row():
        with gr.Column(scale=3):
            concepts = gr.CheckboxGroup(_trained(ctx), label="Trained concepts (usually two or more)")
            refresh_btn = gr.Button("Refresh list", size="sm")
            weights = gr.Dataframe(pd.DataFrame(columns=_COLUMNS), headers=_COLUMNS, label="Weights per concept",
                                   interactive=True, column_widths=["60%", "20%", "20%"])
            with gr.Row():
                method = gr.Dropdown(list(METHODS), value="closed-form", label="Method")
                name = gr.Textbox("fused", label="Fused model name")
            submit = gr.Button("Queue fusion", variant="primary")
        with gr.Column(scale=2):
            job = gr.Dropdown(job_choices(ctx, "fuse"), label="Fusion job", allow_custom_value=True)
            status = gr.Markdown("No fusion job yet.")

    refresh_btn.click(lambda: gr.update(choices=_trained(ctx)), None, concepts, api_visibility="private")

    def on_pick(files, table):
        old = {row[0]: row for row in (table.values.tolist() if isinstance(table, pd.DataFrame) else table or [])}
        rows = [old.get(_short(ctx, f), [_short(ctx, f), 1.0, 1.0]) for f in files or []]
        return pd.DataFrame(rows, columns=_COLUMNS)

    concepts.change(on_pick, [concepts, weights], weights, api_visibility="private")

    def on_submit(files, table, method_name, fused_name):
        rows = table.values.tolist() if isinstance(table, pd.DataFrame) else list(table or [])
        rows = [r for r in rows if r and r[0]] or [[f, 1.0, 1.0] for f in files or []]
        if not rows:
            raise UserError("pick at least one trained concept")
        entries = []
        for file, te, un in rows:
            try:
                path = ctx.path(ctx.runs_dir / file)
                entries.append({"file": str(path), "text_encoder_alpha": float(te), "unet_alpha": float(un)})
            except (TypeError, ValueError) as err:
                raise UserError(f"{file}: {err}") from None
            if not path.is_file():
                raise UserError(f"{file}: no such concept file")
        folder = unique_name(ctx, fused_name or "fused", ctx.runs_dir / "fused")
        run_dir = ctx.runs_dir / "fused" / folder
        config = {"concepts": entries, "method": method_name, "output": str(run_dir / f"{folder}.safetensors")}
        from mixofshow.fuse.config import FuseConfig
        from mixofshow.utils.config import from_dict

        try:
            from_dict(FuseConfig, dict(config), where="fusion form")
        except ValueError as err:
            raise UserError(str(err)) from None
        j = ctx.store.submit("fuse", folder, {"fuse": config}, str(run_dir), ctx.device)
        gr.Info(f"queued job #{j.id}: fuse {len(entries)} concepts", duration=4)
        return gr.update(choices=job_choices(ctx, "fuse"), value=str(j.id)), str(j.id)

    submit.click(on_submit, [concepts, weights, method, name], [job, gr.Textbox(visible=False)], api_name="fuse_submit")

    def refresh(job_id):
        choices = job_choices(ctx, "fuse")
        job_id = job_id or (choices[0][1] if choices else None)
        if not job_id:
            return gr.update(choices=choices), "No fusion job yet."
        j = ctx.store.get(int(job_id))
        return gr.update(choices=choices, value=str(j.id)), job_summary(j)

    gr.Timer(2.0).tick(refresh, job, [job, status], api_visibility="private", show_progress="hidden")
    job.change(refresh, job, [job, status], api_visibility="private", show_progress="hidden")
    return concepts
