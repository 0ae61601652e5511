"""The Train tab: a form that builds the YAML ``mixofshow train`` takes, and a live job monitor.

The form's values are merged into the loaded preset (or ``configs/example.yaml``), so keys the
form does not show survive; "Save preset" writes exactly the YAML the CLI reads
(``configs/README.md`` documents every key). The monitor reads the job store and the run
folder once a second: progress, ETA, the loss curve, validation images as they are written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from app.context import AppContext, base_model_choices, job_choices, job_summary, unique_name
from app.errors import UserError
from app.runs import confined, images_of
from app.tab_dataset import build_dataset_panel
from app.uploads import UploadError, save_concept_upload
from mixofshow.demo import repo_root
from mixofshow.utils.io import atomic_write_text

__all__ = ["HP_SLOTS", "build_train_tab", "form_to_config"]

HP_SLOTS = 8  # hyper-parameter fields (the registry's optimizers have at most 5)
# the "Training options" fields: config keys, each shown with its dataclass default and type
OPTION_KEYS = ("train.lr_schedule", "train.warmup_steps", "train.mixed_precision", "train.gradient_checkpointing",
               "train.noise_offset", "data.flip_p", "data.buckets")


def option_fields() -> dict[str, tuple[Any, Any]]:
    """``{key: (default, type)}`` of :data:`OPTION_KEYS`, read from the config dataclasses."""
    import dataclasses
    import typing

    from mixofshow.train.config import DataConfig, TrainLoopConfig

    sections = {"train": TrainLoopConfig, "data": DataConfig}
    out = {}
    for key in OPTION_KEYS:
        section, name = key.split(".")
        cls = sections[section]
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        out[key] = (field.default, typing.get_type_hints(cls)[name])
    return out


def _option_component(key: str, default: Any, kind: Any):
    import typing

    label = f"{key} (default {default})"
    if typing.get_origin(kind) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(kind)), value=default, label=label)
    if kind is bool:
        return gr.Checkbox(default, label=key)
    return gr.Number(default, label=label, precision=0 if kind is int else None)


SOURCES = ("shipped concept", "upload", "concept list file")


def shipped_concepts() -> dict[str, Path]:
    return {p.stem: p for p in sorted((repo_root() / "datasets" / "concepts").glob("*.json"))}


def base_config(concept: str = "robot") -> dict[str, Any]:
    """The shipped training config of a shipped concept (``configs/example.yaml`` for the robot,
    ``configs/<concept>.yaml`` for the others; the robot's for a concept without one), with its
    relative paths made absolute."""
    path = repo_root() / "configs" / ("example.yaml" if concept == "robot" else f"{concept}.yaml")
    if not path.is_file():
        path = repo_root() / "configs" / "example.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return _absolute(data, path.parent)


def _absolute(data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for section, key in (("data", "concept_list"), ("validation", "prompts_file")):
        value = (data.get(section) or {}).get(key)
        if value and not Path(value).is_absolute():
            data[section][key] = str((base / value).resolve())
    return data


def _hp_updates(name: str, params: dict[str, Any] | None = None) -> list:
    from mixofshow.optim.registry import get_spec

    defaults = dict(get_spec(name).defaults)
    values = {**defaults, **(params or {})}
    keys = list(values)[:HP_SLOTS]
    out = []
    for i in range(HP_SLOTS):
        if i < len(keys):
            v = values[keys[i]]
            out.append(gr.update(label=keys[i], value=yaml.safe_dump(list(v) if isinstance(v, tuple) else v,
                                                                     default_flow_style=True).strip().removesuffix("\n..."),
                                 visible=True, info=f"default {defaults.get(keys[i], '-')}"))
        else:
            out.append(gr.update(label=f"hp{i}", value="", visible=False))
    return out


def recommended_lrs(name: str, fallback: dict[str, Any]) -> tuple[float, float]:
    """(UNet, text-encoder) learning rates the registry recommends for optimizer ``name``; the
    example config's where it recommends none."""
    from mixofshow.optim.registry import get_spec

    rec = get_spec(name).recommended_lr
    return float(rec.get("unet", fallback["lr_unet"])), float(rec.get("text_encoder", fallback["lr_text_encoder"]))


def _hp_values(name: str, texts: list[str]) -> dict[str, Any]:
    """The non-default hyper-parameters from the form (YAML values), checked by the registry."""
    from mixofshow.optim import registry

    spec = registry.get_spec(name)
    keys = list(spec.defaults)[:HP_SLOTS]
    params: dict[str, Any] = {}
    for key, text in zip(keys, texts):
        try:
            value = yaml.safe_load(str(text)) if text is not None and str(text).strip() else None
        except yaml.YAMLError:
            raise UserError(f"optimizer.params.{key}: {text!r} is not a valid value") from None
        default = spec.defaults[key]
        if value is None:
            continue
        if (list(default) if isinstance(default, tuple) else default) != value:
            params[key] = value
    check = getattr(registry, "check_hparams", None)  # contract 2 (issue 9), when it has landed
    if check is not None:
        try:
            check(name, params)
        except ValueError as err:
            raise UserError(f"optimizer.params.{err}") from None
    return params


def form_to_config(base: dict[str, Any] | None, concept_list: str, name: str, words: str, class_word: str,
                   base_model: str, resolution, optimizer: str, params: dict[str, Any], rank, steps, batch,
                   lr_unet, lr_text, lr_emb, checkpoint_every, validation_every, prompts: str,
                   model_roots: list[Path] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training YAML (as a dict) for the form's values on top of ``base``; a base model given as
    a path must lie inside one of ``model_roots`` (the runs folder and ``--models-dir``)."""
    data = copy.deepcopy(base or base_config())
    word_list = words.split()
    if not word_list or not all(w.startswith("<") and w.endswith(">") for w in word_list):
        raise UserError(f"concept words {words!r}: expected words like <robot1> <robot2>")
    if not name.strip():
        raise UserError("name: give the run a name")
    data["name"] = name.strip()
    data["base_model"] = (base_model or "").strip() or "embedded"
    from mixofshow.models.loading import check_base_model, looks_like_path

    if model_roots is not None and looks_like_path(data["base_model"]):
        if not any(confined(root, data["base_model"]) for root in model_roots):
            raise UserError(f"base model {data['base_model']}: a file or folder must lie inside the runs folder or "
                            "the app's --models-dir; pick one from the list, or give a hub id")

    try:
        check_base_model(data["base_model"])  # refused here, not later in the worker
    except ValueError as err:
        raise UserError(f"base model: {err}") from None
    d = data.setdefault("data", {})
    d.update(concept_list=concept_list, replace_mapping={"<TOK>": " ".join(word_list)}, resolution=int(resolution))
    c = data.setdefault("concept", {})
    c.update(words=word_list, class_words={word_list[-1]: class_word.strip()} if class_word.strip() else {})
    data.setdefault("lora", {})["rank"] = int(rank)
    o = data.setdefault("optimizer", {})
    o.update(name=optimizer, lr_unet=float(lr_unet), lr_text_encoder=float(lr_text), lr_embedding=float(lr_emb),
             params=params)
    t = data.setdefault("train", {})
    t.update(max_steps=int(steps), batch_size=int(batch), checkpoint_every=int(checkpoint_every))
    t.pop("device", None)  # the worker's device
    v = data.setdefault("validation", {})
    v["every"] = int(validation_every)
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    if lines:
        v["prompts"], v["prompts_file"] = lines, None
    for key, value in (options or {}).items():  # "Training options", by config key; empty: the default
        if value is not None and value != "":
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
    data.pop("output_dir", None)  # the app chooses the run folder
    from mixofshow.train.config import TrainConfig
    from mixofshow.utils.config import from_dict

    try:
        from_dict(TrainConfig, copy.deepcopy(data), where="training form")
    except ValueError as err:
        raise UserError(str(err)) from None
    return data


def build_train_tab(ctx: AppContext) -> None:
    from mixofshow.optim.registry import SPECS

    shipped = shipped_concepts()
    example = base_config()
    presets_dir = ctx.runs_dir / "presets"
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### Concept")
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Training images")
            concept = gr.Dropdown(list(shipped), value="robot" if "robot" in shipped else None, label="Shipped concept")
            with gr.Group(visible=False) as upload_box:
                images = gr.File(file_count="multiple", file_types=["image"], label="Images (PNG/JPEG/WEBP)")
                captions = gr.File(file_count="multiple", file_types=[".txt"], label="Captions (optional; NAME.txt, <TOK> = the concept)")
                masks = gr.File(file_count="multiple", file_types=["image"], label="Masks (optional; NAME.png, white = subject)")
            concept_list = gr.Textbox(label="Concept-list JSON on the server", visible=False)
            build_dataset_panel(ctx, [images, captions, masks], source, concept_list, SOURCES[2])
            with gr.Row():
                name = gr.Textbox(example["name"], label="Run name")
                words = gr.Textbox(" ".join(example["concept"]["words"]), label="Concept words")
                class_word = gr.Textbox("robot", label="Class word (initialises the last word)")
            with gr.Row():
                base_model = gr.Dropdown(base_model_choices(ctx), value=example["base_model"], allow_custom_value=True,
                                         label="Base model (pick one, or type a hub id)")
                resolution = gr.Number(example["data"]["resolution"], label="Resolution", precision=0)
            gr.Markdown("### Optimizer")
            optimizer = gr.Dropdown(sorted(SPECS), value="adamw", label="LoRA optimizer")
            with gr.Row():
                hp = [gr.Textbox(label=f"hp{i}", visible=False, min_width=120) for i in range(HP_SLOTS)]
            with gr.Row():
                # defaults: the shipped example config (configs/example.yaml), the one `mixofshow demo` trains
                rank = gr.Number(example["lora"]["rank"], label="Rank", precision=0)
                steps = gr.Number(example["train"]["max_steps"], label="Steps", precision=0)
                batch = gr.Number(example["train"]["batch_size"], label="Batch size", precision=0)
                checkpoint_every = gr.Number(example["train"]["checkpoint_every"], label="Checkpoint every", precision=0)
            with gr.Row():
                lr_unet = gr.Number(example["optimizer"]["lr_unet"], label="LR UNet",
                                    info="picking an optimizer sets its recommended rate")
                lr_text = gr.Number(example["optimizer"]["lr_text_encoder"], label="LR text encoder")
                lr_emb = gr.Number(example["optimizer"]["lr_embedding"], label="LR embeddings")
                validation_every = gr.Number(example["validation"]["every"], label="Validate every (0: end, -1: never)",
                                             precision=0)
            prompts = gr.Textbox("\n".join(example["validation"]["prompts"]), lines=4,
                                 label="Validation prompts (one per line)")
            with gr.Accordion("Training options", open=False):
                with gr.Row():
                    options = {key: _option_component(key, default, kind)
                               for key, (default, kind) in option_fields().items()}
            preset_base = gr.State(None)
            with gr.Accordion("Presets (the YAML `mixofshow train` takes)", open=False):
                with gr.Row():
                    preset_name = gr.Textbox("my-preset", label="Preset name")
                    save_preset = gr.Button("Save preset")
                preset_file = gr.File(label="Preset YAML (download, or drop one here to load it)", file_types=[".yaml", ".yml"])
                with gr.Row():
                    preset_pick = gr.Dropdown(sorted(p.stem for p in presets_dir.glob("*.yaml")), label="Saved presets")
                    load_preset = gr.Button("Load preset")
            submit = gr.Button("Queue training", variant="primary", elem_id="train-submit")
        with gr.Column(scale=2):
            gr.Markdown("### Job")
            job = gr.Dropdown(job_choices(ctx, "train"), label="Training job", allow_custom_value=True)
            status = gr.Markdown("No training job yet.", elem_id="train-status")
            with gr.Row():
                stop = gr.Button("Stop (checkpoint)", size="sm")
                save_now = gr.Button("Save now", size="sm")
                sample_now = gr.Button("Sample now", size="sm")
                resume = gr.Button("Resume", size="sm")
            plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Loss", height=220)
            gallery = gr.Gallery(label="Validation samples (newest first)", columns=3, height=300, elem_id="train-gallery")

    form = [name, words, class_word, base_model, resolution, optimizer, rank, steps, batch, lr_unet, lr_text,
            lr_emb, checkpoint_every, validation_every, prompts]

    def on_source(choice):
        return (gr.update(visible=choice == SOURCES[0]), gr.update(visible=choice == SOURCES[1]),
                gr.update(visible=choice == SOURCES[2]))

    source.change(on_source, source, [concept, upload_box, concept_list], api_visibility="private")
    optimizer.change(lambda n: _hp_updates(n), optimizer, hp, api_visibility="private")
    # a user's pick (not a job filling the form) sets the optimizer's recommended learning rates
    optimizer.input(lambda n: recommended_lrs(n, example["optimizer"]), optimizer, [lr_unet, lr_text],
                    api_visibility="private")

    def resolve_concept(src, shipped_name, imgs, caps, msks, listed) -> str:
        if src == SOURCES[0]:
            if shipped_name not in shipped:
                raise UserError(f"shipped concept {shipped_name!r}: pick one of {', '.join(shipped)}")
            return str(shipped[shipped_name])
        if src == SOURCES[1]:
            try:
                return str(save_concept_upload(imgs, caps, msks, ctx.runs_dir / "uploads"))
            except UploadError as err:
                raise UserError(str(err)) from None
        real = confined(ctx.runs_dir, listed) if listed else None  # never a file outside the runs folder
        if real is None or not real.is_file():
            raise UserError(f"concept list {listed!r}: no such file inside the app's runs folder "
                            "(store an upload as a dataset, or put the concept folder under the runs folder)")
        return str(real)

    def collect(base, src, shipped_name, imgs, caps, msks, listed, *values):
        form_values, hp_texts = values[: len(form)], values[len(form): len(form) + len(hp)]
        chosen = dict(zip(options, values[len(form) + len(hp):]))  # by config key
        params = _hp_values(form_values[5], list(hp_texts))
        roots = [ctx.runs_dir] + ([ctx.models_dir] if ctx.models_dir is not None else [])
        return form_to_config(base, resolve_concept(src, shipped_name, imgs, caps, msks, listed), *form_values[:5],
                              form_values[5], params, *form_values[6:], model_roots=roots, options=chosen)

    inputs = [preset_base, source, concept, images, captions, masks, concept_list, *form, *hp, *options.values()]

    def on_submit(*values):
        data = collect(*values)
        run = unique_name(ctx, data["name"], ctx.runs_dir)
        j = ctx.store.submit("train", data["name"], {"train": data}, str(ctx.runs_dir / run), ctx.device)
        gr.Info(f"queued job #{j.id}: {run}", duration=4)
        return gr.update(choices=job_choices(ctx, "train"), value=str(j.id)), str(j.id)

    job_id_out = gr.Textbox(visible=False)
    submit.click(on_submit, inputs, [job, job_id_out], api_name="train_submit")

    def on_save(preset, *values):
        data = collect(*values)
        safe = unique_name(ctx, preset or "preset", presets_dir).removesuffix(".yaml")
        path = presets_dir / f"{safe}.yaml"
        presets_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
        return str(path), gr.update(choices=sorted(p.stem for p in presets_dir.glob("*.yaml")), value=safe)

    save_preset.click(on_save, [preset_name, *inputs], [preset_file, preset_pick], api_name="train_save_preset")

    def fill_from(path) -> list:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"{Path(path).name}: not a readable YAML preset ({err})") from None
        if not isinstance(data, dict) or "data" not in data or "concept" not in data:
            raise UserError(f"{Path(path).name}: not a training config (expected data: and concept: sections)")
        base = Path(path).parent if Path(path).parent == presets_dir else repo_root() / "configs"
        return fill_from_data(_absolute(data, base))

    def fill_from_data(data: dict) -> list:
        """The form's values for a training config (a preset, or a job's own config)."""
        cl = data["data"].get("concept_list", "")
        match = [k for k, v in shipped.items() if str(v) == str(Path(cl).resolve())]
        c, o, t, v = data["concept"], data.get("optimizer", {}), data.get("train", {}), data.get("validation", {})
        cw = next(iter(c.get("class_words", {}).values()), "")
        updates = [data, SOURCES[0] if match else SOURCES[2], match[0] if match else None, cl,
                   data.get("name", "concept"), " ".join(c.get("words", [])), cw or "", data.get("base_model", "embedded"),
                   data["data"].get("resolution", 512), o.get("name", "adamw"), data.get("lora", {}).get("rank", 4),
                   t.get("max_steps", 1000), t.get("batch_size", 1), o.get("lr_unet", 1e-4),
                   o.get("lr_text_encoder", 1e-5), o.get("lr_embedding", 1e-3), t.get("checkpoint_every", 100),
                   v.get("every", 0), "\n".join(v.get("prompts", []))]
        chosen = [data.get(key.split(".")[0], {}).get(key.split(".")[1], default)
                  for key, (default, _) in option_fields().items()]
        return updates + _hp_updates(o.get("name", "adamw"), o.get("params") or {}) + chosen

    fill_outputs = [preset_base, source, concept, concept_list, *form, *hp, *options.values()]
    preset_file.upload(fill_from, preset_file, fill_outputs, api_name="train_load_preset_file")
    load_preset.click(lambda n: fill_from(presets_dir / f"{n}.yaml"), preset_pick, fill_outputs, api_name="train_load_preset")

    def refresh(job_id):
        choices = job_choices(ctx, "train")
        if not job_id and choices:
            job_id = choices[0][1]
        if not job_id:
            return gr.update(choices=choices), "No training job yet.", pd.DataFrame({"step": [], "loss": []}), []
        j = ctx.store.get(int(job_id))
        points = ctx.store.losses(j.id)
        frame = pd.DataFrame({"step": [s for s, _ in points], "loss": [l for _, l in points]})
        imgs = [(str(p), p.parent.name if p.parent.name.startswith("scale") else p.name)
                for p in images_of(ctx.runs_dir, Path(j.run_dir) / "samples", limit=24)]
        return gr.update(choices=choices, value=str(j.id)), job_summary(j), frame, imgs

    def fill_from_job(job_id) -> list:
        """Choosing a job in the list shows its settings in the form (to read, or to start a variant)."""
        try:
            train_config = ctx.store.get(int(job_id)).config["train"]
        except (ValueError, TypeError, KeyError):
            raise UserError(f"job {job_id!r}: no training job with settings to show") from None
        return fill_from_data(copy.deepcopy(train_config))

    job.select(fill_from_job, job, fill_outputs, api_name="train_job_settings")

    monitor = [job, status, plot, gallery]
    gr.Timer(1.0).tick(refresh, job, monitor, api_visibility="private", show_progress="hidden")
    job.change(refresh, job, monitor, api_visibility="private", show_progress="hidden")

    stop.click(job_command(ctx, "stop", "training"), job, job_id_out, api_name="train_stop")
    save_now.click(job_command(ctx, "checkpoint", "training"), job, job_id_out, api_name="train_save_now")
    sample_now.click(job_command(ctx, "validate", "training"), job, job_id_out, api_name="train_sample_now")
    resume.click(job_command(ctx, "resume", "training"), job, job_id_out, api_name="train_resume")
    return optimizer, hp


JOB_COMMAND_INFO = {"stop": "stopping after a checkpoint", "checkpoint": "saving a checkpoint",
                    "validate": "sampling validation images"}


def job_command(ctx: AppContext, kind: str, what: str):
    """Click handler for a job picked in a dropdown: ``"resume"`` queues it again, any other
    ``kind`` (``JOB_COMMAND_INFO``) is sent to the running job; returns the job id."""
    def fn(job_id):
        if not job_id:
            raise UserError(f"pick a {what} job first")
        try:
            if kind == "resume":
                ctx.store.resume(int(job_id))
                gr.Info(f"job #{job_id} queued to resume", duration=4)
            else:
                ctx.store.send(int(job_id), kind)
                gr.Info(JOB_COMMAND_INFO[kind])
        except ValueError as err:
            raise UserError(str(err)) from None
        return job_id
    return fn
