"""``python -m app [--host ...] [--port ...]``: the same as ``mixofshow app``."""

import sys

from mixofshow.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
