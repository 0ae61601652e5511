"""Pre-training stages ``clip-cond`` and ``clip-eval``: two CLIPs of the toy world, trained apart.

As Stable Diffusion is conditioned by one CLIP's text tower (ViT-L/14) and judged by another
(ViT-B/32), the world has two contrastively trained CLIPs with different widths and seeds:

- ``clip-cond``: a transformers ``CLIPModel``; its text tower becomes the pipeline's
  ``CLIPTextModel`` (the real CLIP BPE tokenizer, 77 positions; trained on the first 32, which
  hold every world caption: CLIP's causal mask makes the states of those positions independent of
  what follows).
- ``clip-eval``: an open_clip ``CLIP`` loaded by ``mixofshow evaluate --clip toyworld``; its
  captions are prefixed with CLIP-T's ``"A photo depicts "`` half of the time.

Each batch holds scenes and their mirror images (positions swapped in the caption): hard
negatives that teach left from right. ``clip-eval``'s batches also hold each scene's class twin
(``world.class_twin``: the same background, colour and position with another class), which
teaches class, the attribute a small CLIP learns last. Identical captions in a batch are all
positives.
Evaluation: zero-shot accuracy per attribute on one-object scenes of the held-out splits, choosing
among captions that differ from the truth in that attribute only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixofshow.toyworld.data import Split
from mixofshow.toyworld.stage import StageConfig, batch_indices, run_stage, step_generator
from mixofshow.toyworld.world import attribute_variants, class_twin

__all__ = ["CLIP_STAGES", "TEXT_PREFIX", "Towers", "towers", "train_clip", "zero_shot"]

# the conditioning CLIP needs to tell captions apart; the judge needs to be right, so it trains longer
CLIP_STAGES = {
    "clip-cond": StageConfig(steps=1500, batch=64, lr=5e-4, warmup=100, weight_decay=0.05, eval_every=500,
                             checkpoint_every=250),
    "clip-eval": StageConfig(steps=3000, batch=64, lr=5e-4, warmup=100, weight_decay=0.05, eval_every=500,
                             checkpoint_every=250),
}
TRAIN_TEXT_LEN = 32  # clip-cond trains on the first 32 of 77 positions
TEXT_PREFIX = "A photo depicts "  # CLIP-T's prompt prefix (mixofshow.evaluate.clip)


@dataclass
class Towers:
    """Feature functions of one CLIP: images in [-1, 1] and captions -> L2-normalised features."""

    image: Callable[[torch.Tensor], torch.Tensor]
    text: Callable[[list[str]], torch.Tensor]
    logit_scale: torch.Tensor


def _normalise(x: torch.Tensor) -> torch.Tensor:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std  # as open_clip's preprocessing of a 64 x 64 image


def towers(part: str, module: nn.Module) -> Towers:
    device = next(module.parameters()).device
    if part == "clip-cond":
        from mixofshow.models.tokenizer import clip_bpe_tokenizer

        tok = clip_bpe_tokenizer()

        def text(captions: list[str]) -> torch.Tensor:
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids[:, :TRAIN_TEXT_LEN]
            return F.normalize(module.get_text_features(input_ids=ids.to(device)).pooler_output, dim=-1)

        def image(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(module.get_image_features(pixel_values=_normalise(x.to(device))).pooler_output, dim=-1)

        return Towers(image, text, module.logit_scale)
    import open_clip

    context = module.context_length

    def text_oc(captions: list[str]) -> torch.Tensor:
        return F.normalize(module.encode_text(open_clip.tokenize(captions, context).to(device)), dim=-1)

    def image_oc(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(module.encode_image(_normalise(x.to(device))), dim=-1)

    return Towers(image_oc, text_oc, module.logit_scale)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with an identical caption counts as a positive."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions], device=img.device)
    same = (key[:, None] == key[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return -0.5 * ((targets * logits.log_softmax(1)).sum(1).mean() + (targets * logits.log_softmax(0)).sum(0).mean())


def zero_shot(tw: Towers, split: Split, limit: int = 500, batch: int = 125) -> dict[str, float]:
    """Accuracy per attribute on up to ``limit`` one-object scenes of ``split``."""
    index = np.array([i for i, s in enumerate(split.scenes) if len(s.objects) == 1][:limit])
    correct: dict[str, list[bool]] = {}
    cache: dict[str, torch.Tensor] = {}
    for chunk in np.array_split(index, max(1, len(index) // batch)):
        x, scenes = split.batch(chunk)
        feats = tw.image(x)
        probes = [attribute_variants(s) for s in scenes]
        todo = sorted({c for p in probes for caps, _ in p.values() for c in caps} - cache.keys())
        for k in range(0, len(todo), 256):
            cache.update(zip(todo[k : k + 256], tw.text(todo[k : k + 256])))
        for f, p in zip(feats, probes):
            for attr, (caps, truth) in p.items():
                scores = torch.stack([cache[c] for c in caps]) @ f
                correct.setdefault(attr, []).append(int(scores.argmax()) == truth)
    return {attr: float(np.mean(v)) for attr, v in correct.items()}


def train_clip(part: str, module: nn.Module, train: Split, held_out: dict[str, Split], folder: Path, seed: int,
               cfg: StageConfig | None = None, max_minutes: float | None = None) -> dict:
    cfg = cfg or CLIP_STAGES[part]
    tw = towers(part, module)

    def loss(step: int) -> torch.Tensor:
        if part == "clip-eval":  # half the batch: scenes and their class twins, each with its mirror
            index = batch_indices(len(train), cfg.batch // 2, step, seed, part)
            twins = [class_twin(train.scenes[i], random.Random(f"twin/{seed}/{step}/{k}")) for k, i in enumerate(index)]
            both = Split(np.concatenate([train.images[index], np.stack([t[0] for t in twins])]),
                         [train.scenes[i] for i in index] + [t[1] for t in twins])
            x, scenes = both.batch(np.arange(len(both)), mirror=True)
        else:
            x, scenes = train.batch(batch_indices(len(train), cfg.batch, step, seed, part), mirror=True)
        captions = [s.caption for s in scenes]
        if part == "clip-eval":
            coin = torch.rand(len(captions), generator=step_generator(seed, part, step))
            captions = [TEXT_PREFIX + c if flip < 0.5 else c for c, flip in zip(captions, coin.tolist())]
        return contrastive_loss(tw.image(x), tw.text(captions), tw.logit_scale, [s.caption for s in scenes])

    def evaluate() -> dict:
        return {name: zero_shot(tw, split) for name, split in held_out.items()}

    return run_stage(part, folder, module, cfg, loss, evaluate, max_minutes=max_minutes)
