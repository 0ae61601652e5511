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


# marks a run folder the demo made: only such a folder is replaced when the demo runs again
DEMO_MARKER = ".mixofshow-demo"
# the demo's prompts; the samples are training's end-of-run validation samples
DEMO_PROMPTS = ["a photo of <robot1> <robot2>", "a photo of <robot1> <robot2> on the beach"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train the example concept on the embedded model and sample it",
        description="Train the shipped robot concept on the embedded tiny model (offline, CPU, a "
        "minute or two), then sample it at LoRA scales 0 and 1 into the run folder's samples/.",
    )
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--optimizer", default="adamw", help="LoRA optimizer (default adamw)")
    p.add_argument("--max-steps", type=int, default=60, help="training steps (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixofshow.train.config import load_train_config
    from mixofshow.utils.paths import check_output_dir

    config_path = repo_root() / "configs" / "example.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the demo needs the repository checkout (configs/, datasets/)")
    config = load_train_config(
        config_path,
        {"output_dir": args.output_dir, "optimizer.name": args.optimizer, "train.max_steps": args.max_steps,
         # samples at the end of training, in training's layout: samples/step_N/scale_S + grid.png
         "validation.every": 0, "validation.prompts": DEMO_PROMPTS, "validation.prompts_file": None,
         "validation.lora_scales": [0.0, 1.0], "validation.num_images": 2, "validation.steps": 20},
    )
    check_output_dir(config.output_dir, "--output-dir")
    from mixofshow.train.folder import claim_run_folder
    from mixofshow.train.loop import train
    from mixofshow.train.validation import validation_folder
    from mixofshow.utils.config import ConfigError
    from mixofshow.utils.io import atomic_write_text

    marker = Path(config.output_dir) / DEMO_MARKER
    if not marker.is_file():  # never replace a run the demo did not make
        try:
            claim_run_folder(config)
        except ConfigError:
            raise ConfigError(f"--output-dir {config.output_dir}: holds a training run the demo did not make; "
                              "the demo replaces only its own runs: choose another --output-dir") from None
        atomic_write_text(marker, "made by `mixofshow demo`: running the demo again replaces this run\n")
    result = train(config, overwrite=True)  # the demo's own folder: rerunning replaces it
    out = validation_folder(config, result.steps)
    print(f"trained concept: {result.concept_path} ({result.steps} steps, optimizer {config.optimizer.name})")
    print(f"samples:         {out}/scale_0 (embeddings only) and {out}/scale_1 (with LoRA); all: {out}/grid.png")
    print(f"logs:            tensorboard --logdir {result.output_dir / 'logs'}")
    return 0
