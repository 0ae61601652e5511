"""The Train tab's dataset panel: thumbnails with masks, caption editing, captioners, add/remove images.

It works on a concept folder under ``<runs>/uploads/`` (``image/``, ``caption/``, ``mask/`` and
``concept.json``, as an upload is stored): "Store the uploaded images" makes one from the Train
tab's upload fields, "Use for training" points the Train form at it. Every rule lives in the
library (``mixofshow.data.edit``, ``mixofshow.data.captions``); this file only wires the page.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import gradio as gr

from app.context import AppContext
from app.errors import UserError
from app.runs import confined
from app.uploads import TOKEN, UploadError, check_image, save_concept_upload
from mixofshow.data.captions import CaptionError, model_captions, template_captions, write_caption
from mixofshow.data.edit import list_dataset, mask_overlay, remove_image

__all__ = ["build_dataset_panel", "dataset_choices"]


def dataset_choices(ctx: AppContext) -> list[str]:
    """The concept folders stored from uploads, newest first."""
    root = ctx.runs_dir / "uploads"
    found = [d for d in root.glob("*/") if (d / "image").is_dir() and (d / "concept.json").is_file()]
    return [str(d) for d in sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)]


def build_dataset_panel(ctx: AppContext, upload_fields: list, source, concept_list, source_choice: str):
    """The panel's components and handlers; ``source``/``concept_list`` are the Train form's."""
    with gr.Accordion("Dataset: thumbnails with masks, captions, add or remove images", open=False):
        with gr.Row():
            folder = gr.Dropdown(dataset_choices(ctx), label="Dataset (a stored upload)", allow_custom_value=True,
                                 scale=3)
            open_btn = gr.Button("Open", size="sm", scale=1)
            store_btn = gr.Button("Store the uploaded images as a dataset", size="sm", scale=2)
        gallery = gr.Gallery(label="Images (outside the mask: dimmed, not in the loss)", columns=6, height=220)
        table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                             label="Captions (edit the caption column, then Save; <TOK> is the concept)")
        with gr.Row():
            save_btn = gr.Button("Save captions", size="sm")
            template = gr.Textbox("<TOK>, {class_word}", label="Template ({class_word}, {stem})", scale=2)
            class_word = gr.Textbox("", label="Class word for the template", scale=1)
            template_btn = gr.Button("Caption from the template", size="sm")
        with gr.Row():
            model_dir = gr.Textbox(label="Captioning model folder (local BLIP or Florence-2, inside --models-dir)",
                                   scale=3)
            model_btn = gr.Button("Caption with the model", size="sm")
        with gr.Row():
            add_files = gr.File(file_count="multiple", file_types=["image"], label="Add images", scale=2)
            add_btn = gr.Button("Add", size="sm")
            remove_name = gr.Textbox(label="Image to remove (name)")
            remove_ok = gr.Checkbox(False, label="yes, remove it")
            remove_btn = gr.Button("Remove image", variant="stop", size="sm")
        use_btn = gr.Button("Use this dataset for training", variant="secondary")

    def resolve(path: str) -> Path:
        real = confined(ctx.runs_dir / "uploads", path) if path else None
        if real is None or not (real / "image").is_dir():
            raise UserError(f"dataset {path!r}: pick a stored upload (store the uploaded images first)")
        return real

    def show(path: str):
        try:
            rows = list_dataset(resolve(path))
        except ValueError as err:
            raise UserError(str(err)) from None
        thumbs = [(mask_overlay(r.image, r.mask), f"{r.stem}: {r.caption}") for r in rows]
        return thumbs, [[r.stem, r.caption] for r in rows]

    def on_store(*files):
        try:
            listed = save_concept_upload(*files, ctx.runs_dir / "uploads")
        except UploadError as err:
            raise UserError(str(err)) from None
        path = str(listed.parent)
        return (gr.update(choices=dataset_choices(ctx), value=path), *show(path))

    def on_save(path: str, frame):
        root = resolve(path)
        stems = {r.stem: r.image for r in list_dataset(root)}
        try:
            for stem, caption in frame.itertuples(index=False, name=None):
                if stem not in stems:
                    raise UserError(f"{stem!r}: no such image in the dataset (reopen it)")
                write_caption(stems[stem], root / "caption", caption)
        except CaptionError as err:
            raise UserError(str(err)) from None
        gr.Info("captions saved", duration=3)
        return show(path)

    def on_template(path: str, text: str, word: str):
        root = resolve(path)
        try:
            template_captions([r.image for r in list_dataset(root)], root / "caption", text or TOKEN, word.strip())
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"template {text!r}: {err}") from None
        return show(path)

    def on_model(path: str, folder_text: str):
        root = resolve(path)
        allowed = confined(ctx.models_dir, folder_text) if ctx.models_dir is not None and folder_text else None
        if allowed is None:
            raise UserError("captioning model: give a folder inside the app's --models-dir (start the app with "
                            "--models-dir DIR holding a BLIP or Florence-2 folder), or use the template captioner")
        try:
            model_captions([r.image for r in list_dataset(root)], root / "caption", allowed)
        except CaptionError as err:
            raise UserError(str(err)) from None
        return show(path)

    def on_add(path: str, files):
        root = resolve(path)
        try:
            for f in files or []:
                image = check_image(f)
                stem = f"{Path(f).stem}-{uuid.uuid4().hex[:6]}"
                image.save(root / "image" / f"{stem}.png")
                write_caption(root / "image" / f"{stem}.png", root / "caption", TOKEN)
        except (UploadError, CaptionError) as err:
            raise UserError(str(err)) from None
        return (*show(path), None)

    def on_remove(path: str, stem: str, confirmed: bool):
        if not confirmed:
            raise UserError("tick 'yes, remove it' to remove the image with its caption and mask")
        try:
            remove_image(resolve(path), stem.strip())
        except ValueError as err:
            raise UserError(str(err)) from None
        return (*show(path), False)

    def on_use(path: str):
        return gr.update(value=source_choice), str(resolve(path) / "concept.json")

    views = [gallery, table]
    open_btn.click(show, folder, views, api_name="dataset_open")
    store_btn.click(on_store, upload_fields, [folder, *views], api_name="dataset_store")
    save_btn.click(on_save, [folder, table], views, api_name="dataset_save_captions")
    template_btn.click(on_template, [folder, template, class_word], views, api_name="dataset_template")
    model_btn.click(on_model, [folder, model_dir], views, api_name="dataset_model_captions")
    add_btn.click(on_add, [folder, add_files], [*views, add_files], api_name="dataset_add")
    remove_btn.click(on_remove, [folder, remove_name, remove_ok], [*views, remove_ok], api_name="dataset_remove")
    use_btn.click(on_use, folder, [source, concept_list], api_name="dataset_use")
