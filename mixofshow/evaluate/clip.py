"""CLIP models for the alignment scores, resolved offline-first through open_clip.

Conventions of Mix-of-Show and Custom Diffusion (README "Evaluation and optimizer comparison"):
open_clip ``ViT-B-32-quickgelu`` with OpenAI weights, text alignment ``2.5 * max(cos, 0)``
between an image and ``"A photo depicts " + prompt``, image alignment ``max(cos, 0)``.

``ClipSpec.model`` is an open_clip model name (``open_clip.list_models()``), a path to an
open_clip model-config JSON file, ``tiny`` (the 32-wide config shipped beside this file, for
tests and the offline demo) or ``toyworld`` (the toy world's evaluation CLIP with its shipped
weights, trained apart from the toy world's conditioning text encoder; docs/toyworld.md). ``ClipSpec.weights`` is a pretrained tag of that model, a local
weights file (safetensors, a state dict, or OpenAI's TorchScript ``.pt``), or ``random``
(seeded random weights; only ever used when asked for, and every output says so). Tags are
looked up in the local caches first (Hugging Face hub cache, open_clip's ``~/.cache/clip``);
offline, a missing file is a :class:`MissingWeightsError` that says what to download and where
to put it, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixofshow.utils.io import read_json

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_WEIGHTS",
    "TINY_CLIP_CONFIG",
    "TEXT_PREFIX",
    "ClipSpec",
    "ClipScorer",
    "MissingWeightsError",
    "load_clip",
]

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-32-quickgelu"
DEFAULT_CLIP_WEIGHTS = "openai"
TINY_CLIP_CONFIG = Path(__file__).with_name("tiny_clip.json")
# the toy world's evaluation CLIP: config beside the toy world's model configs, weights shipped with them
TOYWORLD_CLIP_CONFIG = Path(__file__).parents[1] / "models" / "toyworld" / "eval_clip.json"
TEXT_PREFIX = "A photo depicts "


class MissingWeightsError(FileNotFoundError):
    """The CLIP (or DINO) weights are not on this machine; the message says how to provide them."""


@dataclass(frozen=True)
class ClipSpec:
    model: str = DEFAULT_CLIP_MODEL  # open_clip name, a model-config JSON file, "tiny" or "toyworld"
    weights: str | None = None  # tag, local file or "random"; None: "openai" (config files: "random")
    text_scale: float = 2.5  # CLIP-T = text_scale * max(cos, 0)
    image_scale: float = 1.0  # CLIP-I = image_scale * max(cos, 0)
    seed: int = 0  # seed of random weights
    cache_dir: str | None = None  # download cache for hub and URL weights (default: HF cache, ~/.cache/clip)


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer; features are L2-normalised."""

    def __init__(self, model, preprocess, tokenizer, info: dict[str, Any], device) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.info, self.device = info, device

    def image_features(self, images) -> Any:
        import torch

        with torch.no_grad():
            batch = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
            feats = self.model.encode_image(batch).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def text_features(self, texts: list[str]) -> Any:
        import torch

        with torch.no_grad():
            feats = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return feats / feats.norm(dim=-1, keepdim=True)


def _model_name(model: str) -> tuple[str, Path | None]:
    """(open_clip name, config file or None); a config file is registered under a unique name."""
    import open_clip
    from open_clip import factory

    path = {"tiny": TINY_CLIP_CONFIG, "toyworld": TOYWORLD_CLIP_CONFIG}.get(model, Path(model))
    if model in ("tiny", "toyworld") or model.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"--clip {model}: model-config file not found")
        cfg = read_json(path, "--clip ")
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"--clip {path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
        name = "mixofshow-file-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        factory._MODEL_CONFIGS[name] = cfg  # open_clip's registry of configs (add_model_config keys by stem)
        return name, path
    if model.replace("/", "-") not in open_clip.list_models():
        raise ValueError(
            f"--clip {model}: not an open_clip model name nor a .json model config "
            f"(e.g. {DEFAULT_CLIP_MODEL}, ViT-L-14, tiny; `python -c 'import open_clip; print(open_clip.list_models())'`)"
        )
    return model.replace("/", "-"), None


def _cached_file(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The tag's weights if already downloaded (HF hub cache or open_clip's URL cache)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # as open_clip: "org/repo/" or "org/repo/file"
        for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def _missing_message(name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None, why: str) -> str:
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    hub = cfg.get("hf_hub", "").rstrip("/")
    ways = []
    if hub:
        ways.append(
            f"download https://huggingface.co/{hub}/resolve/main/{HF_SAFE_WEIGHTS_NAME} into the Hugging Face "
            f"cache (`huggingface-cli download {hub} {HF_SAFE_WEIGHTS_NAME}`, then copy ~/.cache/huggingface)"
        )
    if cfg.get("url"):
        cache = cache_dir or "~/.cache/clip"
        ways.append(f"download {cfg['url']} to {cache}/{os.path.basename(cfg['url'])}")
    ways.append("pass the downloaded file with --clip-weights FILE (Python: ClipSpec(weights=FILE))")
    ways.append("for images of the toy world (base model toyworld), score offline with --clip toyworld")
    return f"CLIP weights {name}/{tag} are not available ({why}): " + "; or ".join(ways)


def _resolve_weights(name: str, config_file: Path | None, spec: ClipSpec) -> tuple[str, str | None]:
    """(weights label, local file or None for random)."""
    import open_clip

    if spec.model == "toyworld" and not spec.weights:
        from mixofshow.models.pretrained import toyworld_weights_dir

        shipped = toyworld_weights_dir() / "eval_clip.safetensors"
        if not shipped.is_file():
            raise MissingWeightsError(f"{shipped}: the toy world's evaluation CLIP is not in this installation; "
                                      "`mixofshow pretrain` trains it (docs/toyworld.md)")
        return "toyworld (pre-trained on the toy world)", str(shipped)
    weights = spec.weights or ("random" if config_file is not None else DEFAULT_CLIP_WEIGHTS)
    if weights == "random":
        return f"random (seed {spec.seed}; not a meaningful score)", None
    if os.path.isfile(weights):
        return f"file {weights}", weights
    if config_file is not None:
        raise FileNotFoundError(f"--clip-weights {weights}: file not found (a config-file model takes a local file or 'random')")
    cfg = open_clip.get_pretrained_cfg(name, weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"--clip-weights {weights}: not a file nor a pretrained tag of {name} (tags: {', '.join(tags) or 'none'})")
    found = _cached_file(cfg, spec.cache_dir)
    if found:
        return weights, found
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MissingWeightsError(_missing_message(name, weights, cfg, spec.cache_dir, "offline (HF_HUB_OFFLINE=1) and not cached"))
    from open_clip.pretrained import download_pretrained

    try:
        return weights, download_pretrained(cfg, cache_dir=spec.cache_dir)
    except Exception as err:  # network errors of urllib / huggingface_hub, many types
        raise MissingWeightsError(_missing_message(name, weights, cfg, spec.cache_dir, f"download failed: {err}")) from None


def _load_torchscript_state(path: str) -> dict[str, Any] | None:
    """OpenAI's ``.pt`` files are TorchScript archives, which ``torch.load(weights_only=True)`` refuses."""
    import torch

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        if not any(n.endswith("constants.pkl") for n in zf.namelist()):
            return None
    state = torch.jit.load(path, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def load_clip(spec: ClipSpec | None = None, device: str | None = None) -> ClipScorer:
    """Build the CLIP model ``spec`` names (see the module docstring); raises on missing weights."""
    import open_clip
    import torch

    spec = spec or ClipSpec()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name, config_file = _model_name(spec.model)
    label, weights_file = _resolve_weights(name, config_file, spec)
    tag_cfg = open_clip.get_pretrained_cfg(name, spec.weights or DEFAULT_CLIP_WEIGHTS) if config_file is None else {}
    preprocess = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    jit_state = _load_torchscript_state(weights_file) if weights_file else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=None if jit_state is not None else weights_file,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                **preprocess,
                weights_only=True,
            )
        except RuntimeError as err:
            raise ValueError(f"CLIP weights {weights_file} do not fit model {spec.model}: {err}") from None
    if jit_state is not None:
        from open_clip.convert import convert_state_dict

        model.load_state_dict(convert_state_dict(model, jit_state), strict=True)
    model = model.to(device).eval()
    info = {
        "model": str(config_file) if config_file else name,
        "weights": label,
        "weights_file": weights_file,
        "text_scale": spec.text_scale,
        "image_scale": spec.image_scale,
        "text_template": TEXT_PREFIX + "{prompt with concept words replaced by the class word}",
        "formula": f"CLIP-T = {spec.text_scale:g} * max(cos, 0); CLIP-I = {spec.image_scale:g} * max(cos, 0)",
    }
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(name), info, device)
