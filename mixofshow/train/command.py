"""``mixofshow train CONFIG [--optimizer NAME] [--max-steps N] [--output-dir DIR] [--set KEY=VALUE]
[--resume | --overwrite]``."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one ED-LoRA concept from a YAML config",
        description="Train one ED-LoRA concept (layer-wise token embeddings + LoRA) as a YAML config "
        "says (configs/README.md documents every key). The run folder gets the config copy, "
        "resumable checkpoints, tensorboard logs, validation samples, metrics.json and the "
        "concept file <name>.safetensors.",
    )
    p.add_argument("config", help="YAML training config (see configs/README.md)")
    p.add_argument("--optimizer", help="LoRA optimizer name (overrides optimizer.name)")
    p.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest checkpoint (the config must match)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in output_dir (its checkpoints, logs, samples, metrics, concept)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set lora.rank=8 (YAML value)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixofshow.train.config import load_train_config
    from mixofshow.utils.config import parse_overrides
    from mixofshow.utils.paths import check_output_dir

    overrides = parse_overrides(args.set)
    if args.optimizer:
        overrides["optimizer.name"] = args.optimizer
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    config = load_train_config(args.config, overrides)
    check_output_dir(config.output_dir, "output_dir")
    from mixofshow.train.loop import train  # torch & co. only once the cheap checks passed

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result.unchanged:
        print(f"run already finished ({result.steps} of {config.train.max_steps} steps); nothing changed")
    print(f"concept: {result.concept_path}")
    print(f"run folder: {result.output_dir} (checkpoints, logs, samples, metrics.json)")
    return 0
