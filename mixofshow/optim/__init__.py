"""LoRA optimizers, one file each, selected by name through the registry."""

from mixofshow.optim.base import LoRAOptimizer
from mixofshow.optim.registry import OPTIMIZERS, SPECS, OptimizerSpec, build_optimizer, check_hparams, describe, get_spec

__all__ = ["LoRAOptimizer", "OPTIMIZERS", "SPECS", "OptimizerSpec", "build_optimizer", "check_hparams", "describe", "get_spec"]
