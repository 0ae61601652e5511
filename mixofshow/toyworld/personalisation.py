"""Personalisation on the toy world, measured on scenes the concept was never trained in.

The shipped concepts' images show each concept alone, full body or close up, on the five
backgrounds (``datasets/concepts/``). The held-out scene prompts put it where no training image
has it: on a named side, and beside a world object. The same prompts with the concept words
replaced by the class and the concept's colour (``a red robot``) are the base model's best try:
the world never showed it a red robot, so it cannot draw this one from words.

:func:`measure` samples a prompt list (with or without a concept) and scores it with the world's
evaluation CLIP (CLIP-T, CLIP-I against the concept's images) and the identity judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixofshow.toyworld.concepts import concept_spec
from mixofshow.toyworld.world import CONCEPT_LOOKS

__all__ = ["SCENES", "scene_prompts", "base_subject", "concept_subject", "measure"]

# held-out scenes: "{s}" is the subject ("a <robot1> <robot2>" or "a red robot"), "{c}" its class
SCENES: tuple[str, ...] = (
    "a photo of {s} on the left, on the beach",
    "a photo of {s} on the right, at night",
    "a photo of {s} and a yellow car, outdoor, the {c} on the left",
    "a photo of {s} and a purple ball, indoor, the {c} on the right",
)


def concept_subject(name: str) -> str:
    """``"a <robot1> <robot2>"``: the concept's words as the trained concept is prompted."""
    return "a " + concept_spec(name).words


def base_subject(name: str) -> str:
    """``"a red robot"``: the words that describe the concept to the base model (its colour and class)."""
    return f"a {CONCEPT_LOOKS[name]} {name}"


def scene_prompts(subject: str, name: str, scenes: tuple[str, ...] = SCENES) -> list[str]:
    return [s.format(s=subject, c=name) for s in scenes]


def measure(pipe, encoder, prompts: list[str], out: Path, references: list[Path], name: str, num_images: int = 4,
            seed: int = 0, steps: int = 25, scorer=None, concept: str | None = None) -> dict[str, Any]:
    """Sample ``prompts`` (``num_images`` seeds each) into ``out`` and score them for concept
    ``name``; the evaluation's ``overall`` block (CLIP-T, CLIP-I, identity: mean, std, n).

    CLIP-T reads the prompt with the subject as its class word alone (``a photo of a robot on the
    left, ...``) for the concept and the base model alike: the concept file maps its words to the
    class, and for base prompts the concept's colour word is mapped to it (``red robot`` ->
    ``robot``; no other object in :data:`SCENES` has that colour)."""
    from mixofshow.evaluate.scores import evaluate
    from mixofshow.sample.pipeline import SampleConfig, generate

    generate(pipe, encoder, SampleConfig(prompts, num_images=num_images, seed=seed, steps=steps, output_dir=out,
                                         concept=concept, base_model="toyworld"), progress=False)
    class_words = None if concept else {CONCEPT_LOOKS[name]: name}
    report = evaluate(out, references, clip="toyworld", out=out / "evaluation", scorer=scorer, identity=name,
                      class_words=class_words)
    return report["overall"]
