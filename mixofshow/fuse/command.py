"""``mixofshow fuse CONFIG``: fuse several trained concepts into one model.

Example::

    mixofshow fuse configs/fuse_example.yaml
    mixofshow fuse configs/fuse_example.yaml --method weight --output runs/fused/weight.safetensors
    mixofshow sample --concept runs/fused/fused.safetensors --prompt "<robot1> <robot2> and <cat1> <cat2>"
"""

from __future__ import annotations

import argparse
import logging

from mixofshow.fuse.config import METHODS

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fuse",
        help="fuse several concepts into one model (gradient fusion)",
        description="Fuse trained ED-LoRA concepts into one model, as Mix-of-Show's gradient "
        "fusion does: per layer, the weight closest to every concept's own outputs on that "
        "concept's inputs. Writes a compact fused .safetensors file (only changed layers and all "
        "concept tokens) that `mixofshow sample --concept` takes like a concept file, and "
        "optionally a full diffusers folder.",
    )
    p.add_argument("config", help="fusion config (YAML); see configs/fuse_example.yaml")
    p.add_argument("--output", help="fused file to write (overrides the config's output)")
    p.add_argument("--method", choices=METHODS, help="closed-form (default), lbfgs (the original's) or weight")
    p.add_argument("--diffusers-output", metavar="DIR", help="also write a full diffusers folder")
    p.add_argument("--base-model", help="base model (default: the config's, else the concepts')")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from mixofshow.fuse.config import load_fuse_config
    from mixofshow.utils.paths import check_output_dir, check_output_file

    overrides = {
        "output": args.output,
        "method": args.method,
        "diffusers_output": args.diffusers_output,
        "base_model": args.base_model,
        "device": args.device,
    }
    config = load_fuse_config(args.config, overrides)
    check_output_file(config.output, "output")  # before the fusion, which takes minutes on real models
    if config.diffusers_output:
        check_output_dir(config.diffusers_output, "diffusers_output")
    from mixofshow.fuse.run import fuse_concepts  # torch & co. only once the cheap checks passed

    outcome = fuse_concepts(config, progress=not args.no_progress)
    words = " ".join(c["prompt"] for c in outcome.fused.meta.concepts)
    log.info("fused %d concepts in %.1f s -> %s", len(outcome.fused.meta.concepts), outcome.seconds, outcome.output)
    print(f"{outcome.output}  ({config.method}; concepts: {words})")
    if outcome.diffusers_output:
        print(f"{outcome.diffusers_output}  (diffusers folder)")
    return 0
