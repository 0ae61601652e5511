"""``mixofshow demo``: train the shipped example concept briefly on the embedded model, then sample it.

Runs offline on a CPU in a minute or two. The embedded model has random weights, so its images
are noise-like: the demo shows the whole path (data -> ED-LoRA training -> concept file ->
sampling), not image quality. Use a real SD 1.x base model for pictures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run", "repo_root"]


def repo_root() -> Path:
    """The checkout holding ``configs/`` and ``datasets/`` (the package is installed editable)."""
    return Path(__file__).resolve().parents[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the example concept on the embedded model and sample it")
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--optimizer", default="adamw", help="LoRA optimizer (default adamw)")
    p.add_argument("--max-steps", type=int, default=60, help="training steps (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixofshow.sample.load import load_adapter
    from mixofshow.sample.pipeline import SampleConfig, generate
    from mixofshow.models.loading import load_pipeline
    from mixofshow.train.config import load_train_config
    from mixofshow.train.loop import train

    config_path = repo_root() / "configs" / "example.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the demo needs the repository checkout (configs/, datasets/)")
    config = load_train_config(
        config_path,
        {"output_dir": args.output_dir, "optimizer.name": args.optimizer,
         "train.max_steps": args.max_steps, "validation.every": -1},
    )
    result = train(config, overwrite=True)  # the demo's folder is its own: rerunning replaces it
    pipe = load_pipeline(config.base_model)
    adapter = load_adapter(pipe, result.concept_path)
    out = Path(args.output_dir) / "samples"
    prompts = ["a photo of <robot1> <robot2>", "a photo of <robot1> <robot2> on the beach"]
    for scale in (0.0, 1.0):
        generate(pipe, adapter.encoder, SampleConfig(
            prompts=prompts, num_images=2, steps=20, lora_scale=scale,
            output_dir=out / f"lora_scale_{scale:g}", concept=str(result.concept_path), base_model=config.base_model,
        ), progress=False)
    print(f"trained concept: {result.concept_path} ({result.steps} steps, optimizer {config.optimizer.name})")
    print(f"samples:         {out}/lora_scale_0 (embeddings only) and {out}/lora_scale_1 (with LoRA)")
    print(f"logs:            tensorboard --logdir {result.output_dir / 'logs'}")
    return 0
