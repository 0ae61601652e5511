"""mixofshow: ED-LoRA concept adapters for Stable Diffusion, trained with selectable LoRA optimizers."""

__version__ = "0.1.0"
__all__ = ["__version__"]
