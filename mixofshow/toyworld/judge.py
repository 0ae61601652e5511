"""Pre-training stage ``judge``: a small CNN that reads a one-object scene's ground truth.

The second, CLIP-independent judge of the quality floors: trained on renderings (never on
generated images, never with a text encoder), it predicts the object's class, body colour and
position and the background (cross-entropy), and the object's box (L1 on the box corners as
fractions of the image), so that a look can be checked inside the object's box.
``JUDGE_ATTRIBUTES`` lists the classification heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixofshow.toyworld.data import Split
from mixofshow.toyworld.stage import StageConfig, batch_indices, run_stage
from mixofshow.toyworld.world import BACKGROUND_NAMES, CLASS_NAMES, COLOURS, POSITIONS, Scene

__all__ = ["JUDGE_STAGE", "JUDGE_ATTRIBUTES", "Judge", "box_iou", "labels", "judge_accuracy", "train_judge"]

JUDGE_STAGE = StageConfig(steps=2000, batch=64, lr=2e-3, warmup=100, weight_decay=0.01, eval_every=500,
                          checkpoint_every=500)
JUDGE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "class": CLASS_NAMES, "colour": tuple(COLOURS), "background": BACKGROUND_NAMES, "position": tuple(POSITIONS),
}


class Judge(nn.Module):
    """Four stride-2 convolutions (64 -> 4 pixels) and a linear head per attribute.

    ``heads``: name -> number of classes (default: :data:`JUDGE_ATTRIBUTES`); ``box``: a box head.
    The identity judge (``toyworld/identity.py``) is this network with one head per concept.
    """

    def __init__(self, width: int = 32, heads: dict[str, int] | None = None, box: bool = True) -> None:
        super().__init__()
        heads = heads or {k: len(v) for k, v in JUDGE_ATTRIBUTES.items()}
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(chans[-1] * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in heads.items()})
        self.box = nn.Linear(256, 4) if box else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, and ``"box"`` (x0, y0, x1, y1 as fractions), for images in [-1, 1]."""
        h = self.features(x)
        out = {k: head(h) for k, head in self.heads.items()}
        if self.box is not None:
            out["box"] = self.box(h)
        return out


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices of each attribute for one-object scenes."""
    rows = [{"class": s.objects[0].cls, "colour": s.objects[0].colour, "background": s.background,
             "position": s.objects[0].position} for s in scenes]
    out = {k: torch.tensor([v.index(r[k]) for r in rows]) for k, v in JUDGE_ATTRIBUTES.items()}
    out["box"] = torch.tensor([s.objects[0].box for s in scenes], dtype=torch.float32) / 64.0
    return out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (x0, y0, x1, y1), row by row."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp_min(0).prod(1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def _single(split: Split) -> np.ndarray:
    return np.array([i for i, s in enumerate(split.scenes) if len(s.objects) == 1])


@torch.no_grad()
def judge_accuracy(judge: Judge, split: Split, limit: int = 1000) -> dict[str, float]:
    index = _single(split)[:limit]
    x, scenes = split.batch(index)
    logits = judge(x.to(next(judge.parameters()).device))
    truth = labels(scenes)
    out = {k: float((logits[k].argmax(1).cpu() == truth[k]).float().mean()) for k in JUDGE_ATTRIBUTES}
    out["box_iou"] = float(box_iou(logits["box"].cpu(), truth["box"]).mean())
    return out


def train_judge(judge: Judge, train: Split, held_out: dict[str, Split], folder: Path, seed: int,
                cfg: StageConfig = JUDGE_STAGE, max_minutes: float | None = None) -> dict:
    single = Split(train.images[_single(train)], [train.scenes[i] for i in _single(train)])
    device = next(judge.parameters()).device

    def loss(step: int) -> torch.Tensor:
        x, scenes = single.batch(batch_indices(len(single), cfg.batch, step, seed, "judge"), mirror=True)
        logits, truth = judge(x.to(device)), labels(scenes)
        box = F.smooth_l1_loss(logits["box"], truth["box"].to(device), beta=0.05) * 5
        return box + sum(F.cross_entropy(logits[k], truth[k].to(device)) for k in JUDGE_ATTRIBUTES)

    def evaluate() -> dict:
        return {name: judge_accuracy(judge, split) for name, split in held_out.items()}

    return run_stage("judge", folder, judge, cfg, loss, evaluate, max_minutes=max_minutes)
