"""Fuse the concepts of a :class:`~mixofshow.fuse.config.FuseConfig` and write the results.

The CLI (``mixofshow fuse CONFIG``) and any other front end call :func:`fuse_concepts`. Nothing
is written until every stage has finished: the fused file and the optional diffusers folder are
written to temporary names and renamed into place at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixofshow.fuse.config import FuseConfig
from mixofshow.fuse.io import FusedFile, save_fused
from mixofshow.fuse.sources import FuseSource, load_sources
from mixofshow.fuse.stages import Fusion
from mixofshow.models.identity import sampling_state
from mixofshow.models.loading import load_pipeline

__all__ = ["FuseOutcome", "fuse_concepts", "resolve_base_model"]

log = logging.getLogger(__name__)


@dataclass
class FuseOutcome:
    fused: FusedFile
    output: Path | None  # the fused file (None when not written)
    diffusers_output: Path | None
    pipe: object  # the base pipeline with the fused model applied
    seconds: float


def resolve_base_model(config: FuseConfig, sources: list[FuseSource]) -> str:
    recorded = sources[0].concept.meta.base_model
    if config.base_model:
        return config.base_model
    if not recorded or recorded == "unknown":
        raise ValueError(
            f"{sources[0].path}: no base model recorded in the concept file; set base_model in the config"
        )
    return recorded


def fuse_concepts(
    config: FuseConfig, pipe=None, progress: bool = True, write: bool = True,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> FuseOutcome:
    """Load the concepts and the base model, run every stage, then write the outputs.

    ``pipe``: a base pipeline to fuse into (modified in place); by default the config's (or the
    concepts') base model is loaded. ``write=False`` returns the result without writing files.
    ``on_progress(stage, done, total)``: layer-by-layer progress (the app's progress bar).
    """
    start = time.perf_counter()
    sources = load_sources(config.concepts)
    if pipe is None:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe = load_pipeline(resolve_base_model(config, sources), dtype=config.dtype,
                             config=config.base_model_config).to(device)
    for part in (pipe.unet, pipe.text_encoder):
        part.requires_grad_(False)
    log.info("fusing %d concepts (%s) by %s", len(sources), ", ".join(s.name for s in sources), config.method)
    with sampling_state(pipe):  # fusion records in eval mode; the pipe's modes are restored after
        fused = Fusion(pipe, sources, config, progress=progress, on_progress=on_progress).run()
    output = diffusers_output = None
    if write:
        output = Path(config.output)
        if config.diffusers_output:
            from mixofshow.fuse.export import export_diffusers

            # the folder first (slow, may fail), the small fused file last
            diffusers_output = export_diffusers(pipe, config.diffusers_output, fused.meta)
        save_fused(output, fused, config.save_dtype)
        log.info("wrote %s (%d layers, %d words)", output, len(fused.deltas), len(fused.meta.words))
    return FuseOutcome(fused, output, diffusers_output, pipe, time.perf_counter() - start)
