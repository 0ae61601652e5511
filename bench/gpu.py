"""GPU figures on the Stable Diffusion 1.5 architecture (random weights, no download).

Builds SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder from the configs shipped in
``mixofshow/models/sd15/`` (the published ``runwayml/stable-diffusion-v1-5`` configs) with random
weights on the device, and prints, for every mixed precision (``fp16``, ``bf16``) and attention
backend (``sdpa``; ``xformers`` when installed), with and without gradient checkpointing:

- ``train``: ED-LoRA training-step time (``bench/trainstep.py``: VAE encode, noise, layer-wise
  prompt encoding, UNet, loss, backward, optimizer steps; median of ``--steps``) and peak GPU
  memory (max allocated, weights included) at 512 x 512, batch 1 and 4, for every registered
  optimizer, with its step time / AdamW's;
- ``edlora_vs_plain``: ED-LoRA step / plain-LoRA step (same LoRA, one context for every layer),
  timed back to back, beside ``flop_bound``, the ratio of the two steps' FLOP counts (counted on
  the ``meta`` device: the text encoder runs once per cross-attention layer), which a time ratio
  cannot beat; the goal is within 10% of it;
- ``sample``: images/s at 50 DPM-Solver steps, CFG 7.5 (``mixofshow.sample.pipeline.generate``);
- ``fusion``: closed-form fusion time of 2 and 14 synthetic concepts for the whole SD 1.5 model
  (``bench/fusion.py``'s layer kinds and timing; Gram updates and solves, the model's forward
  passes excluded).

One line per measurement, ``key=value`` pairs. ``--tiny`` runs the same code on the embedded
model at 128 x 128 on the CPU (batch 1 and 2, fewer steps, ``bench/fusion.py --quick`` layer
kinds): a test runs it, so the script cannot rot; its figures mean nothing for a GPU.

    python bench/gpu.py [--tiny] [--device cuda] [--precisions fp16 bf16] [--attention sdpa xformers]
                        [--checkpointing off on] [--batch-sizes 1 4] [--optimizers adamw lracs ...]
                        [--steps 10] [--sample-steps 50] [--concepts 2 14] [--skip sample fusion]
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from fusion import Problem, closed_form_time, quick_kinds, sd15_kinds
from mixofshow.models.embedded import EMBEDDED_RESOLUTION, build_embedded_pipeline, build_preset_pipeline
from mixofshow.optim import SPECS
from mixofshow.sample.pipeline import SampleConfig, generate
from mixofshow.utils.memory import tune_cpu_allocator
from trainstep import PROMPT, Trainer, _sync, flop_ratio, paired_times, time_steps

SECTIONS = ("train", "edlora_vs_plain", "sample", "fusion")


def make_pipeline(tiny: bool, device: torch.device):
    if tiny:
        return build_embedded_pipeline().to(device)
    return build_preset_pipeline("sd15", device)


def peak_mb(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"  # CPU: no per-measurement peak (process RSS only grows)
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def flop_bounds(tiny: bool, checkpointing: list[bool], batch_sizes: list[int], resolution: int) -> dict:
    """ED-LoRA / plain FLOP ratio per (checkpointing, batch size), counted on the meta device
    (where attention runs as plain matrix products, so the counter sees all of it)."""
    bounds = {}
    for checkpointing in checkpointing:
        pipe = build_embedded_pipeline().to("meta") if tiny else build_preset_pipeline("sd15", "meta")
        trainer = Trainer(pipe, checkpointing=checkpointing)
        for batch_size in batch_sizes:
            bounds[checkpointing, batch_size] = flop_ratio(trainer, batch_size, resolution)[2]
    return bounds


def train_section(args, device, resolution, precision, attention, checkpointing, bounds) -> None:
    tag = f"precision={precision} attention={attention} checkpointing={'on' if checkpointing else 'off'}"
    adamw_time: dict[int, float] = {}
    for name in args.optimizers:
        trainer = Trainer(make_pipeline(args.tiny, device), name, precision, checkpointing, attention)
        for batch_size in args.batch_sizes:
            pixels, prompts = trainer.batch(batch_size, resolution)
            if "train" not in args.skip:
                reset_peak(device)
                seconds = time_steps(lambda: trainer.step(pixels, prompts), device, args.steps, args.warmup)
                if name == "adamw":
                    adamw_time[batch_size] = seconds
                ratio = seconds / adamw_time[batch_size] if batch_size in adamw_time else float("nan")
                print(f"train {tag} batch={batch_size} optimizer={name} step_s={seconds:.4f} "
                      f"peak_mb={peak_mb(device)} ratio_to_adamw={ratio:.3f}", flush=True)
            if name == "adamw" and "edlora_vs_plain" not in args.skip:
                ed, plain, ratio = paired_times(lambda: trainer.step(pixels, prompts),
                                                lambda: trainer.step(pixels, prompts, plain=True),
                                                device, args.steps, args.warmup)
                bound = bounds[checkpointing, batch_size]
                print(f"edlora_vs_plain {tag} batch={batch_size} edlora_s={ed:.4f} plain_s={plain:.4f} "
                      f"ratio={ratio:.3f} flop_bound={bound:.3f} within_10pct={'yes' if ratio <= 1.1 * bound else 'no'}",
                      flush=True)
        del trainer
        reset_peak(device)


def sample_section(args, device, precision, attention) -> None:
    trainer = Trainer(make_pipeline(args.tiny, device), "adamw", precision, False, attention)
    pipe, encoder = trainer.pipe, trainer.model.encoder
    for batch_size in args.batch_sizes:
        config = SampleConfig(prompts=[PROMPT], num_images=batch_size, steps=args.sample_steps,
                              batch_size=batch_size, scheduler="dpm", guidance_scale=7.5)
        warm = SampleConfig(prompts=[PROMPT], num_images=batch_size, steps=2, batch_size=batch_size)
        with torch.autocast(device.type, trainer.dtype):
            generate(pipe, encoder, warm, progress=False)
            seconds = time_steps(lambda: generate(pipe, encoder, config, progress=False), device, 1, warmup=0)
        print(f"sample precision={precision} attention={attention} batch={batch_size} steps={args.sample_steps} "
              f"images_per_s={batch_size / seconds:.3f}", flush=True)


def fusion_section(args, device) -> None:
    kinds = (quick_kinds if args.tiny else sd15_kinds)(500, 50)
    for concepts in args.concepts:
        seconds = sum(closed_form_time(Problem(kind, concepts, device), 1e-6)[0] for kind in kinds)
        _sync(device)
        print(f"fusion concepts={concepts} closed_form_s={seconds:.2f} layer_kinds={len(kinds)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="embedded model on the CPU (what the test runs)")
    parser.add_argument("--device", help="default: cuda (tiny: cpu)")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "no"])
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "xformers"],
                        help="default: sdpa, and xformers when installed (CUDA)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 4 (tiny: 1 2)")
    parser.add_argument("--optimizers", nargs="+", help="default: adamw and every registered optimizer")
    parser.add_argument("--steps", type=int, help="timed training steps per measurement (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DPM-Solver steps per image")
    parser.add_argument("--concepts", type=int, nargs="+", default=[2, 14], help="fusion concept counts")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU (the GPU figures need a GPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, 4])
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    names = args.optimizers or sorted(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        parser.error(f"unknown optimizer {unknown[0]!r}; expected some of {sorted(SPECS)}")
    args.optimizers = ["adamw"] + [n for n in names if n != "adamw"]  # the reference goes first
    has_xformers = importlib.util.find_spec("xformers") is not None
    attention = args.attention or (["sdpa", "xformers"] if has_xformers and device.type == "cuda" else ["sdpa"])
    if "xformers" in attention and not has_xformers:
        parser.error("--attention xformers: xformers is not installed")
    resolution = EMBEDDED_RESOLUTION if args.tiny else 512
    name = "embedded (tiny)" if args.tiny else "SD 1.5 (random weights)"
    print(f"# {name} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {resolution} px; precisions {args.precisions}, attention {attention}, "
          f"checkpointing {args.checkpointing}, batch sizes {args.batch_sizes}, {args.steps} timed steps")
    if not {"train", "edlora_vs_plain"} <= set(args.skip):
        bounds = flop_bounds(args.tiny, [c == "on" for c in args.checkpointing], args.batch_sizes, resolution)
        for precision in args.precisions:
            for backend in attention:
                for ckpt in args.checkpointing:
                    train_section(args, device, resolution, precision, backend, ckpt == "on", bounds)
    if "sample" not in args.skip:
        for precision in args.precisions:
            for backend in attention:
                sample_section(args, device, precision, backend)
    if "fusion" not in args.skip:
        fusion_section(args, device)


if __name__ == "__main__":
    main()
