"""Load a base Stable Diffusion 1.x pipeline: embedded model, hub id, local folder or single file.

Offline-safe: with ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) nothing touches the
network, and a model that is not on disk gives an error saying what to download or where to
point instead of a network traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from mixofshow.models.embedded import build_embedded_pipeline
from mixofshow.models.identity import EMBEDDED_ALIASES
from mixofshow.models.pretrained import TOYWORLD_NAME, build_toyworld_pipeline
from mixofshow.utils.io import file_sha256

__all__ = ["ModelLoadError", "check_base_model", "load_pipeline", "is_offline", "looks_like_path", "resolve_dtype"]

log = logging.getLogger(__name__)

_SINGLE_FILE_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(ValueError):
    """The base model could not be found or read; the message says what to do."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"Invalid dtype {name!r}; expected one of {sorted(table)}") from None


def load_pipeline(
    base_model: str,
    dtype: str | torch.dtype = torch.float32,
    config: str | None = None,
    local_files_only: bool | None = None,
) -> StableDiffusionPipeline:
    """Load ``base_model``: ``"embedded"``, ``"toyworld"``, a diffusers folder, a ``.safetensors`` file, or a hub id.

    Args:
        base_model: what to load (see above).
        dtype: weights dtype.
        config: for a single file, a local diffusers folder (or cached hub id) whose configs
            describe the architecture; without it, the SD 1.5 configs shipped in the package
            (offline).
        local_files_only: never use the network; defaults to ``HF_HUB_OFFLINE``.
    """
    dtype = resolve_dtype(dtype)
    offline = is_offline() if local_files_only is None else local_files_only
    if base_model in EMBEDDED_ALIASES:
        return build_embedded_pipeline(dtype)
    if base_model == TOYWORLD_NAME:
        return build_toyworld_pipeline(dtype)
    path = Path(base_model).expanduser()
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path}: not a diffusers pipeline folder (no model_index.json). Point base_model "
                "at a folder saved with `pipe.save_pretrained(...)`, a .safetensors file, or a hub id."
            )
        return _wrap(lambda: StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **common), path)
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"{path}: pickled checkpoints are not loaded (they can run code). Convert it to "
                ".safetensors first, or use a diffusers folder."
            )
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: expected a .safetensors checkpoint or a diffusers folder")
        return _single_file(path, config, dtype, offline, common)
    if looks_like_path(base_model):
        raise ModelLoadError(f"{base_model}: no such file or folder")
    return _wrap(
        lambda: StableDiffusionPipeline.from_pretrained(base_model, local_files_only=offline, **common),
        base_model,
        hub=True,
    )


def _single_file(path: Path, config: str | None, dtype, offline: bool, common: dict) -> StableDiffusionPipeline:
    """An original-layout SD 1.x file, configured by ``config`` (a diffusers folder or cached hub
    id) or, by default, by the SD 1.5 configs that ship in the package: no network either way.

    The pipeline's name is the file's resolved path and its sha256 is recorded beside it, so a
    concept trained on it names the file it needs (``mixofshow.models.identity``).
    """
    import tempfile

    from mixofshow.models.single_file import config_folder

    with tempfile.TemporaryDirectory(prefix="mixofshow-config-") as tmp:
        if config is None:
            folder = config_folder("sd15", tmp)
            config_name = "the SD 1.5 configs shipped in mixofshow/models/sd15 (another architecture: --base-model-config)"
        else:
            folder, config_name = config, f"--base-model-config {config}"
        kwargs = dict(common, local_files_only=True if config is None else offline, config=str(folder))
        pipe = _wrap(lambda: StableDiffusionPipeline.from_single_file(str(path), **kwargs), path,
                     hint=f"The file is not a Stable Diffusion 1.x checkpoint that fits {config_name}")
    pipe.register_to_config(_name_or_path=str(path.resolve()), _mixofshow_sha256=file_sha256(path),
                            _mixofshow_config=None if config is None else str(config))
    return pipe


def check_base_model(base_model: str) -> None:
    """Refuse, without loading anything, a base model that :func:`load_pipeline` could not find: a
    missing file or folder, a folder that is not a pipeline, a pickle, or (offline) a hub id that
    is not in the local cache. Raises :class:`ModelLoadError` with the same message a load gives."""
    if base_model in EMBEDDED_ALIASES or base_model == TOYWORLD_NAME:
        return
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return
    if path.is_file():
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: expected a .safetensors checkpoint or a diffusers folder")
        return
    if looks_like_path(base_model):
        raise ModelLoadError(f"{base_model}: no such file or folder")
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(base_model, "model_index.json"), str):
            raise ModelLoadError(
                f"Cannot load base model {base_model!r}: it is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set; use embedded, toyworld, a local folder or a .safetensors file"
            )


def looks_like_path(name: str) -> bool:
    """Whether a base-model name is a file or folder path: not a model the package ships
    (``embedded``, ``toyworld``) and not a hub id (``org/name``)."""
    if name in EMBEDDED_ALIASES or name == TOYWORLD_NAME:
        return False
    return name.startswith((".", "/", "~")) or name.endswith(_SINGLE_FILE_SUFFIXES + _PICKLE_SUFFIXES) \
        or name.count("/") != 1 or os.sep in name and name.count(os.sep) > 1


def _wrap(load, what, hub: bool = False, hint: str | None = None) -> StableDiffusionPipeline:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        return load()
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError, SingleFileComponentError, KeyError, RuntimeError) as err:
        if hub:
            hint = (
                f"It is not in the local Hugging Face cache and "
                f"{'HF_HUB_OFFLINE is set' if is_offline() else 'could not be downloaded'}. "
                f"Download it first (`hf download {what}`) on a machine with network access, "
                "or point base_model at a local diffusers folder or .safetensors file."
            )
        elif hint is None:
            hint = "The folder is not a Stable Diffusion 1.x pipeline that diffusers can load"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"Cannot load base model {what}: {hint} ({cause[:300]})") from None
