"""``compare``: train one concept with several LoRA optimizers under equal conditions and report.

Recipe (README "Evaluation and optimizer comparison"):

1. plan one ordinary run folder per (optimizer, seed): same config, data, seeds and step budget;
   learning rates from the config's ``optimizers:`` table, else the registry's
   ``recommended_lr``, else the config (``plan.py``);
2. optional lr grid: each optimizer at each factor of its lr, seed = the first seed, scored on
   the held-out denoising loss (``heldout.py``); the best factor is used for the real runs;
3. run them (in this process, or in worker processes / on several devices, one run each);
   finished runs are skipped, unfinished ones resume; each is sampled with the same prompts
   and sampling seeds and measured on the same held-out draws (``runner.py``);
4. score every run's samples with CLIP (and DINO when given), as ``evaluate`` does; without
   CLIP weights the scores are ``n/a`` with the reason, everything else is still reported;
5. write ``comparison.csv``, ``comparison.md``, ``comparison.json``, ``loss_curves.png``,
   ``scores.png`` and ``grid.png`` (``report.py``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixofshow.evaluate.plan import COMPARE_KEYS, RunPlan, check_names, read_optimizers_table, run_plan
from mixofshow.evaluate.progress import Cancelled, Progress
from mixofshow.evaluate.runner import SampleSettings, read_json, run_all

__all__ = ["CompareResult", "compare"]

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    output_dir: Path
    cancelled: bool
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per run (comparison.csv)
    summary: list[dict[str, Any]] = field(default_factory=list)  # per optimizer, mean/std over seeds
    files: dict[str, Path] = field(default_factory=dict)
    clip_note: str | None = None  # why CLIP scores are n/a, if they are


class _Tracker:
    """Turns per-run step reports into Progress with an ETA over the whole comparison."""

    def __init__(self, plans: list[RunPlan], workers: int, progress, phase: str) -> None:
        self.total = {p.name: p.steps for p in plans}
        self.done = {p.name: 0 for p in plans}
        self.progress, self.phase, self.workers = progress, phase, max(1, workers)
        self.first: tuple[float, int] | None = None

    def __call__(self, run: str, phase: str, step: int, total: int) -> None:
        if phase == "train":
            self.done[run] = step
            if self.first is None:
                self.first = (time.perf_counter(), sum(self.done.values()))
        else:
            self.done[run] = self.total.get(run, 0)
        if self.progress is None:
            return
        eta = None
        steps_done = sum(self.done.values())
        if self.first is not None and steps_done > self.first[1]:
            rate = (time.perf_counter() - self.first[0]) / (steps_done - self.first[1])
            eta = rate * (sum(self.total.values()) - steps_done) / self.workers
        runs_done = sum(1 for r in self.done if self.done[r] >= self.total[r])
        self.progress(Progress(self.phase if phase == "train" else phase, run, step, total,
                               runs_done, len(self.total), eta))


def _references(config) -> list[Path]:
    from mixofshow.data import load_concept_list
    from mixofshow.evaluate.prompts import list_images

    return [p for source in load_concept_list(config.data.concept_list) for p in list_images(source.instance_data_dir)]


def _load_scorer(clip, clip_weights, device):
    from mixofshow.evaluate.clip import ClipSpec, MissingWeightsError, load_clip

    spec = clip if isinstance(clip, ClipSpec) else ClipSpec(model=clip or ClipSpec.model, weights=clip_weights)
    try:
        return load_clip(spec, device), None
    except MissingWeightsError as err:
        return None, str(err)


def _score(plans, scorer, refs, dino_weights, progress, should_stop) -> None:
    from mixofshow.evaluate.scores import evaluate

    for i, plan in enumerate(plans):
        out = Path(plan.output_dir)
        old = read_json(out / "scores.json")
        dino_want = str(dino_weights) if dino_weights else None
        if old.get("clip") == scorer.info and (old.get("dino") or {}).get("weights") == dino_want:
            continue
        if progress is not None:
            progress(Progress("score", plan.name, 0, 0, i, len(plans)))
        evaluate(out / "eval_samples", refs, dino_weights=dino_weights, out=out / "scores",
                 scorer=scorer, should_stop=should_stop)


def _row(plan: RunPlan, clip_info: dict[str, Any] | None, status: str = "done") -> dict[str, Any]:
    out = Path(plan.output_dir)
    metrics, record = read_json(out / "metrics.json"), read_json(out / "compare_losses.json")
    timed = [s for s in record.get("step_seconds", []) if s is not None]
    scores = read_json(out / "scores.json").get("overall", {}) if clip_info and status == "done" else {}
    diverged = status == "diverged"
    row = {
        "optimizer": plan.optimizer, "seed": plan.seed, "status": status, "error": metrics.get("error"),
        "run_dir": str(out), "lr_unet": plan.lr_unet,
        "lr_text_encoder": plan.lr_text_encoder, "lr_source": plan.lr_source, "steps": metrics.get("steps"),
        "final_loss": metrics.get("final_loss"), "mean_loss_last_10": metrics.get("mean_loss_last_10"),
        "heldout_loss": math.nan if diverged else read_json(out / "heldout.json").get("loss"),
        "seconds_per_step": metrics.get("seconds_per_step", sum(timed) / len(timed) if timed else None),
        "optimizer_step_seconds": metrics.get("optimizer_step_seconds"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "clip_model": clip_info["model"] if clip_info else "n/a",
        "clip_weights": clip_info["weights"] if clip_info else "n/a",
        "losses": metrics.get("losses") or record.get("losses", []),
    }
    for key in ("clip_t", "clip_t_cos", "clip_i", "clip_i_cos", "dino", "identity"):
        row[key] = (scores.get(key) or {}).get("mean")
    if diverged:
        row["final_loss"] = math.nan  # metrics.json stores the non-finite loss as null
        if clip_info:
            row.update({k: math.nan for k in ("clip_t", "clip_t_cos", "clip_i", "clip_i_cos")})
    return row


def _grid_choice(config_path, plans, settings, report, should_stop, jobs, devices, factors):
    """Run the grid; returns (factor per optimizer, grid table rows) or None when cancelled."""
    status = run_all(config_path, plans, settings, report, should_stop, jobs, devices)
    if any(s == "stopped" for s in status.values()):
        return None  # a diverged grid run has no held-out loss and is never chosen
    rows, best = [], {}
    for plan, factor in zip(plans, factors):
        loss = read_json(Path(plan.output_dir) / "heldout.json").get("loss")
        rows.append({"optimizer": plan.optimizer, "factor": factor, "lr_unet": plan.lr_unet,
                     "lr_text_encoder": plan.lr_text_encoder, "heldout_loss": loss, "chosen": False})
        if loss is not None and (plan.optimizer not in best or loss < best[plan.optimizer][1]):
            best[plan.optimizer] = (factor, loss)
    for r in rows:
        r["chosen"] = best.get(r["optimizer"], (None,))[0] == r["factor"]
    return {name: f for name, (f, _) in best.items()}, rows


def compare(
    config: str | Path,
    optimizers: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    output_dir: str | Path | None = None,
    jobs: int = 1,
    devices: Sequence[str] | None = None,
    lr_grid: Sequence[float] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    prompts: Sequence[str] | None = None,
    num_images: int = 2,
    sample_seed: int = 0,
    sample_steps: int | None = None,
    scheduler: str = "ddim",
    guidance_scale: float | None = None,
    heldout_draws: int = 16,
    grid_steps: int | None = None,
    clip: Any = None,
    clip_weights: str | None = None,
    dino_weights: str | Path | None = None,
) -> CompareResult:
    """Compare LoRA optimizers on the concept of training config ``config`` (module docstring).

    ``lr_grid`` holds factors of each optimizer's lr (e.g. ``[0.3, 1, 3]``); ``progress`` gets
    :class:`~mixofshow.evaluate.progress.Progress` reports (phase, run, step, ETA);
    ``should_stop() -> True`` checkpoints the running runs and returns ``cancelled=True``;
    calling again with the same arguments resumes. ``clip`` None: the toy world's evaluation CLIP
    when the base model is ``toyworld``, else ViT-B-32.
    """
    from mixofshow.train.config import load_train_config
    from mixofshow.train.validation import validation_prompts

    # 1. plan
    config_path = str(config)
    base = load_train_config(config_path, ignore=COMPARE_KEYS)
    table = read_optimizers_table(config_path)
    optimizers = check_names(list(optimizers))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers, got {seeds}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    steps = steps or base.train.max_steps
    if clip is None and clip_weights is None and base.base_model == "toyworld":
        clip = "toyworld"  # the world's own evaluation CLIP (shipped): scores that mean something offline
    out = Path(output_dir or f"runs/compare_{base.name}")
    devices = list(devices) if devices else None
    prompts = list(prompts) if prompts else validation_prompts(base)
    if not prompts:
        raise ValueError(f"{config_path}: no prompts to sample; set validation.prompts or validation.prompts_file, or pass --prompts")
    settings = SampleSettings(prompts, num_images, sample_seed, sample_steps or base.validation.steps,
                              guidance_scale if guidance_scale is not None else base.validation.guidance_scale,
                              scheduler, heldout_draws)
    workers = len(devices) if devices else jobs
    from mixofshow.sample.pipeline import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {scheduler!r}: expected one of {sorted(SCHEDULERS)}")

    def cancelled() -> CompareResult:
        if progress is not None:
            progress(Progress("cancelled", message="cancelled; call again to resume"))
        return CompareResult(out, True)

    # 2. learning-rate grid
    factors, grid_info = None, None
    if lr_grid:
        grid_plans, grid_factors = [], []
        for f in lr_grid:
            for p in run_plan(base, table, optimizers, seeds[:1], grid_steps or steps, out / "grid" / f"x{f:g}",
                              {n: float(f) for n in optimizers}, kind="grid"):
                p.name = f"grid x{f:g} {p.name}"
                grid_plans.append(p)
                grid_factors.append(float(f))
        chosen = _grid_choice(config_path, grid_plans, settings, _Tracker(grid_plans, workers, progress, "lr-grid"),
                              should_stop, jobs, devices, grid_factors)
        if chosen is None:
            return cancelled()
        factors, grid_rows = chosen
        grid_info = {"seed": seeds[0], "steps": grid_steps or steps, "rows": grid_rows}

    # 3. the runs
    plans = run_plan(base, table, optimizers, seeds, steps, out, factors)
    status = run_all(config_path, plans, settings, _Tracker(plans, workers, progress, "train"),
                     should_stop, jobs, devices)
    if any(s == "stopped" for s in status.values()):
        return cancelled()
    finished = [p for p in plans if status[p.name] == "done"]

    # 4. scores
    import torch

    device = devices[0] if devices else (base.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer, clip_note = _load_scorer(clip, clip_weights, device)
    if scorer is not None:
        try:
            _score(finished, scorer, _references(base), dino_weights, progress, should_stop)
        except Cancelled:
            return cancelled()
    return _write(out, config_path, base, optimizers, seeds, steps, settings, plans, status, scorer, clip_note,
                  dino_weights, grid_info, progress)


def _write(out, config_path, base, optimizers, seeds, steps, settings, plans, status, scorer, clip_note,
           dino_weights, grid_info, progress) -> CompareResult:
    from mixofshow.evaluate import report
    from mixofshow.utils.io import atomic_write_text

    if progress is not None:
        progress(Progress("report", runs_done=len(plans), runs_total=len(plans)))
    clip_info = scorer.info if scorer is not None else None
    rows = [_row(p, clip_info, status[p.name]) for p in plans]
    summary = report.summarise(rows, optimizers)
    notes = [f"{r['optimizer']} seed {r['seed']} diverged: {r['error']}" for r in rows if r["status"] == "diverged"]
    if clip_note:
        notes.append(f"CLIP-T, CLIP-I, DINO: n/a. {clip_note}; `--clip tiny` scores with a random "
                     "tiny CLIP (a pipeline check, not a meaningful score)")
    if not dino_weights and scorer is not None:
        notes.append("DINO: n/a (no DINO ViT-S/16 weights given: --dino-weights FILE)")
    if any(r["optimizer_step_seconds"] is None for r in rows):
        notes.append("opt. step ms / peak MB: n/a where the run's metrics.json does not record them")
    info = {
        "config": config_path,
        "settings": {
            "steps per run": steps, "seeds": ", ".join(map(str, seeds)), "base model": base.base_model,
            "sampling": f"{len(settings.prompts)} prompts x {settings.num_images} images (seeds "
                        f"{settings.seed}..{settings.seed + settings.num_images - 1}), {settings.scheduler} "
                        f"{settings.steps} steps, CFG {settings.guidance_scale:g}",
            "held-out loss": f"masked epsilon MSE over {settings.heldout_draws} fixed draws (mixofshow/evaluate/heldout.py)",
        },
        "clip": (f"{clip_info['model']}, weights {clip_info['weights']}; {clip_info['formula']}; raw cosine in the "
                 "'cos' columns") if clip_info else "n/a (the notes below say why)",
        "dino": f"ViT weights {dino_weights}, raw cosine" if dino_weights and clip_info else "n/a",
        "notes": notes,
        "grid": grid_info,
    }
    files = {name: out / name for name in ("comparison.csv", "comparison.md", "comparison.json",
                                           "loss_curves.png", "scores.png", "grid.png")}
    report.write_csv(rows, files["comparison.csv"])
    report.write_markdown(summary, info, files["comparison.md"])
    atomic_write_text(files["comparison.json"], json.dumps(
        {"info": info, "summary": summary, "runs": rows}, indent=2, default=str) + "\n")
    curves = {name: [(r["seed"], r["losses"]) for r in rows if r["optimizer"] == name] for name in optimizers}
    report.plot_losses(curves, files["loss_curves.png"])
    report.plot_scores(summary, files["scores.png"])
    grid_rows = []
    for name in optimizers:
        first = next((p for p in plans if p.optimizer == name and status[p.name] == "done"), None)
        if first is None:  # every seed diverged: a grey row
            grid_rows.append((name, [None] * len(settings.prompts)))
            continue
        index = read_json(Path(first.output_dir) / "eval_samples" / "index.json").get("images", [])
        by_prompt = {e["prompt"]: e["file"] for e in index if e.get("seed") == settings.seed}
        grid_rows.append((name, [Path(first.output_dir) / "eval_samples" / by_prompt[p] if p in by_prompt else None
                                 for p in settings.prompts]))
    report.image_grid(grid_rows, settings.prompts, files["grid.png"])
    if progress is not None:
        progress(Progress("done", runs_done=len(plans), runs_total=len(plans), eta_seconds=0.0))
    return CompareResult(out, False, rows, summary, files, clip_note)
