"""``mixofshow pretrain``: build the toy world's base model from nothing, stage by stage.

Stages, in order (``--stage all`` runs the ones not yet done):

    render     train / val / test scenes as uint8 arrays (seconds)
    vae        AutoencoderKL                                  (mixofshow/toyworld/vae.py)
    clip-cond  the CLIP whose text tower conditions the UNet  (mixofshow/toyworld/clips.py)
    clip-eval  the separate evaluation CLIP (open_clip)       (mixofshow/toyworld/clips.py)
    judge      a CNN reading class, colour, position, background (mixofshow/toyworld/judge.py)
    identity   the same CNN finding the shipped concepts' looks (mixofshow/toyworld/identity.py)
    unet       UNet2DConditionModel on cached latents         (mixofshow/toyworld/unet.py)
    export     fp16 weights + manifest into mixofshow/models/toyworld/weights

Each training stage keeps one resumable checkpoint and ``metrics.json`` in
``WORK_DIR/<stage>/``; running the command again continues where it stopped. Everything is
seeded: the data order and noise of a step depend only on ``--seed``, the stage and the step.
Use one thread per process on a shared CPU (``OMP_NUM_THREADS=1``); CUDA is used when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

__all__ = ["STAGES", "DEFAULT_WORK_DIR", "SPLIT_SIZES", "add_parser", "run_pretrain"]

log = logging.getLogger(__name__)

STAGES = ("render", "vae", "clip-cond", "clip-eval", "judge", "identity", "unet", "export")
_REPO = Path(__file__).resolve().parents[2]  # the checkout (the package is installed editable)
DEFAULT_WORK_DIR = _REPO / "checkpoints" / "toyworld"  # committed checkpoints continue from here
SPLIT_SIZES = {"train": 30000, "val": 1000, "test": 1000}
IMAGE_SIZE = 64


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_stage(stage: str, work: Path, seed: int, device, max_minutes: float | None,
              weights_dir: Path | None = None, partial: bool = False) -> dict:
    """Run (or continue) one stage; returns its metrics."""
    from mixofshow.toyworld import model
    from mixofshow.toyworld.data import load_split, render_split
    from mixofshow.utils.io import atomic_write_text

    data = work / "data"
    if stage == "render":
        for split, count in SPLIT_SIZES.items():
            render_split(data, split, count, seed, IMAGE_SIZE)
        return {"done": True}
    from mixofshow.toyworld.stage import read_metrics

    if stage != "export":
        previous = read_metrics(work / stage)
        if previous.get("done") and (stage != "vae" or "scaling_factor" in previous):
            log.info("pretrain: stage %s is done (%s/metrics.json)", stage, work / stage)
            return previous
    if stage == "identity":  # draws its own scenes
        from mixofshow.toyworld.identity import train_identity

        identity = model.build("identity").to(device)
        metrics = train_identity(identity, work / "identity", seed, max_minutes=max_minutes)
        if metrics.get("done"):
            model.save_part(work / "identity" / "final", "identity", identity)
        return metrics
    train, val = load_split(data, "train"), load_split(data, "val")
    if stage == "vae":
        from mixofshow.toyworld.vae import scaling_factor, train_vae

        vae = model.build("vae").to(device)
        metrics = train_vae(vae, train, val, work / "vae", seed, max_minutes=max_minutes)
        if metrics.get("done"):
            model.save_part(work / "vae" / "final", "vae", vae)
            metrics["scaling_factor"] = scaling_factor(vae, train)  # stored with the stage's metrics
            atomic_write_text(work / "vae" / "metrics.json", json.dumps(metrics, indent=1))
        return metrics
    if stage in ("clip-cond", "clip-eval"):
        from mixofshow.toyworld.clips import train_clip

        clip = model.build(stage).to(device)
        held_out = {"val": val, "test": load_split(data, "test")}
        metrics = train_clip(stage, clip, train, held_out, work / stage, seed, max_minutes=max_minutes)
        if metrics.get("done"):
            part = clip.text_model if stage == "clip-cond" else clip
            model.save_part(work / stage / "final", "text_encoder" if stage == "clip-cond" else "eval_clip", part)
        return metrics
    if stage == "judge":
        from mixofshow.toyworld.judge import train_judge

        judge = model.build("judge").to(device)
        metrics = train_judge(judge, train, {"val": val, "test": load_split(data, "test")}, work / "judge", seed,
                              max_minutes=max_minutes)
        if metrics.get("done"):
            model.save_part(work / "judge" / "final", "judge", judge)
        return metrics
    if stage == "unet":
        from mixofshow.toyworld.unet import train_unet

        vae, text_encoder = model.load_trained(work, "vae").to(device), model.load_trained(work, "text_encoder").to(device)
        unet = model.build("unet").to(device)
        inputs = model.finals_sha256(work, ("vae", "text_encoder"))
        metrics = train_unet(unet, vae, text_encoder, train, val, work / "unet", seed, max_minutes=max_minutes,
                             inputs=inputs)
        if metrics.get("done"):
            model.save_part(work / "unet" / "final", "unet", unet)
        return metrics
    if stage == "export":
        return export(work, seed, weights_dir, partial)
    raise ValueError(f"Unknown stage {stage!r}; expected one of {list(STAGES)}")


def export(work: Path, seed: int, out: Path | None = None, partial: bool = False) -> dict:
    """Every finished part as fp16 ``.safetensors`` in ``out`` (the package's weights folder),
    with ``manifest.json``: sha256 and size of each file, command, seed, each stage's metrics.
    ``partial``: unfinished stages (not the VAE) give the EMA weights of their latest checkpoint."""
    import torch

    from mixofshow.models.pretrained import toyworld_weights_dir
    from mixofshow.toyworld import model
    from mixofshow.toyworld.data import GENERATOR_VERSION
    from mixofshow.toyworld.stage import read_metrics
    from mixofshow.utils.io import atomic_write_text, file_sha256

    out = out or toyworld_weights_dir()
    files, stages = {}, {}
    for name, stage in (("vae", "vae"), ("text_encoder", "clip-cond"), ("unet", "unet"), ("eval_clip", "clip-eval"),
                        ("judge", "judge"), ("identity", "identity")):
        part = model.load_trained(work, name, partial)
        path = model.save_part(out, name, part, torch.float16)
        files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        m = read_metrics(work / stage)
        stages[stage] = {"done": bool(m.get("done")), "steps": m.get("step"), "seconds": round(m.get("seconds", 0.0)),
                         "config": m.get("config"), "last_eval": (m.get("evals") or [None])[-1]}
    manifest = {
        "name": "toyworld",
        "complete": all(v["done"] for v in stages.values()),
        "command": f"OMP_NUM_THREADS=1 mixofshow pretrain --seed {seed}",
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "image_size": IMAGE_SIZE,
        "splits": SPLIT_SIZES,
        "vae_scaling_factor": read_metrics(work / "vae")["scaling_factor"],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "stages": stages,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    log.info("export: %d files, %.1f MB in %s", len(files), manifest["total_bytes"] / 1e6, out)
    return {"done": True, **manifest}


def run_pretrain(stages: list[str], work: Path, seed: int, device_name: str | None, max_minutes: float | None,
                 weights_dir: Path | None = None, partial: bool = False) -> int:
    import torch

    if device_name is None and os.environ.get("OMP_NUM_THREADS") is None:
        log.warning("OMP_NUM_THREADS is not set: on a shared CPU one thread per process is much faster")
    torch.manual_seed(seed)
    device = _device(device_name)
    for stage in stages:
        log.info("pretrain: stage %s on %s", stage, device)
        metrics = run_stage(stage, work, seed, device, max_minutes, weights_dir, partial)
        if not metrics.get("done"):
            log.info("pretrain: stage %s is not finished; run the command again to continue", stage)
            return 0
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train the toy world's base model (resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="stage to run (default: all, in order)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="checkpoints, metrics and the rendered data (default: the checkout's checkpoints/toyworld)")
    p.add_argument("--seed", type=int, default=0, help="world and training seed (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop a training stage at a checkpoint after this many minutes (resumable)")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="where export writes and --check reads the weights (default: the package's "
                        "mixofshow/models/toyworld/weights)")
    p.add_argument("--partial", action="store_true",
                   help="export: take unfinished stages' latest EMA weights (the manifest says so)")
    p.add_argument("--check", action="store_true",
                   help="measure the quality floors of the weights in --weights-dir on held-out scenes and "
                        "prompts, write the sample grid and record the figures in the manifest")
    p.add_argument("--samples", type=int, default=200, help="--check: held-out prompts to sample (default 200)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.check:
        return check(args.work_dir, args.seed, args.weights_dir, args.samples)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    return run_pretrain(stages, args.work_dir, args.seed, args.device, args.max_minutes, args.weights_dir,
                        args.partial)


GRID_PATH = _REPO / "docs" / "toyworld" / "base_samples.png"


def check(work: Path, seed: int, weights_dir: Path | None, samples: int) -> int:
    """Measure the floors (mixofshow/toyworld/floors.py), print them, store them in the manifest;
    exit status 1 when a floor is missed."""
    from mixofshow.models.pretrained import toyworld_manifest, toyworld_weights_dir
    from mixofshow.toyworld.data import load_split, render_split
    from mixofshow.toyworld.floors import check_floors
    from mixofshow.utils.io import atomic_write_text

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    weights_dir = weights_dir or toyworld_weights_dir()
    manifest = toyworld_manifest(weights_dir)
    for split in ("val", "test"):
        render_split(work / "data", split, SPLIT_SIZES[split], manifest["seed"], IMAGE_SIZE)
    report = check_floors(weights_dir, load_split(work / "data", "test"), samples, seed, GRID_PATH,
                          val=load_split(work / "data", "val"))
    manifest["floors"] = {**report, "command": f"mixofshow pretrain --check --samples {samples} --seed {seed}",
                          "grid": str(GRID_PATH.relative_to(_REPO))}
    atomic_write_text(weights_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if all(report["passed"].values()) else 1
