"""``mixofshow sample``: generate images with a concept (or fused model) file.

Example::

    mixofshow sample --concept robot.safetensors --prompt "a photo of <robot1> <robot2>" \\
        --num-images 4 --seed 0 --output-dir samples/robot
    mixofshow sample --concept robot.safetensors --prompts datasets/prompts/robot.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]

# the names of mixofshow.sample.pipeline.SCHEDULERS, written out so that `--help` imports no
# torch/diffusers (tests/test_cli.py checks that the two agree)
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm", "euler", "euler_a", "pndm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help="generate images with a concept or fused model",
        description="Generate images with an ED-LoRA concept or fused model. Each image is a PNG "
        "whose 'parameters' text chunk holds its settings (JSON); index.json lists them all.",
    )
    p.add_argument("--concept", required=True, help="concept or fused model (.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompt list: one per line, '#' comments")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds S..S+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed of every prompt (default 0)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="dpm", help="sampler (default dpm)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA multiplier; 0 = embeddings only")
    p.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--base-model", help="base model (default: the one recorded in the concept file)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--output-dir", help="where to write images (default: samples/<concept name>)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _prompts(args) -> list[str]:
    prompts = [p for p in args.prompt]
    if args.prompts:
        from mixofshow.data import load_prompt_list

        prompts += load_prompt_list(args.prompts)
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT and/or --prompts FILE")
    return prompts


def run(args) -> int:
    from mixofshow.utils.paths import check_output_dir

    concept = Path(args.concept)
    output_dir = check_output_dir(args.output_dir or Path("samples") / concept.stem, "--output-dir")
    import torch  # heavy imports only once the cheap checks passed

    from mixofshow.models.loading import load_pipeline, resolve_dtype
    from mixofshow.sample.load import adapter_metadata, load_adapter
    from mixofshow.sample.pipeline import SampleConfig, check_inputs, generate

    meta, _ = adapter_metadata(concept)
    base_model = args.base_model or meta.get("base_model")
    if not base_model or base_model == "unknown":
        raise ValueError(f"{concept}: no base model recorded in the file; pass --base-model")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(
        args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    )
    config = SampleConfig(
        prompts=_prompts(args),
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.cfg,
        scheduler=args.scheduler,
        lora_scale=args.lora_scale,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        output_dir=output_dir,
        concept=str(concept),
        base_model=base_model,
    )
    check_inputs(config)  # before the (slow) model load

    pipe = load_pipeline(base_model, dtype=dtype)
    adapter = load_adapter(pipe, concept, lora_scale=args.lora_scale)
    pipe.to(device)  # after loading: the concept's tensors are created on the CPU
    images = generate(pipe, adapter.encoder, config, progress=not args.no_progress)

    out = Path(config.output_dir)
    print(f"wrote {len(images)} images to {out}")
    print(f"index: {out / 'index.json'}")
    return 0
