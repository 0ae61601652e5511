"""Pre-training stage ``identity``: which shipped concept does an image show, and where?

The identity score of the toy world. A concept's look is known exactly (``toyworld/concepts.py``
draws it), so, like the world judge, this judge is trained on renderings with a ground truth and
never on generated images: scenes of the world's backgrounds with one or two subjects, each one of
the shipped concepts (any pose, size from a far shot to a close-up, mirrored) or a world object.
Among the world objects are the hard negatives the world itself never draws: the concept's class
in the concept's colour without its distinctive parts (a red boxy robot, a blue cat with round
green eyes, a green cactus without flower or terracotta pot). So "red and robot-shaped" is not
enough: the judge must see the antenna and round body, the slit eyes and pink ears, the flower
and pot.

Per concept one 4-way head: absent / left / center / right (where the subject's centre is, by
thirds of the width). Scenes are sometimes blurred or noisy, as generated images are, and one in
seven is scrambled (its tiles shuffled: the concept's colours and parts without its shape), with
every concept absent, so that colour blobs do not pass for a concept. :func:`identity_scores`
gives P(present) per image, the identity score of ``mixofshow evaluate`` on the toy world.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixofshow.toyworld.concepts import CONCEPT_NAMES, concept_spec
from mixofshow.toyworld.data import from_uint8
from mixofshow.toyworld.draw import BACKGROUNDS, CLASSES, Layer
from mixofshow.toyworld.judge import Judge
from mixofshow.toyworld.stage import StageConfig, run_stage
from mixofshow.toyworld.world import (BACKGROUND_NAMES, CLASS_NAMES, COLOURS, CONCEPT_LOOKS, allowed_colours,
                                      finish, jitter_colour, paste_subject)

__all__ = ["IDENTITY_STAGE", "SLOTS", "build_identity", "identity_scene", "scrambled", "degraded", "identity_batch", "identity_accuracy",
           "identity_scores", "train_identity"]

IDENTITY_STAGE = StageConfig(steps=2000, batch=64, lr=2e-3, warmup=100, weight_decay=0.01, eval_every=500,
                             checkpoint_every=250)
SLOTS = ("absent", "left", "center", "right")
# the world class each concept belongs to (the cactus concept's class word is "plant")
_WORLD_CLASS = {"robot": "robot", "cat": "cat", "cactus": "cactus"}


def build_identity() -> Judge:
    return Judge(heads={name: len(SLOTS) for name in CONCEPT_NAMES}, box=False)


def _slot(cx: float, size: int) -> int:
    return 1 + min(2, int(3 * cx / size))


def identity_scene(rng: random.Random, size: int = 64) -> tuple[np.ndarray, dict[str, int]]:
    """A scene and, per concept, the index in :data:`SLOTS` of where it is (0: absent)."""
    canvas = Layer(size, (255, 255, 255))
    _, ground = BACKGROUNDS[rng.randrange(len(BACKGROUND_NAMES))](canvas, size, rng)
    count = 1 if rng.random() < 0.6 else 2
    truth = dict.fromkeys(CONCEPT_NAMES, 0)
    concepts = rng.sample(CONCEPT_NAMES, count)
    for k in range(count):
        kind = rng.random()
        close_up = count == 1 and kind < 0.1
        u = size * (1.1 if close_up else rng.uniform(0.28, 0.42) if count == 2 else rng.uniform(0.35, 0.7))
        g = size * 1.25 if close_up else min(max(ground + rng.uniform(-0.03, 0.03) * size, u * 1.02), size - 1.0)
        if count == 2:
            cx = size * ((0.15, 0.65)[k] + rng.uniform(0, 0.2))
        else:
            cx = size * rng.uniform(0.45, 0.55) if close_up else rng.uniform(0.5 * u, size - 0.5 * u)
        mirror = rng.random() < 0.5
        if kind < 0.5:  # the concept itself
            spec = concept_spec(concepts[k])
            pose = rng.choice(spec.poses)
            paste_subject(canvas, cx, g, u, mirror, lambda layer, spec=spec, pose=pose: spec.draw(layer, pose))
            truth[spec.name] = _slot(cx, size)
            continue
        if kind < 0.75:  # a hard negative: the concept's class in the concept's colour, the world's look
            cls = _WORLD_CLASS[concepts[k]]
            colour = CONCEPT_LOOKS[cls]
        else:
            cls = rng.choice(CLASS_NAMES)
            colour = rng.choice(allowed_colours(cls) if rng.random() < 0.5 else list(COLOURS))
        rgb = jitter_colour(COLOURS[colour], rng)
        paste_subject(canvas, cx, g, u, mirror, lambda layer, cls=cls, rgb=rgb: CLASSES[cls](layer, rgb, rng))
    return finish(canvas), truth


def scrambled(image: np.ndarray, rng: random.Random, patch: int = 8) -> np.ndarray:
    """``image`` cut into ``patch`` x ``patch`` tiles put back in a random order: a concept's colours
    and parts without its shape (the negative that keeps the judge from scoring colour blobs)."""
    n = image.shape[0] // patch
    tiles = [image[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] for i in range(n) for j in range(n)]
    rng.shuffle(tiles)
    return np.concatenate([np.concatenate(tiles[i * n:(i + 1) * n], axis=1) for i in range(n)], axis=0)


def degraded(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Sometimes blurred, sometimes noisy, as generated images are; the label does not change."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.3:
        blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        image = np.asarray(blurred)
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 12), image.shape)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image


def identity_batch(tag: str, count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` scenes drawn from ``random.Random(f"identity/{seed}/{tag}/{i}")``: images in [-1, 1]
    and the slot index per concept. One in seven is a :func:`scrambled` scene (every concept
    absent); any may be :func:`degraded`."""
    images, truths = [], []
    for i in range(count):
        rng = random.Random(f"identity/{seed}/{tag}/{i}")
        image, truth = identity_scene(rng)
        if rng.random() < 1 / 7:
            image, truth = scrambled(image, rng), dict.fromkeys(truth, 0)
        images.append(degraded(image, rng))
        truths.append(truth)
    return from_uint8(np.stack(images)), {name: torch.tensor([t[name] for t in truths]) for name in CONCEPT_NAMES}


@torch.no_grad()
def identity_accuracy(judge: Judge, x: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per concept: presence accuracy, false-positive rate, and slot accuracy where present."""
    logits = judge(x.to(next(judge.parameters()).device))
    out = {}
    for name in CONCEPT_NAMES:
        pred, t = logits[name].argmax(1).cpu(), truth[name]
        present = t > 0
        out[f"{name}_presence"] = float(((pred > 0) == present).float().mean())
        out[f"{name}_false_positive"] = float((pred[~present] > 0).float().mean())
        out[f"{name}_slot"] = float((pred[present] == t[present]).float().mean())
    return out


def identity_scores(judge: Judge, images: torch.Tensor, name: str) -> torch.Tensor:
    """P(concept ``name`` is in the image), per image; ``images``: (N, 3, H, W) in [-1, 1]."""
    if name not in CONCEPT_NAMES:
        raise ValueError(f"no identity head for {name!r}; the toy world's concepts are {list(CONCEPT_NAMES)}")
    x = images.to(next(judge.parameters()).device, torch.float32)
    if x.shape[-1] != 64:
        x = F.interpolate(x, size=(64, 64), mode="area")
    with torch.no_grad():
        return 1 - judge(x)[name].softmax(1)[:, 0].cpu()


def train_identity(judge: Judge, folder: Path, seed: int, cfg: StageConfig = IDENTITY_STAGE,
                   max_minutes: float | None = None) -> dict:
    device = next(judge.parameters()).device
    val = identity_batch("val", 1000, seed)

    def loss(step: int) -> torch.Tensor:
        x, truth = identity_batch(f"train/{step}", cfg.batch, seed)
        logits = judge(x.to(device))
        return sum(F.cross_entropy(logits[n], truth[n].to(device)) for n in CONCEPT_NAMES)

    def evaluate() -> dict:
        return {"val": identity_accuracy(judge, *val)}

    return run_stage("identity", folder, judge, cfg, loss, evaluate, max_minutes=max_minutes)
