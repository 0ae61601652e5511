"""Package attributes imported on first use (PEP 562), so that importing a package is cheap.

``mixofshow --help`` imports every command module, and importing ``mixofshow.fuse.command``
first runs ``mixofshow/fuse/__init__.py``. A package ``__init__`` that re-exports its API
therefore maps names to submodules here instead of importing torch-heavy modules eagerly::

    __getattr__, __dir__ = lazy_exports(__name__, {"fuse_concepts": "run", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: name -> the submodule (relative) defining it."""
    exports = dict(exports)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
