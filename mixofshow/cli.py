"""``mixofshow <command>``: the command-line entry point.

Each command lives beside the code it drives and exposes ``add_parser(subparsers)`` (which sets
``func`` on its parser) and a ``run``-style function. Command modules import torch, diffusers and
the like only inside those functions, so ``mixofshow --help`` answers in well under a second
(``tests/test_cli.py`` checks it). A command is one line of ``_COMMANDS``; a listed module
that cannot be imported is an error, never skipped. User errors (``ValueError``,
``FileNotFoundError``) print one clear line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mixofshow.utils.memory import tune_cpu_allocator

__all__ = ["CommandModuleError", "main", "build_parser"]

# modules defining add_parser(subparsers); their order is the order of `mixofshow --help`
_COMMANDS = (
    "mixofshow.train.command",
    "mixofshow.sample.command",
    "mixofshow.fuse.command",
    "mixofshow.evaluate.command",
    "mixofshow.concepts.command",
    "mixofshow.demo",
    "mixofshow.optim.command",
    "mixofshow.toyworld.pretrain",
    "app.command",
)


class CommandModuleError(ImportError):
    """A module listed in ``_COMMANDS`` is missing or broken (a bug of the installation)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixofshow",
        description="ED-LoRA concept adapters for Stable Diffusion, trained with selectable LoRA optimizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 (re-raised, naming the module)
            raise CommandModuleError(f"mixofshow: command module {name} cannot be imported: {err!r}") from err
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    tune_cpu_allocator()  # reuse freed blocks instead of faulting them in again every step
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mixofshow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixofshow {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
