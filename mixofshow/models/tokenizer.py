"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships in open_clip.

open_clip's ``bpe_simple_vocab_16e6.txt.gz`` holds the merges of OpenAI's CLIP tokenizer; the
vocabulary is derived from them exactly as CLIP does (256 byte symbols, the same with ``</w>``,
one entry per merge, then the two special tokens), so the ids equal those of
``openai/clip-vit-large-patch14``'s tokenizer that Stable Diffusion 1.x uses.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

__all__ = ["clip_bpe_tokenizer", "clip_vocab_and_merges"]

_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus byte symbols and specials


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and BPE merges, read from open_clip's packaged file."""
    from open_clip import tokenizer as oc_tokenizer

    with gzip.open(oc_tokenizer.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(oc_tokenizer.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_bpe_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A fresh ``CLIPTokenizer`` (pad = ``<|endoftext|>``, as in SD 1.x); no download."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
