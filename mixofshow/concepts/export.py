"""Concept interchange: import original Mix-of-Show ``.pth`` files, export to diffusers and kohya.

Import (``import_mixofshow_pth``): the original code saves ``torch.save({'params': {...}})`` with
``new_concept_embedding`` (``{word: (16, 768)}``), ``text_encoder`` and ``unet`` dicts of
``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` (module names relative to the text
encoder / UNet, e.g. ``text_model.encoder.layers.0.self_attn.q_proj`` and
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``). Its layers compute
``W x + alpha * up(down(x))`` with ``alpha = 1`` and no ``1/r``, which is our ``scale = 1``.
The file is read with ``torch.load(weights_only=True)``: anything but tensors and plain
containers is refused, never executed.

Export: the LoRA part of a concept in the two layouts other tools load.

* ``export_diffusers_lora``: PEFT/diffusers keys ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight`` (and ``text_encoder.``), loadable with ``pipe.load_lora_weights(path)``.
  diffusers scales by ``alpha / r`` and defaults ``alpha`` to ``r`` when no alphas are stored,
  so our scale ``s`` is folded into ``B``.
* ``export_kohya_lora``: ``lora_unet_<module, dots as _>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (text encoder: ``lora_te_``), with ``alpha = s * r`` so that kohya's
  ``W0 + (alpha / r) up @ down`` equals ours.

Text-encoder module names: transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.0...``);
older versions, Mix-of-Show and other tools say ``text_model.encoder.layers.0...``. Imports map to
the installed layout; exports write the ``text_model.`` form everyone reads (diffusers strips it
when the installed ``CLIPTextModel`` is flat).

Neither layout can express ED-LoRA's layer-wise embeddings (one token per cross-attention layer
needs the layer-wise attention processors of this package), so the embeddings are written beside
as ``<name>.embeddings.safetensors`` (``{word: (L, dim)}``; row ``l`` is token ``<word_l{l}>``,
read by cross-attention layer ``l`` in forward order). Plain diffusers gets the LoRA only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch

from mixofshow.concepts.attention import num_cross_attention_layers
from mixofshow.models.identity import base_model_name
from mixofshow.concepts.io import ConceptFile, ConceptMeta, load_concept
from mixofshow.concepts.lora import text_encoder_lora_targets, unet_lora_targets
from mixofshow.utils.io import FileFormatError, save_safetensors

__all__ = [
    "EMBEDDINGS_FORMAT",
    "embeddings_path",
    "export_textual_inversion",
    "textual_inversion_path",
    "export_diffusers_lora",
    "export_kohya_lora",
    "import_mixofshow_pth",
]

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "mixofshow.layerwise_embeddings/1"
_WORD = re.compile(r"^<[a-z0-9][a-z0-9_\-]*>$")  # as concepts.tokens requires
# modules ED-LoRA adapts (concepts/lora.py): CLIP self-attention and UNet attn1/attn2 projections
_TARGET_SUFFIX = {
    "text_encoder": re.compile(r"\.(q_proj|k_proj|v_proj|out_proj)$"),
    "unet": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
}
_KOHYA_PREFIX = {"text_encoder": "lora_te_", "unet": "lora_unet_"}


# --------------------------------------------------------------------------- names


@lru_cache(maxsize=1)
def _installed_clip_has_text_model() -> bool:
    """Whether the installed transformers nests CLIPTextModel's modules under ``text_model``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=4)
    return hasattr(CLIPTextModel(cfg), "text_model")


def _installed_text_module(module: str, text_encoder=None) -> str:
    """A CLIP text-encoder module name in the layout of ``text_encoder`` (or the installed one)."""
    nested = hasattr(text_encoder, "text_model") if text_encoder is not None else _installed_clip_has_text_model()
    flat = module.removeprefix("text_model.")
    return f"text_model.{flat}" if nested else flat


def _portable_text_module(module: str) -> str:
    """The ``text_model.``-prefixed name used by transformers < 5, Mix-of-Show, kohya and others."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _portable_name(name: str) -> tuple[str, str]:
    """``"text_encoder.<module>"`` -> (component, portable module name)."""
    component, _, module = name.partition(".")
    return component, _portable_text_module(module) if component == "text_encoder" else module


# --------------------------------------------------------------------------- import


def _torch_load(path: Path):
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file (expected a Mix-of-Show .pth checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            what = f" (it references {found.group(1)})" if found else ""
            raise FileFormatError(
                f"{path}: refused: the checkpoint holds objects other than tensors and plain "
                f"containers{what}; unpickling them could run code, so it is not loaded"
            ) from None
        first = (msg.splitlines() or [""])[0][:200]
        raise FileFormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except Exception as err:  # corrupt / truncated / not a checkpoint: many error types
        first = (str(err).splitlines() or [""])[0][:200]
        raise FileFormatError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{type(err).__name__}: {first}"
        ) from None


def _as_matrix(value, key: str, where: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise FileFormatError(f"{where}: key {key!r} holds a {type(value).__name__}, expected a tensor")
    if value.dim() == 4 and value.shape[2:] == (1, 1):  # 1x1 conv LoRA stored as 4-D
        value = value[:, :, 0, 0]
    if value.dim() != 2:
        raise FileFormatError(f"{where}: key {key!r} has shape {tuple(value.shape)}, expected a matrix")
    return value.detach().to(torch.float32).clone()


def _read_lora_section(section, component: str, prefix: str, where: Path, text_encoder=None):
    """{"component.module": (A, B)} of one component; alphas (if stored) folded into B."""
    if not isinstance(section, Mapping):
        raise FileFormatError(f"{where}: key {prefix + component!r} is a {type(section).__name__}, expected a dict")
    downs, ups, alphas = {}, {}, {}
    for key, value in section.items():
        full = f"{prefix}{component}.{key}"
        if not isinstance(key, str):
            raise FileFormatError(f"{where}: non-string key {key!r} under {prefix + component!r}")
        if key.endswith(".lora_down.weight"):
            downs[key[: -len(".lora_down.weight")]] = _as_matrix(value, full, where)
        elif key.endswith(".lora_up.weight"):
            ups[key[: -len(".lora_up.weight")]] = _as_matrix(value, full, where)
        elif key.endswith(".alpha"):
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise FileFormatError(f"{where}: key {full!r} should be a scalar tensor")
            alphas[key[: -len(".alpha")]] = float(value.reshape(()))
        else:
            raise FileFormatError(
                f"{where}: key {full!r} is not a LoRA factor (expected '<module>.lora_down.weight' "
                "or '<module>.lora_up.weight'); fully fine-tuned weights cannot be imported"
            )
    if downs.keys() != ups.keys():
        odd = sorted(downs.keys() ^ ups.keys())[0]
        have = "lora_down" if odd in downs else "lora_up"
        raise FileFormatError(f"{where}: {prefix}{component}.{odd} has {have} but not its partner")
    lora = {}
    for module, a in downs.items():
        b = ups[module]
        full = f"{prefix}{component}.{module}"
        if not _TARGET_SUFFIX[component].search(module):
            raise FileFormatError(
                f"{where}: LoRA on {full!r} is not supported: ED-LoRA adapts only the attention "
                "projections (text encoder q/k/v/out_proj, UNet attn1/attn2 to_q/k/v/out.0)"
            )
        if b.shape[1] != a.shape[0]:
            raise FileFormatError(
                f"{where}: {full}: lora_down {tuple(a.shape)} and lora_up {tuple(b.shape)} disagree "
                "on the rank (expected r x n and m x r)"
            )
        name = _installed_text_module(module, text_encoder) if component == "text_encoder" else module
        lora[f"{component}.{name}"] = (a, b * alphas.get(module, 1.0))
    return lora


def _check_against_pipe(lora: dict, pipe, where: Path) -> None:
    targets = {
        "text_encoder": (pipe.text_encoder, set(text_encoder_lora_targets(pipe.text_encoder))),
        "unet": (pipe.unet, set(unet_lora_targets(pipe.unet))),
    }
    for name, (a, b) in lora.items():
        component, _, module_name = name.partition(".")
        model, names = targets[component]
        if module_name not in names:
            raise FileFormatError(
                f"{where}: {name!r} has LoRA weights but the base model {base_model_name(pipe)!r} "
                "has no such attention projection; was the file trained on another base model?"
            )
        module = model.get_submodule(module_name)
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise FileFormatError(
                f"{where}: {name}: lora_down {tuple(a.shape)} / lora_up {tuple(b.shape)} do not fit "
                f"the base model's {module.out_features} x {module.in_features} weight"
            )


def import_mixofshow_pth(
    path: str | os.PathLike,
    base_pipe=None,
    *,
    base_model: str | None = None,
    num_layers: int | None = None,
    text_dim: int | None = None,
    class_words: dict[str, str] | None = None,
) -> ConceptFile:
    """Convert an original Mix-of-Show ED-LoRA ``.pth`` into a :class:`ConceptFile`.

    Args:
        path: the ``.pth`` (``{'params': {...}}`` or the inner dict directly).
        base_pipe: the base pipeline the concept was trained on; its shapes are checked. Without
            it, give ``num_layers``/``text_dim`` to check against, or they are read off the file.
        base_model: the name recorded in the concept (default: ``base_pipe``'s name).
        class_words: ``{word: class word}`` recorded in the metadata.
    Concept words are lower-cased (CLIP lower-cases prompts).
    """
    where = Path(path)
    obj = _torch_load(where)
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{where}: expected a dict at the top level, got {type(obj).__name__}")
    prefix = ""
    if "params" in obj:
        obj, prefix = obj["params"], "params."
        if not isinstance(obj, Mapping):
            raise FileFormatError(f"{where}: key 'params' is a {type(obj).__name__}, expected a dict")
    if "new_concept_embedding" not in obj:
        raise FileFormatError(
            f"{where}: key {prefix + 'new_concept_embedding'!r} is missing; not an ED-LoRA checkpoint "
            f"(found keys {sorted(map(str, obj))[:8]})"
        )
    raw_emb = obj["new_concept_embedding"]
    if not isinstance(raw_emb, Mapping) or not raw_emb:
        raise FileFormatError(f"{where}: {prefix}new_concept_embedding should be a non-empty dict {{word: tensor}}")

    if base_pipe is not None:
        num_layers = num_cross_attention_layers(base_pipe.unet)
        text_dim = base_pipe.text_encoder.config.hidden_size
        base_model = base_model or base_model_name(base_pipe)
    embeddings: dict[str, torch.Tensor] = {}
    for word, value in raw_emb.items():
        key = f"{prefix}new_concept_embedding.{word}"
        emb = _as_matrix(value, key, where)
        name = str(word).strip().lower()
        if not _WORD.match(name):
            raise FileFormatError(f"{where}: concept word {word!r} is not of the form <name> (letters, digits, _ or -)")
        if name in embeddings:
            raise FileFormatError(f"{where}: concept words collide once lower-cased: {word!r}")
        if name != word:
            log.warning("%s: concept word %r renamed %r (CLIP lower-cases prompts)", where, word, name)
        num_layers = emb.shape[0] if num_layers is None else num_layers
        text_dim = emb.shape[1] if text_dim is None else text_dim
        if tuple(emb.shape) != (num_layers, text_dim):
            raise FileFormatError(
                f"{where}: {key!r} has shape {tuple(emb.shape)}, expected ({num_layers}, {text_dim}) "
                "(one token per UNet cross-attention layer x text width of the base model)"
            )
        embeddings[name] = emb

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for component in ("text_encoder", "unet"):
        if obj.get(component) is not None:
            text_encoder = base_pipe.text_encoder if base_pipe is not None else None
            lora.update(_read_lora_section(obj[component], component, prefix, where, text_encoder))
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) > 1:
        raise FileFormatError(f"{where}: LoRA layers have different ranks {sorted(ranks)}; expected one rank")
    if base_pipe is not None:
        _check_against_pipe(lora, base_pipe, where)
    if not lora:
        log.warning("%s: no LoRA weights found; importing the embeddings only", where)

    words = list(embeddings)
    class_words = {k.lower(): v for k, v in (class_words or {}).items()}
    unknown = sorted(set(class_words) - set(words))
    if unknown:
        raise ValueError(f"class word given for {unknown[0]!r}, which is not a concept word of {where} ({words})")
    meta = ConceptMeta(
        base_model=base_model or "unknown",
        rank=ranks.pop() if ranks else 4,
        scale=1.0,  # Mix-of-Show: W x + 1.0 * up(down(x)); any stored alpha is folded into B
        words=words,
        num_layers=int(num_layers),
        text_dim=int(text_dim),
        class_words=class_words,
        extra={"imported_from": where.name, "source": "Mix-of-Show .pth"},
    )
    return ConceptFile(meta=meta, embeddings=embeddings, lora=lora)


# --------------------------------------------------------------------------- export


def embeddings_path(path: str | os.PathLike) -> Path:
    """``foo.safetensors`` -> ``foo.embeddings.safetensors`` (where exports put the embeddings)."""
    path = Path(path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}.embeddings.safetensors")


def _concept(concept: ConceptFile | str | os.PathLike) -> ConceptFile:
    return concept if isinstance(concept, ConceptFile) else load_concept(concept)


def _common_meta(concept: ConceptFile, layout: str, emb_path: Path | None) -> dict[str, str]:
    meta = concept.meta
    out = {
        "mixofshow.layout": layout,
        "mixofshow.base_model": meta.base_model,
        "mixofshow.words": json.dumps(meta.words),
        "mixofshow.rank": str(meta.rank),
        "mixofshow.scale": str(meta.scale),
    }
    if emb_path is not None:
        out["mixofshow.embeddings"] = emb_path.name
    return out


def _write_embeddings(concept: ConceptFile, path: Path, dtype: torch.dtype) -> Path | None:
    if not concept.embeddings:
        return None
    emb_path = embeddings_path(path)
    meta = concept.meta
    save_safetensors(
        emb_path,
        {word: emb.to(dtype) for word, emb in concept.embeddings.items()},
        {
            "format": EMBEDDINGS_FORMAT,
            "base_model": meta.base_model,
            "words": json.dumps(meta.words),
            "num_layers": str(meta.num_layers),
            "text_dim": str(meta.text_dim),
            "tokens": "row l of <word> is token <word_l{l}>, read by UNet cross-attention layer l "
            "(forward order); needs mixofshow's layer-wise attention, not plain diffusers",
        },
    )
    return emb_path


def export_diffusers_lora(
    concept: ConceptFile | str | os.PathLike,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path | None]:
    """Write the concept's LoRA for ``pipe.load_lora_weights(path)``; returns (lora, embeddings) paths."""
    concept, path = _concept(concept), Path(path)
    scale = concept.meta.scale
    tensors = {}
    for name, (a, b) in concept.lora.items():
        key = ".".join(_portable_name(name))
        tensors[f"{key}.lora_A.weight"] = a.to(dtype)
        tensors[f"{key}.lora_B.weight"] = (scale * b.float()).to(dtype)  # PEFT: alpha / r = 1
    emb_path = _write_embeddings(concept, path, dtype)
    save_safetensors(path, tensors, {"format": "pt", **_common_meta(concept, "diffusers", emb_path)})
    log.info("wrote diffusers LoRA %s (%d layers)", path, len(concept.lora))
    return path, emb_path


def export_kohya_lora(
    concept: ConceptFile | str | os.PathLike,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path | None]:
    """Write the concept's LoRA in kohya's layout; returns (lora, embeddings) paths."""
    concept, path = _concept(concept), Path(path)
    meta = concept.meta
    tensors = {}
    for name, (a, b) in concept.lora.items():
        component, module = _portable_name(name)
        key = _KOHYA_PREFIX[component] + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = a.to(dtype)
        tensors[f"{key}.lora_up.weight"] = b.to(dtype)
        # kohya applies alpha / r; alpha = s * r reproduces our s (float32: alpha is not rounded)
        tensors[f"{key}.alpha"] = torch.tensor(meta.scale * a.shape[0], dtype=torch.float32)
    emb_path = _write_embeddings(concept, path, dtype)
    kohya_meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(meta.rank),
        "ss_network_alpha": str(meta.scale * meta.rank),
        "ss_base_model_version": "sd_v1",
    }
    save_safetensors(path, tensors, {**kohya_meta, **_common_meta(concept, "kohya", emb_path)})
    log.info("wrote kohya LoRA %s (%d layers)", path, len(concept.lora))
    return path, emb_path


def textual_inversion_path(path: str | os.PathLike, concept: ConceptFile) -> Path:
    """Where the A1111 / ComfyUI embedding of an export goes: ``<concept>_edlora.safetensors``
    beside it; its file name is the trigger word those tools use (``robot_edlora``)."""
    first = concept.meta.words[0].strip("<>") if concept.meta.words else "concept"
    return Path(path).with_name(f"{re.sub(r'[^A-Za-z0-9_-]+', '', first.rstrip('0123456789')) or 'concept'}_edlora.safetensors")


def export_textual_inversion(concept: ConceptFile | str | os.PathLike, path: str | os.PathLike,
                             dtype: torch.dtype = torch.float16) -> Path:
    """An A1111 / ComfyUI textual-inversion embedding of the concept words: ``{"emb_params": (words, dim)}``.

    Those tools give every cross-attention layer the same token, so each word's L layer-wise
    vectors are collapsed to one: their **mean** (a choice, not an equivalence; the difference it
    makes to the UNet's prediction is measured by ``bench/ti_collapse.py``). Use it with the LoRA.
    """
    concept = _concept(concept)
    words = concept.meta.words
    missing = [w for w in words if w not in concept.embeddings]
    if missing:
        raise FileFormatError(f"concept has no embedding for {missing}; nothing to write as textual inversion")
    vectors = torch.stack([concept.embeddings[w].float().mean(0) for w in words])
    save_safetensors(path, {"emb_params": vectors.to(dtype)}, {
        "format": "pt", "mixofshow.words": json.dumps(words), "mixofshow.base_model": concept.meta.base_model,
        "mixofshow.collapse": f"mean of the {concept.meta.num_layers} layer-wise vectors of each word",
    })
    return Path(path)