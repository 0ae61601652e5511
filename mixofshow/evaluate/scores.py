"""``evaluate``: CLIP-T, CLIP-I, DINO and identity scores of a folder written by ``mixofshow sample``.

Per image: CLIP-T = ``text_scale * max(cos, 0)`` with the class-word text (``prompts.py``);
CLIP-I = the mean over all reference images of ``image_scale * max(cos, 0)``; DINO = the mean
raw cosine to the references; identity (toy world only, ``evaluate/identity.py``) = P(the
concept named in the prompt is in the image) by the identity judge. The raw cosines are kept
beside every scaled figure. Per prompt and overall: mean and sample standard deviation over
images (the overall CLIP-I mean is the mean over all (generated, reference) pairs). Output: JSON and CSV naming model, weights, scale.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixofshow.evaluate.clip import TEXT_PREFIX, ClipScorer, ClipSpec, load_clip
from mixofshow.evaluate.progress import Cancelled, Progress, mean_std
from mixofshow.evaluate.prompts import class_text, concept_classes, list_images, read_index
from mixofshow.utils.io import atomic_write_text

__all__ = ["EVAL_FORMAT", "SCORE_KEYS", "evaluate", "write_report"]

log = logging.getLogger(__name__)

EVAL_FORMAT = "mixofshow.evaluation/1"
SCORE_KEYS = ("clip_t", "clip_t_cos", "clip_i", "clip_i_cos", "dino", "identity")
_BATCH = 16


def _open_images(paths: list[Path]):
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as img:
            images.append(img.convert("RGB"))
    return images


def _features(scorer, paths: list[Path], tick: Callable[[int], None], should_stop) -> Any:
    import torch

    chunks = []
    for start in range(0, len(paths), _BATCH):
        if should_stop is not None and should_stop():
            raise Cancelled("evaluation cancelled")
        chunk = paths[start : start + _BATCH]
        chunks.append(scorer.image_features(_open_images(chunk)))
        tick(len(chunk))
    return torch.cat(chunks)


def evaluate(
    samples_dir: str | Path,
    reference_images: str | Path | list[Path] | None = None,
    clip: ClipSpec | str | None = None,
    clip_weights: str | None = None,
    dino_weights: str | Path | None = None,
    out: str | Path | None = None,
    class_words: dict[str, str] | None = None,
    device: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    scorer: ClipScorer | None = None,
    identity: str | None = "auto",
) -> dict[str, Any]:
    """Score the images of ``samples_dir`` (see the module docstring); returns the report.

    Args:
        reference_images: folder (or list of files) of the concept's real images (CLIP-I, DINO);
            None skips them.
        clip: a :class:`ClipSpec` or a model name / config file (weights from ``clip_weights``);
            None: ``toyworld`` for images of the toy world (``base_model`` in ``index.json``), else ViT-B-32.
        dino_weights: local DINO ViT-S/16 weights file; None skips DINO (noted in the report).
        out: output path stem: ``<out>.json`` and ``<out>.csv`` (None: write nothing).
        class_words: extra ``{"<w1> <w2>": "class"}`` mappings for the CLIP-T texts.
        scorer: an already loaded CLIP model (``load_clip``) to reuse across folders.
        identity: ``"auto"`` scores identity when the images are of the toy world (``base_model:
            toyworld`` in ``index.json``) and a prompt names a shipped concept; a concept name
            (``robot``, ``cat``, ``cactus``) scores every image for it; None skips identity.
        progress, should_stop: callbacks; ``should_stop() -> True`` raises :class:`Cancelled`.
    Raises ``MissingWeightsError`` (a ``FileNotFoundError``) when the CLIP weights are not here.
    """
    import torch

    started = time.perf_counter()
    samples_dir = Path(samples_dir)
    index = read_index(samples_dir)
    entries = index["images"]
    concept = index.get("concept")
    if concept and not Path(concept).is_file() and (samples_dir / concept).is_file():
        concept = str(samples_dir / concept)  # recorded relative to where `mixofshow sample` ran
    classes = concept_classes(concept, class_words, where=str(samples_dir / "index.json"))
    texts = [TEXT_PREFIX + class_text(e["prompt"], classes) for e in entries]
    if isinstance(reference_images, (list, tuple)):
        refs = [Path(p) for p in reference_images]
    else:
        refs = list_images(reference_images) if reference_images is not None else []
    if scorer is None:
        if clip is None and clip_weights is None and index.get("base_model") == "toyworld":
            clip = "toyworld"
        spec = clip if isinstance(clip, ClipSpec) else ClipSpec(model=clip or ClipSpec.model, weights=clip_weights)
        scorer = load_clip(spec, device)
    dino = None
    if dino_weights is not None and refs:
        from mixofshow.evaluate.dino import load_dino

        dino = load_dino(dino_weights, scorer.device)

    total = len(entries) * (2 if dino else 1) + len(refs) * (2 if dino else 1)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            elapsed = time.perf_counter() - started
            eta = elapsed / done[0] * (total - done[0]) if done[0] else None
            progress(Progress("score", str(samples_dir), done[0], total, eta_seconds=eta))

    # 1. features (L2-normalised)
    paths = [samples_dir / e["file"] for e in entries]
    img = _features(scorer, paths, tick, should_stop)
    txt = torch.cat([scorer.text_features(texts[i : i + _BATCH]) for i in range(0, len(texts), _BATCH)])
    # 2. per-image scores
    t_cos = (img * txt).sum(-1)
    rows: list[dict[str, Any]] = []
    per_image = {"clip_t_cos": t_cos, "clip_t": scorer.info["text_scale"] * t_cos.clamp_min(0)}
    if refs:
        pair_cos = img @ _features(scorer, refs, tick, should_stop).T  # (images, references)
        per_image["clip_i_cos"] = pair_cos.mean(-1)
        per_image["clip_i"] = (scorer.info["image_scale"] * pair_cos.clamp_min(0)).mean(-1)
    if dino is not None:
        dino_img = _features(dino, paths, tick, should_stop)
        per_image["dino"] = (dino_img @ _features(dino, refs, tick, should_stop).T).mean(-1)
    identity_note = _identity(per_image, index, entries, paths, identity, scorer.device)
    for i, entry in enumerate(entries):
        row = {"file": entry["file"], "prompt": entry["prompt"], "seed": entry.get("seed"), "text": texts[i]}
        row.update({k: (None if k not in per_image or per_image[k][i] is None else float(per_image[k][i]))
                    for k in SCORE_KEYS})
        rows.append(row)
    # 3. per prompt and overall
    prompts = []
    for prompt in dict.fromkeys(e["prompt"] for e in entries):
        mine = [r for r in rows if r["prompt"] == prompt]
        prompts.append({"prompt": prompt, "text": mine[0]["text"], "n": len(mine),
                        **{k: mean_std([r[k] for r in mine]) for k in SCORE_KEYS}})
    notes = []
    if not refs:
        notes.append("CLIP-I and DINO skipped: no reference images (--reference-images DIR)")
    elif dino is None:
        notes.append("DINO skipped: no DINO ViT-S/16 weights given (--dino-weights FILE, timm or torch-hub layout)")
    if identity_note:
        notes.append(identity_note)
    report = {
        "format": EVAL_FORMAT,
        "samples_dir": str(samples_dir),
        "concept": index.get("concept"),
        "reference_images": [str(p) for p in refs],
        "num_images": len(rows),
        "num_references": len(refs),
        "clip": dict(scorer.info),
        "dino": dict(dino.info) if dino is not None else None,
        "class_words": classes,
        "notes": notes,
        "overall": {k: mean_std([r[k] for r in rows]) for k in SCORE_KEYS},
        "prompts": prompts,
        "images": rows,
    }
    if out is not None:
        write_report(report, out)
    if progress is not None:
        progress(Progress("done", str(samples_dir), done[0], total, eta_seconds=0.0))
    return report


def _identity(per_image: dict, index: dict, entries: list, paths: list[Path], identity: str | None,
              device) -> str | None:
    """Fill ``per_image["identity"]`` where it applies; a note saying why it was skipped, if it was."""
    if identity is None:
        return None
    if identity == "auto" and index.get("base_model") != "toyworld":
        return "identity skipped: it is defined for images of the toy world (base model toyworld)"
    from mixofshow.evaluate.identity import IdentityJudge

    forced = None if identity == "auto" else identity
    values = IdentityJudge(str(device)).scores(paths, [e["prompt"] for e in entries], forced)
    if all(v is None for v in values):
        return "identity skipped: no prompt names a shipped concept (<robot1> <robot2>, ...; or --identity NAME)"
    per_image["identity"] = values
    return None


def _csv_text(report: dict[str, Any]) -> str:
    clip = report["clip"]
    dino = (report.get("dino") or {}).get("model", "skipped")
    header = ["level", "prompt", "file", "seed", "n"]
    for k in SCORE_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    header += ["clip_model", "clip_weights", "clip_scale", "dino_model"]
    scale = clip["formula"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)

    def fmt(v):
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)

    def summary(level, prompt, stats, n):
        values = [fmt(x) for k in SCORE_KEYS for x in (stats[k]["mean"], stats[k]["std"])]
        writer.writerow([level, prompt, "", "", n, *values, clip["model"], clip["weights"], scale, dino])

    summary("overall", "", report["overall"], report["num_images"])
    for p in report["prompts"]:
        summary("prompt", p["prompt"], p, p["n"])
    for r in report["images"]:
        values = [fmt(x) for k in SCORE_KEYS for x in (r[k], None)]
        writer.writerow(["image", r["prompt"], r["file"], fmt(r["seed"]), 1, *values,
                         clip["model"], clip["weights"], scale, dino])
    return buf.getvalue()


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.csv`` (a ``.json``/``.csv`` suffix on ``out`` is dropped)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".csv") else out
    json_path, csv_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")
    atomic_write_text(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(csv_path, _csv_text(report))
    return json_path, csv_path
