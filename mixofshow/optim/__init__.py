"""LoRA optimizers, one file each, selected by name through the registry.

Names are imported on first use (:mod:`mixofshow.utils.lazy`), so ``mixofshow --help`` loads no torch.
"""

from mixofshow.utils.lazy import lazy_exports

__all__ = ["LoRAOptimizer", "OPTIMIZERS", "SPECS", "OptimizerSpec", "build_optimizer", "describe", "get_spec"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "LoRAOptimizer": "base",
    **dict.fromkeys(("OPTIMIZERS", "SPECS", "OptimizerSpec", "build_optimizer", "describe", "get_spec"), "registry"),
})
