"""What every tab shares: the runs folder, the job store, the worker's device, small formatters."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from app.jobs import Job, JobStore
from app.runs import inside

__all__ = ["AppContext", "base_model_choices", "fmt_seconds", "job_choices", "job_summary", "unique_name"]


@dataclass
class AppContext:
    runs_dir: Path
    store: JobStore
    device: str
    models_dir: Path | None = None  # base models the Train tab offers (`mixofshow app --models-dir`)

    def path(self, value: str | Path) -> Path:
        """A path the page sent back, checked to lie inside the runs folder."""
        return inside(self.runs_dir, value)


def base_model_choices(ctx: AppContext) -> list[str]:
    """The base-model picker: the toy world (when its weights are installed), the embedded model,
    then the diffusers folders and ``.safetensors`` files in ``--models-dir``."""
    from mixofshow.models.pretrained import toyworld_weights_dir

    names = (["toyworld"] if (toyworld_weights_dir() / "manifest.json").is_file() else []) + ["embedded"]
    if ctx.models_dir is not None and ctx.models_dir.is_dir():
        for entry in sorted(ctx.models_dir.iterdir()):
            if (entry / "model_index.json").is_file() or (entry.is_file() and entry.suffix == ".safetensors"):
                names.append(str(entry))
    return names


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 9.95:  # a toy-world step takes a fraction of a second: "0.15s", not "0s"
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def unique_name(ctx: AppContext, name: str, parent: Path) -> str:
    """``name`` made safe for a folder and not used by another run or job yet."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip(".-") or "run"
    taken = {Path(j.run_dir).name for j in ctx.store.jobs()}
    candidate, n = safe, 1
    while candidate in taken or (parent / candidate).exists():
        n += 1
        candidate = f"{safe}-{n}"
    return candidate


def job_choices(ctx: AppContext, kind: str | None = None) -> list[tuple[str, str]]:
    return [(j.label, str(j.id)) for j in ctx.store.jobs(kind)]


def job_summary(job: Job) -> str:
    """One Markdown paragraph: state, progress, ETA, error."""
    p = job.progress
    lines = [f"**#{job.id} {job.kind} `{job.name}`**: {job.state}"]
    if job.kind == "train" and p.get("step") is not None:
        loss = f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "-"
        lines.append(f"step {p['step']} / {p.get('max_steps')} · loss {loss} · "
                     f"{fmt_seconds(p.get('seconds_per_step'))}/step · ETA {fmt_seconds(p.get('eta')) if job.state == 'running' else '-'}")
    elif job.kind == "compare" and p.get("phase"):
        where = f" `{p['run']}` {p.get('step', 0)} / {p.get('total', 0)}" if p.get("run") else ""
        eta = fmt_seconds(p.get("eta")) if job.state == "running" else "-"
        lines.append(f"{p['phase']}{where} · runs done {p.get('runs_done', 0)} / {p.get('runs_total', 0)} · ETA {eta}")
        if p.get("clip_note"):  # the whole message is in the comparison's notes, once
            lines.append("CLIP scores n/a: no CLIP weights on this machine "
                         "(the comparison's notes say how to give them)")
    elif p.get("total"):
        rate = f" · {fmt_seconds(p['seconds_per_image'])}/image" if p.get("seconds_per_image") is not None else ""
        eta = f"{rate} · ETA {fmt_seconds(p.get('eta'))}" \
            if job.state == "running" and p.get("eta") is not None else ""
        lines.append(f"{p.get('phase', '')}: {p.get('done', 0)} / {p['total']} {p.get('unit', 'images')}{eta}")
    elif p.get("phase"):
        lines.append(str(p["phase"]))
    if job.started:
        end = job.finished or time.time()
        lines.append(f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.started))} · "
                     f"{fmt_seconds(end - job.started)}")
    if job.error:
        lines.append(f"⚠ {job.error}")
    if job.state in ("stopped", "interrupted") and job.kind in ("train", "compare"):
        lines.append("Resume continues from the last checkpoint" + (" (finished runs are kept)." if job.kind == "compare" else "."))
    lines.append(f"run folder: `{job.run_dir}`")
    return "  \n".join(lines)
