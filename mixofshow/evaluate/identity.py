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
        """Per image: mean P(present) of the concepts its prompt names; None where it names none.
        Every image is read once and judged in one batch per concept."""
        import numpy as np
        from PIL import Image

        from mixofshow.toyworld.data import from_uint8
        from mixofshow.toyworld.identity import identity_scores

        names = [named_concepts(prompt, forced) for prompt in prompts]
        keep = [i for i, n in enumerate(names) if n]
        out: list[float | None] = [None] * len(paths)
        if not keep:
            return out
        pixels = []
        for i in keep:
            with Image.open(paths[i]) as img:
                pixels.append(np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BOX)))
        x = from_uint8(np.stack(pixels))
        p = {n: identity_scores(self.model, x, n) for n in {n for i in keep for n in names[i]}}
        for row, i in enumerate(keep):
            out[i] = sum(float(p[n][row]) for n in names[i]) / len(names[i])
        return out
