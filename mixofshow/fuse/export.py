"""Write a fused pipeline as a full diffusers folder (``pipe.save_pretrained``), atomically.

The concept rows live in :class:`~mixofshow.concepts.tokens.ConceptTokenEmbedding` beside the
frozen CLIP table; for the folder they are materialised into an ordinary token embedding of
``len(tokenizer)`` rows (what ``resize_token_embeddings`` + copying the rows gives, built as a new
table so the pipeline's own is not resized in place; ``config.vocab_size`` follows) and the
tokenizer is saved with the added tokens, so any diffusers code loads the folder.

Layer-wise tokens still need this package to sample: each concept word is L tokens, one per
UNet cross-attention layer, and a prompt must be encoded L times (layer l with the l-th tokens)
and each cross-attention layer given its own encoding. Stock diffusers would feed every layer
the same context. :func:`attach_exported` does the set-up on a loaded folder::

    pipe = load_pipeline("runs/fused/diffusers")
    model = attach_exported(pipe, "runs/fused/diffusers")   # processors + layer-wise encoder
    context = model.encoder.encode(["photo of a <cat1> <cat2>"])
    image = pipe(prompt_embeds=context, negative_prompt_embeds=model.encoder.encode([""])).images[0]

The folder also holds ``mixofshow_fused.json`` (the fused file's metadata: words, concepts).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from mixofshow.concepts.attention import install_layerwise_attention, num_cross_attention_layers
from mixofshow.concepts.tokens import ConceptTokenEmbedding, LayerwiseTextEncoder, layer_token_names
from mixofshow.fuse.io import FusedMeta, FusedModel
from mixofshow.utils.io import FileFormatError
from mixofshow.utils.paths import current_umask

__all__ = ["EXPORT_INFO", "export_diffusers", "attach_exported", "prefix_text_encoder_keys"]

EXPORT_INFO = "mixofshow_fused.json"


def export_diffusers(pipe, folder: str | os.PathLike, meta: FusedMeta) -> Path:
    """Save ``pipe`` (fused, with concept tokens) as a diffusers folder; replaces ``folder`` atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the finished folder private
        _save_materialised(pipe, tmp)
        info = asdict(meta) | {
            "note": "Concept words are layer-wise (<w_l0> .. <w_l{L-1}>): load with "
            "mixofshow.fuse.export.attach_exported(pipe, folder) to sample them."
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_materialised(pipe, target: Path) -> None:
    """``pipe.save_pretrained`` with the text encoder's weights named as every transformers reads them.

    transformers 5 writes ``CLIPTextModel`` keys without the ``text_model.`` prefix; transformers 4
    (what kohya's sd-scripts and many tools pin) then finds none of them and initialises the whole
    encoder at random with only a warning. Both versions read the prefixed names.
    """
    encoder = pipe.text_encoder
    emb = encoder.get_input_embeddings()
    if not isinstance(emb, ConceptTokenEmbedding):
        pipe.save_pretrained(target)
        prefix_text_encoder_keys(target / "text_encoder")
        return
    total = emb.num_base + emb.new.shape[0]
    if len(pipe.tokenizer) != total:
        raise RuntimeError(f"The tokenizer has {len(pipe.tokenizer)} tokens but the embedding table {total}")
    # the effect of resize_token_embeddings + copying the rows, on a new table: transformers'
    # resize reuses the old module in place, which would change the frozen base table
    base = emb.base.weight
    table = torch.nn.Embedding(total, base.shape[1], device=base.device, dtype=base.dtype)
    with torch.no_grad():
        table.weight.copy_(torch.cat([base.detach(), emb.new.detach().to(base.dtype)]))
    vocab_size = encoder.config.vocab_size
    try:
        encoder.set_input_embeddings(table)
        encoder.config.vocab_size = total
        pipe.save_pretrained(target)
        prefix_text_encoder_keys(target / "text_encoder")
    finally:
        encoder.set_input_embeddings(emb)  # back to the frozen table + concept rows
        encoder.config.vocab_size = vocab_size


def prefix_text_encoder_keys(folder: Path) -> None:
    """Rename a saved ``CLIPTextModel``'s weights to ``text_model.*`` (shards and index too)."""
    from safetensors.torch import load_file, save_file

    def named(key: str) -> str:
        return key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({named(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {named(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _replace_dir(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def attach_exported(pipe, folder: str | os.PathLike) -> FusedModel:
    """Install the layer-wise processors on a pipeline loaded from an exported folder."""
    info_path = Path(folder) / EXPORT_INFO
    if not info_path.is_file():
        raise FileFormatError(f"{folder}: no {EXPORT_INFO}; not a folder written by `mixofshow fuse`")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info.pop("note", None)
    meta = FusedMeta(**info)
    num_layers = num_cross_attention_layers(pipe.unet)
    vocab = pipe.tokenizer.get_vocab()
    names = {w: layer_token_names(w, num_layers) for w in meta.words}
    missing = [w for w in meta.words if any(n not in vocab for n in names[w])]
    if missing or num_layers != meta.num_layers:
        raise FileFormatError(f"{folder}: the loaded pipeline lacks the fused tokens ({missing[:1] or meta.words[:1]})")
    token_ids = {w: pipe.tokenizer.convert_tokens_to_ids(names[w]) for w in meta.words}
    processors = install_layerwise_attention(pipe.unet)
    encoder = LayerwiseTextEncoder(pipe.tokenizer, pipe.text_encoder, num_layers, meta.words)
    return FusedModel(encoder, list(meta.words), token_ids, meta, processors, num_layers)
