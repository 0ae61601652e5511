"""``mixofshow train CONFIG [--optimizer NAME] [--max-steps N] [--output-dir DIR] [--set KEY=VALUE]
[--resume | --overwrite] [--num-processes N]``.

``--num-processes N`` (N >= 2) re-runs this command under ``accelerate launch`` in N
data-parallel processes (``mixofshow/train/distributed.py``; README.md, "Multi-GPU and multi-node").
"""

from __future__ import annotations

import argparse
import os

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
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (launches `accelerate launch`); "
                        "train.batch_size is per process")
    p.set_defaults(func=run, train_parser=p)


def _forwarded_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """This command's arguments as given, without ``--num-processes`` (for the launched processes)."""
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "num_processes") or value is None or value is False or value == []:
            continue
        if not action.option_strings:
            argv.append(str(value))
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[-1])
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [action.option_strings[-1], str(item)]
        else:
            argv += [action.option_strings[-1], str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    if args.num_processes < 1:
        raise ValueError(f"--num-processes: expected an integer >= 1, got {args.num_processes}")
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
    # torch & co. only once the cheap checks passed
    from mixofshow.train.distributed import end_process_group, in_launched_process, launch

    if args.num_processes > 1 and not in_launched_process():
        return launch(args.num_processes, ["train", *_forwarded_argv(args.train_parser, args)])
    from mixofshow.train.loop import train

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    end_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # a launched process other than the main one: the main one reports
    if result.unchanged:
        print(f"run already finished ({result.steps} of {config.train.max_steps} steps); nothing changed")
    print(f"concept: {result.concept_path}")
    print(f"run folder: {result.output_dir} (checkpoints, logs, samples, metrics.json)")
    return 0
