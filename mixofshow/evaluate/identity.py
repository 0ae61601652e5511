"""The toy world's identity score: is the shipped concept's look in the image?

For images of the toy world (base model ``toyworld``) whose prompt names one of the shipped
concepts (``<robot1> <robot2>``, ``<cat1> <cat2>``, ``<cactus1> <cactus2>``, or any words given
with ``--identity NAME``), the identity judge (``mixofshow/toyworld/identity.py``, trained on
renderings with a ground truth, never on generated images) gives P(concept present); for a prompt
naming several concepts, the mean of theirs. Unlike CLIP-I it does not reward the background or
pose of the training images: it asks for the concept's distinctive parts (the robot's antenna
and round red body, the cat's slit eyes and pink ears, the cactus's flower and terracotta pot),
and a red boxy robot, a blue world cat or a green world cactus scores low.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["IdentityJudge", "named_concepts"]


def named_concepts(prompt: str, forced: str | None = None) -> list[str]:
    """The shipped concepts whose words appear in ``prompt``; ``forced``: that concept always."""
    from mixofshow.toyworld.concepts import CONCEPTS, concept_spec

    if forced is not None:
        return [concept_spec(forced).name]
    return [c.name for c in CONCEPTS if any(w in prompt for w in c.words.split())]


class IdentityJudge:
    """The shipped identity judge, loaded once (seconds, CPU)."""

    def __init__(self, device: str | None = None) -> None:
        from mixofshow.models.pretrained import load_toyworld_judge

        self.model = load_toyworld_judge("identity").to(device or "cpu")

    def scores(self, paths: Sequence[Path], prompts: Sequence[str], forced: str | None = None) -> list[float | None]:
        """Per image: mean P(present) of the concepts its prompt names; None where it names none."""
        import numpy as np
        import torch
        from PIL import Image

        from mixofshow.toyworld.identity import identity_scores

        out: list[float | None] = []
        for path, prompt in zip(paths, prompts):
            names = named_concepts(prompt, forced)
            if not names:
                out.append(None)
                continue
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1
            out.append(sum(float(identity_scores(self.model, x, n)[0]) for n in names) / len(names))
        return out

    def positions(self, images, name: str) -> list[str]:
        """Where concept ``name`` is in each image (``absent``, ``left``, ``center``, ``right``);
        ``images``: (N, 3, H, W) in [-1, 1]."""
        from mixofshow.toyworld.identity import concept_positions

        return concept_positions(self.model, images, name)
