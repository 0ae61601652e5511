"""``mixofshow optimizers``: list the registered LoRA optimizers, one line each."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimizers",
        help="list the registered LoRA optimizers",
        description="List the registered LoRA optimizers, one line each: name, paper, optimizer "
        "state, and whether it follows public code or was reconstructed from the paper.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixofshow.optim import describe

    for line in describe():
        print(line)
    return 0
