"""``mixofshow sample``: generate images with a concept, a fused model or the bare base model.

Example::

    mixofshow sample --concept robot.safetensors --prompt "a photo of <robot1> <robot2>" \\
        --num-images 4 --seed 0 --output-dir samples/robot
    mixofshow sample --concept robot.safetensors --prompts datasets/prompts/robot.txt --preset mixofshow-eval
    mixofshow sample --concept fused.safetensors --prompt "two people by a lake" --regions regions.yaml
    mixofshow sample --base-model embedded --prompt "a lake" --regions "[a dog]-*-[]-*-[0, 0, 128, 64]"
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]

_PRESETS = ("mixofshow-eval", "mixofshow-regional")  # see mixofshow.sample.batch.PRESETS
# the names of mixofshow.sample.pipeline.SCHEDULERS, written out so that `--help` imports no
# torch/diffusers (tests/test_cli.py checks that the two agree)
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm", "euler", "euler_a", "pndm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help="generate images with a concept, fused model or the base model (regions, adapters, prompt files)",
        description="Generate images with an ED-LoRA concept, a fused model or the bare base model. Each "
        "image is a PNG whose 'parameters' text chunk holds its settings (JSON); index.json lists them all, "
        "grids/ holds one contact sheet per prompt. Images already on disk with the same settings are "
        "kept, so a rerun resumes an interrupted run.",
    )
    p.add_argument("--concept", help="concept or fused model (.safetensors); omit to sample the base model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompt file: one per line, or YAML entries (README)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    p.add_argument("--preset", choices=_PRESETS, help="sampler settings of a protocol (explicit flags win)")
    p.add_argument("--num-images", type=int, help="images per prompt, seeds S..S+N-1 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed of every prompt (default 0)")
    p.add_argument("--steps", type=int, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, help="guidance scale (default 7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="sampler (default dpm)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA multiplier; 0 = embeddings only")
    p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--regions", metavar="FILE|STRING",
                   help="region file (YAML/JSON) or Mix-of-Show region string '[prompt]-*-[neg]-*-[t, l, b, r]|...'")
    p.add_argument("--region-strength", type=float, default=1.0, help="replace ratio inside regions (default 1)")
    p.add_argument("--region-steps", type=float, nargs=2, metavar=("START", "END"), default=(0.0, 1.0),
                   help="fractions of the steps in which regions apply (default 0 1: all)")
    p.add_argument("--condition", nargs="+", action="append", default=[], metavar="ADAPTER IMAGE [WEIGHT]",
                   help="T2I-Adapter condition: adapter folder or hub id, control image, weight (repeatable)")
    p.add_argument("--base-model", help="base model (default: the one recorded in the concept file)")
    p.add_argument("--base-model-config", help="for a single-file base model of another architecture than SD 1.5: "
                   "a diffusers folder with its configs (default: the one recorded in the concept file, else SD 1.5's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--output-dir", help="where to write images (default: samples/<concept name>)")
    p.add_argument("--no-grids", action="store_true", help="do not write contact sheets")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _prompts(args) -> list:
    from mixofshow.sample.batch import load_prompt_file

    prompts: list = list(args.prompt)
    if args.prompts:
        prompts += load_prompt_file(args.prompts)
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT and/or --prompts FILE")
    return prompts


def _conditions(args, regions) -> list:
    from mixofshow.sample.adapters import Condition

    out = []
    for values in args.condition:
        if len(values) not in (2, 3):
            raise ValueError(f"--condition {' '.join(values)}: expected ADAPTER IMAGE [WEIGHT]")
        try:
            weight = float(values[2]) if len(values) == 3 else 1.0
        except ValueError:
            raise ValueError(f"--condition {' '.join(values)}: weight {values[2]!r} is not a number") from None
        out.append(Condition(values[0], Path(values[1]), weight))
    return out


def _base_model(args, concept: Path | None) -> str:
    from mixofshow.sample.load import adapter_metadata

    if concept is None:
        if not args.base_model:
            raise ValueError("give --concept FILE, or --base-model NAME to sample the base model alone")
        return args.base_model
    meta, _ = adapter_metadata(concept)
    base_model = args.base_model or meta.get("base_model")
    if not base_model or base_model == "unknown":
        raise ValueError(f"{concept}: no base model recorded in the file; pass --base-model")
    return base_model


def _base_model_config(args, concept: Path | None) -> str | None:
    import json

    from mixofshow.sample.load import adapter_metadata

    if args.base_model_config or concept is None:
        return args.base_model_config
    meta, _ = adapter_metadata(concept)
    try:
        return json.loads(meta.get("extra", "{}")).get("base_model_config")
    except (ValueError, AttributeError):
        return None


def run(args) -> int:
    from mixofshow.utils.paths import check_output_dir

    concept = Path(args.concept) if args.concept else None
    output_dir = check_output_dir(args.output_dir or Path("samples") / (concept.stem if concept else "base"),
                                  "--output-dir")
    import torch  # heavy imports only once the cheap checks passed

    from mixofshow.models.loading import load_pipeline, resolve_dtype
    from mixofshow.sample.batch import PRESETS, regions_argument
    from mixofshow.sample.load import load_adapter, load_base
    from mixofshow.sample.pipeline import SampleConfig, check_inputs, generate

    base_model = _base_model(args, concept)
    regions, conditions = regions_argument(args.regions) if args.regions else (None, [])
    conditions = conditions + _conditions(args, regions)
    preset = PRESETS.get(args.preset or "", {})

    def pick(value, name, default):
        return value if value is not None else preset.get(name, default)

    config = SampleConfig(
        prompts=_prompts(args),
        negative_prompt=args.negative_prompt,
        num_images=pick(args.num_images, "num_images", 1),
        seed=args.seed,
        steps=pick(args.steps, "steps", 50),
        guidance_scale=pick(args.cfg, "guidance_scale", 7.5),
        scheduler=pick(args.scheduler, "scheduler", "dpm"),
        lora_scale=args.lora_scale,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        output_dir=output_dir,
        concept=str(concept) if concept else None,
        base_model=base_model,
        regions=regions,
        region_strength=args.region_strength,
        region_steps=tuple(args.region_steps),
        conditions=conditions or None,
        grids=not args.no_grids,
    )
    check_inputs(config)  # before the (slow) model load

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(
        args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    )
    pipe = load_pipeline(base_model, dtype=dtype, config=_base_model_config(args, concept))
    model = load_adapter(pipe, concept, lora_scale=args.lora_scale) if concept else load_base(pipe)
    pipe.to(device)  # after loading: the concept's tensors are created on the CPU
    images = generate(pipe, model.encoder, config, progress=not args.no_progress)

    out = Path(config.output_dir)
    print(f"wrote {len(images)} images to {out}")
    print(f"index: {out / 'index.json'}")
    return 0
