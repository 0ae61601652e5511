"""Multi-concept fusion: several ED-LoRA concepts into one model (Mix-of-Show's gradient fusion).

Data flow: concept files (:mod:`.sources`) -> stages on one base pipeline (:mod:`.stages`:
tokens, text encoder, cross-attention K/V, spatial layers), whose forward hooks accumulate
float64 Gram statistics (:mod:`.gram`) -> per-layer solve (closed form, LBFGS or weight
average) -> a compact fused file (:mod:`.io`) and optionally a diffusers folder (:mod:`.export`).

Names are imported on first use (:mod:`mixofshow.utils.lazy`), so ``mixofshow --help`` loads no torch.
"""

from mixofshow.utils.lazy import lazy_exports

__all__ = [
    "FUSED_FORMAT",
    "FuseConceptConfig",
    "FuseConfig",
    "FuseOutcome",
    "FusedFile",
    "FusedMeta",
    "FusedModel",
    "GramStats",
    "LowRank",
    "apply_fused",
    "fuse_concepts",
    "load_fuse_config",
    "load_fused",
    "objective",
    "save_fused",
    "solve_closed_form",
    "solve_lbfgs",
    "weight_fusion",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("FuseConceptConfig", "FuseConfig", "load_fuse_config"), "config"),
    **dict.fromkeys(("GramStats", "LowRank", "objective", "solve_closed_form", "solve_lbfgs", "weight_fusion"), "gram"),
    **dict.fromkeys(("FUSED_FORMAT", "FusedFile", "FusedMeta", "FusedModel", "apply_fused", "load_fused", "save_fused"), "io"),
    **dict.fromkeys(("FuseOutcome", "fuse_concepts"), "run"),
})
