"""The Sample tab: a concept or fused model, prompts and sampler settings -> a sample job.

The job runs ``mixofshow.sample.pipeline.iter_samples`` (what ``mixofshow sample`` runs) into
``<runs>/samples/<id>/``; the gallery shows every image with its parameters (the PNG's
``parameters`` chunk, also in ``index.json``), and "Download all" zips the set.

Regions: typed as ``x0, y0, x1, y1: prompt`` lines (fractions of the image), previewed as
boxes, and sampled with ``SampleConfig.regions`` (README "Regional sampling"; a build without
regional sampling refuses a job with regions).

Conditions: one optional T2I-Adapter condition (README "T2I-Adapter conditions"): an adapter
(local diffusers folder or hub id, loaded at submit so a bad one is refused there), a control
image checked by ``app.uploads`` and re-encoded into ``<runs>/uploads/``, and a weight.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from app.context import AppContext, job_choices, job_summary, unique_name
from app.errors import UserError, form_number
from app.runs import concept_files
from app.uploads import UploadError, save_condition_upload

__all__ = ["default_prompt", "build_sample_tab", "parse_regions", "region_preview"]

_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]


def parse_regions(text: str) -> list[tuple[tuple[float, float, float, float], str]]:
    """``x0, y0, x1, y1: prompt`` per line (fractions in [0, 1]); ``ValueError`` names the line."""
    regions = []
    for n, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        box, sep, prompt = line.partition(":")
        try:
            coords = tuple(float(v) for v in box.split(","))
        except ValueError:
            coords = ()
        if not sep or len(coords) != 4 or not prompt.strip():
            raise ValueError(f"region line {n}: expected 'x0, y0, x1, y1: prompt', got {line!r}")
        x0, y0, x1, y1 = coords
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"region line {n}: expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {coords}")
        regions.append((coords, prompt.strip()))
    return regions


def region_preview(text: str, width: int = 512, height: int = 512) -> Image.Image:
    """The regions drawn as labelled boxes over a blank canvas of the output's size."""
    img = Image.new("RGB", (int(width), int(height)), "#f0f0f0")
    draw = ImageDraw.Draw(img)
    for i, ((x0, y0, x1, y1), prompt) in enumerate(parse_regions(text)):
        color = _COLORS[i % len(_COLORS)]
        box = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
        draw.rectangle(box, outline=color, width=3)
        draw.text((box[0] + 4, box[1] + 4), f"{i + 1}: {prompt[:40]}", fill=color)
    return img


def _regions_supported() -> bool:
    from mixofshow.sample.pipeline import SampleConfig

    return "regions" in {f.name for f in dataclasses.fields(SampleConfig)}


def _concepts(ctx: AppContext) -> list[tuple[str, str]]:
    return [(str(p.relative_to(ctx.runs_dir)), str(p)) for p in concept_files(ctx.runs_dir)]


def _gallery(run_dir: Path) -> list[tuple[str, str]]:
    try:
        index = json.loads((run_dir / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for item in index.get("images", []):
        path = run_dir / item["file"]
        if path.is_file():
            caption = (f"{item['prompt']} | seed {item['seed']} | {item['steps']} steps | cfg {item['guidance_scale']}"
                       f" | {item['scheduler']} | lora {item.get('lora_scale')}")
            out.append((str(path), caption))
    return out


def default_prompt(path: str | None) -> str | None:
    """``a photo of <w1> <w2>`` with a concept file's words (every concept's, for a fused model)."""
    if not path:
        return None
    from mixofshow.sample.load import adapter_metadata

    try:
        meta, _ = adapter_metadata(path)
        if "concepts" in meta:  # a fused model
            groups = [" ".join(c["words"]) for c in json.loads(meta["concepts"])]
        else:
            groups = [" ".join(json.loads(meta["words"]))]
    except (ValueError, KeyError, TypeError):
        return None
    return "a photo of " + " and ".join(g for g in groups if g)


def build_sample_tab(ctx: AppContext):
    from mixofshow.sample.pipeline import SCHEDULERS

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                concept = gr.Dropdown(_concepts(ctx), label="Concept or fused model", scale=4, allow_custom_value=True)
                refresh_btn = gr.Button("Refresh", size="sm", scale=1, elem_id="sample-refresh")
            prompt = gr.Textbox("a photo of <robot1> <robot2>", lines=2, label="Prompts (one per line)")
            negative = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                seed = gr.Number(0, label="First seed", precision=0)
                count = gr.Number(2, label="Images per prompt (seeds S..S+N-1)", precision=0)
                steps = gr.Number(20, label="Steps", precision=0)
            with gr.Row():
                width = gr.Number(0, label="Width (0: the base model's size)", precision=0)
                height = gr.Number(0, label="Height (0: the base model's size)", precision=0)
            with gr.Row():
                cfg = gr.Number(7.5, label="CFG scale")
                scheduler = gr.Dropdown(sorted(SCHEDULERS), value="dpm", label="Scheduler")
                lora_scale = gr.Slider(0, 1.5, value=1.0, step=0.05, label="LoRA scale")
            with gr.Accordion("Regions (one box per concept)", open=False):
                regions = gr.Textbox("", lines=3, label="Regions: x0, y0, x1, y1: prompt (fractions of the image)",
                                     placeholder="0.0, 0.2, 0.5, 1.0: a photo of <robot1> <robot2>")
                preview = gr.Image(label="Region preview", height=220, interactive=False)
                if not _regions_supported():
                    gr.Markdown("Regional sampling needs the regions feature of `mixofshow.sample`, which this "
                                "build does not have yet: the preview works, sampling with regions is refused.")
            with gr.Accordion("Conditions (T2I-Adapter)", open=False):
                cond_adapter = gr.Textbox("", label="Adapter (local diffusers T2IAdapter folder or hub id)",
                                          placeholder="TencentARC/t2iadapter_keypose_sd14v1")
                with gr.Row():
                    cond_image = gr.File(label="Condition image (the output's size)", file_types=["image"],
                                         type="filepath")
                    cond_weight = gr.Number(1.0, label="Adapter weight")
            submit = gr.Button("Generate", variant="primary", elem_id="sample-submit")
        with gr.Column(scale=3):
            job = gr.Dropdown(job_choices(ctx, "sample"), label="Sample job", allow_custom_value=True)
            status = gr.Markdown("No sample job yet.")
            gallery = gr.Gallery(label="Images (caption: parameters)", columns=3, height=360, elem_id="sample-gallery")
            with gr.Row():
                zip_btn = gr.Button("Download all (zip)", size="sm")
                zip_file = gr.File(label="Download", interactive=False)

    refresh_btn.click(lambda: gr.update(choices=_concepts(ctx)), None, concept, api_visibility="private")
    # picking a concept writes a prompt with its words (the robot prompt fits only the robot)
    concept.change(lambda path: default_prompt(path) or gr.update(), concept, prompt, api_name="sample_default_prompt")

    def on_regions(text):
        try:
            return region_preview(text)
        except ValueError as err:
            gr.Warning(str(err))
            return None

    regions.change(on_regions, regions, preview, api_name="sample_region_preview")

    def condition(adapter: str, image: str | None, weight: float) -> list[dict]:
        """The job's ``conditions`` (JSON): empty, or one checked adapter + uploaded image + weight."""
        adapter = (adapter or "").strip()
        if not adapter and not image:
            return []
        if not adapter or not image:
            raise ValueError("a T2I-Adapter condition needs both an adapter and a condition image")
        from mixofshow.sample.adapters import load_t2i_adapter

        if Path(adapter).is_absolute() or Path(adapter).exists():
            adapter = str(Path(adapter).resolve())
        load_t2i_adapter(adapter)  # ValueError naming the adapter when it cannot be loaded
        saved = save_condition_upload(image, ctx.runs_dir / "uploads")
        return [{"adapter": adapter, "image": str(saved), "weight": float(weight)}]

    def on_submit(concept_path, prompts, neg, first_seed, n, n_steps, guidance, sched, scale, region_text,
                  cond_adapter_name=None, cond_image_path=None, cond_weight_value=1.0, width_value=0, height_value=0):
        if not concept_path:
            raise UserError("pick a concept or fused model (train or fuse one first)")
        try:
            path = ctx.path(concept_path)
            parse_regions(region_text)
        except ValueError as err:
            raise UserError(str(err)) from None
        if region_text.strip() and not _regions_supported():
            raise UserError("regional sampling is not in this build yet (mixofshow.sample has no regions); "
                           "clear the regions to sample the whole image")
        from mixofshow.sample.load import adapter_metadata
        from mixofshow.sample.adapters import conditions_from_data
        from mixofshow.sample.pipeline import SampleConfig, check_inputs

        try:
            meta, _ = adapter_metadata(path)
            config = {"prompts": [p.strip() for p in prompts.splitlines() if p.strip()], "negative_prompt": neg,
                      "seed": form_number(first_seed, "seed"), "num_images": form_number(n, "images per prompt"),
                      "steps": form_number(n_steps, "steps"), "guidance_scale": form_number(guidance, "CFG", float),
                      "scheduler": sched, "lora_scale": form_number(scale, "LoRA scale", float),
                      "concept": str(path), "base_model": meta.get("base_model", "embedded")}
            for key, value in (("width", width_value), ("height", height_value)):
                if value not in (None, "", 0, "0"):
                    config[key] = form_number(value, key)
            if region_text.strip():  # boxes as [top, left, bottom, right] fractions (README "Regional sampling")
                config["regions"] = [{"prompt": p, "box": [y0, x0, y1, x1]}
                                     for (x0, y0, x1, y1), p in parse_regions(region_text)]
            conditions = condition(cond_adapter_name, cond_image_path, cond_weight_value)
            if conditions:
                config["conditions"] = conditions
            check_inputs(SampleConfig(**dict(config, conditions=conditions_from_data(conditions, "conditions"))))
        except (UploadError, ValueError, TypeError) as err:
            raise UserError(str(err)) from None
        run = unique_name(ctx, path.stem, ctx.runs_dir / "samples")
        j = ctx.store.submit("sample", run, {"sample": config}, str(ctx.runs_dir / "samples" / run), ctx.device)
        gr.Info(f"queued job #{j.id}: {len(config['prompts']) * config['num_images']} images", duration=4)
        return gr.update(choices=job_choices(ctx, "sample"), value=str(j.id)), str(j.id)

    submit.click(on_submit, [concept, prompt, negative, seed, count, steps, cfg, scheduler, lora_scale, regions,
                               cond_adapter, cond_image, cond_weight, width, height],
                 [job, gr.Textbox(visible=False)], api_name="sample_submit")

    def refresh(job_id):
        choices = job_choices(ctx, "sample")
        job_id = job_id or (choices[0][1] if choices else None)
        if not job_id:
            return gr.update(choices=choices), "No sample job yet.", []
        j = ctx.store.get(int(job_id))
        return gr.update(choices=choices, value=str(j.id)), job_summary(j), _gallery(Path(j.run_dir))

    gr.Timer(1.0).tick(refresh, job, [job, status, gallery], api_visibility="private", show_progress="hidden")
    job.change(refresh, job, [job, status, gallery], api_name="sample_refresh", show_progress="hidden")

    def on_zip(job_id):
        if not job_id:
            raise UserError("pick a sample job first")
        run_dir = Path(ctx.store.get(int(job_id)).run_dir)
        files = sorted(run_dir.glob("*.png")) + [p for p in [run_dir / "index.json"] if p.is_file()]
        if not files:
            raise UserError("no images yet")
        out = run_dir / f"{run_dir.name}.zip"
        with zipfile.ZipFile(out, "w") as z:
            for f in files:
                z.write(f, f.name)
        return str(out)

    zip_btn.click(on_zip, job, zip_file, api_name="sample_zip")
    return concept
