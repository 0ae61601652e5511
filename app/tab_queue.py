"""The Queue tab: every job (running first, then the waiting queue in order, then the rest),
with reorder, cancel, resume and delete (confirmed; a running job is stopped first, and its folder
is never removed while it runs). The worker takes the top queued job when the device is free."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from app.context import AppContext, fmt_seconds
from app.errors import UserError
from app.runs import delete_run

__all__ = ["build_queue_tab", "jobs_table"]

_COLUMNS = ["id", "kind", "name", "state", "progress", "created", "time", "message"]


def _progress(job) -> str:
    p = job.progress
    if p.get("max_steps"):
        return f"{p.get('step', 0)}/{p['max_steps']}" + (f" ETA {fmt_seconds(p.get('eta'))}" if job.state == "running" else "")
    if p.get("total"):
        eta = f" ETA {fmt_seconds(p['eta'])}" if job.state == "running" and p.get("eta") is not None else ""
        return f"{p.get('done', 0)}/{p['total']} images{eta}"
    return p.get("phase", "")


def jobs_table(ctx: AppContext) -> pd.DataFrame:
    rows = []
    for j in ctx.store.jobs():
        took = (j.finished or time.time()) - j.started if j.started else None
        rows.append([j.id, j.kind, j.name, j.state, _progress(j),
                     time.strftime("%m-%d %H:%M", time.localtime(j.created)), fmt_seconds(took), j.error or ""])
    return pd.DataFrame(rows, columns=_COLUMNS)


def build_queue_tab(ctx: AppContext):
    gr.Markdown(f"One job at a time on **{ctx.device}**; the others wait here (top first). Jobs run in a "
                "worker process: closing this page does not stop them.")
    table = gr.Dataframe(jobs_table(ctx), headers=_COLUMNS, interactive=False, label="Jobs")
    with gr.Row():
        job_id = gr.Number(None, label="Job id (click a row)", precision=0)
        up = gr.Button("Move up")
        down = gr.Button("Move down")
        cancel = gr.Button("Cancel / stop")
        resume = gr.Button("Resume")
    with gr.Row():
        with_folder = gr.Checkbox(False, label="also delete its run folder")
        confirm = gr.Checkbox(False, label="yes, delete")
        delete = gr.Button("Delete job", variant="stop")
    details = gr.JSON(label="Job details")

    def info(jid):
        if not jid:
            return None
        try:
            j = ctx.store.get(int(jid))
        except ValueError as err:
            raise UserError(str(err)) from None
        return {"id": j.id, "kind": j.kind, "name": j.name, "state": j.state, "progress": j.progress,
                "run_dir": j.run_dir, "error": j.error, "resume": j.resume, "started": j.started,
                "finished": j.finished, "config": j.config}

    def act(kind):
        def fn(jid):
            if not jid:
                raise UserError("enter a job id from the table")
            try:
                if kind == "up":
                    ctx.store.move(int(jid), -1)
                elif kind == "down":
                    ctx.store.move(int(jid), 1)
                elif kind == "cancel":
                    gr.Info(f"job #{int(jid)}: {ctx.store.cancel(int(jid))}", duration=4)
                else:
                    ctx.store.resume(int(jid))
            except ValueError as err:
                raise UserError(str(err)) from None
            return jobs_table(ctx), info(jid)
        return fn

    for btn, kind in ((up, "up"), (down, "down"), (cancel, "cancel"), (resume, "resume")):
        btn.click(act(kind), job_id, [table, details], api_name=f"queue_{kind}")

    def on_delete(jid, folder_too: bool, confirmed: bool):
        if not jid:
            raise UserError("enter a job id from the table")
        if not confirmed:
            raise UserError("tick 'yes, delete' to delete the job" + (" and its run folder" if folder_too else ""))
        try:
            job = ctx.store.delete(int(jid))
            message = f"job #{job.id} deleted"
            if folder_too and Path(job.run_dir).is_dir():
                busy = {Path(j.run_dir) for j in ctx.store.jobs() if j.state == "running"}
                message += f"; removed {delete_run(ctx.runs_dir, job.run_dir, busy)}"
        except ValueError as err:
            raise UserError(str(err)) from None
        gr.Info(message, duration=4)
        return jobs_table(ctx), None, False

    delete.click(on_delete, [job_id, with_folder, confirm], [table, details, confirm], api_name="queue_delete")
    def on_select(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    table.select(on_select, None, job_id, api_visibility="private")
    job_id.change(info, job_id, details, api_visibility="private")
    gr.Button("Job details", size="sm", visible=False).click(info, job_id, details, api_name="job_info")
    gr.Timer(1.0).tick(lambda: jobs_table(ctx), None, table, api_visibility="private", show_progress="hidden")
    return table
