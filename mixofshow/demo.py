"""``mixofshow demo``: train the shipped robot on the toy world's base model, then sample it in new scenes.

Runs offline on a CPU in a few minutes (``configs/example.yaml``: base model ``toyworld``, the
small Stable Diffusion this project pre-trains on a world of known answers, docs/toyworld.md).
The base model has never seen this robot (the world holds its look out), so what the grid shows
was learned from the eight training images. The samples are training's end-of-run validation
samples: one row with the learned embeddings alone (LoRA scale 0), one with the whole concept.
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
DEMO_PROMPTS = [  # scenes in the world's words; the robot was trained alone, never beside another object
    "a photo of a <robot1> <robot2>, on the beach",
    "a photo of a <robot1> <robot2>, at night",
    "a photo of a <robot1> <robot2>, indoor",
    "a photo of a <robot1> <robot2> and a yellow cat, outdoor, the robot on the left",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train the example robot on the toy world's base model and sample it in new scenes",
        description="Train the shipped robot concept on the toy world's base model (offline, CPU, a few "
        "minutes), then sample it on the beach, at night, indoors and beside a cat, at LoRA scales 0 and 1, "
        "into the run folder's samples/ (grid.png: one row per scale).",
    )
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--optimizer", default="adamw", help="LoRA optimizer (default adamw)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the config's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixofshow.train.config import load_train_config
    from mixofshow.utils.paths import check_output_dir

    config_path = repo_root() / "configs" / "example.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the demo needs the repository checkout (configs/, datasets/)")
    config = load_train_config(
        config_path,
        {"output_dir": args.output_dir, "optimizer.name": args.optimizer,
         **({"train.max_steps": args.max_steps} if args.max_steps is not None else {}),
         # samples at the end of training, in training's layout: samples/step_N/scale_S + grid.png
         "validation.every": 0, "validation.prompts": DEMO_PROMPTS, "validation.prompts_file": None,
         "validation.lora_scales": [0.0, 1.0], "validation.num_images": 2, "validation.steps": 25},
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
