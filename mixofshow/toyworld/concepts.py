"""The three shipped example concepts (``datasets/concepts/``): how each looks, drawn in subject units.

These looks are what the toy world holds out (``world.CONCEPT_LOOKS``): the world never draws a
red robot, a blue cat or a green cactus, nor these concepts' distinctive parts (the robot's
antenna and round body, the cat's slit eyes and pink ears, the cactus's flower and terracotta pot).
``scripts/make_example_datasets.py`` draws the training images with them; the identity judge
(``toyworld/identity.py``) learns to recognise them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mixofshow.toyworld.draw import Layer

__all__ = ["ROBOT_ARMS", "ConceptSpec", "CONCEPTS", "CONCEPT_NAMES", "concept_spec", "draw_robot", "draw_cat", "draw_cactus"]

ROBOT_ARMS = {  # hand positions relative to the shoulder, (left, right)
    "standing": ((-0.33, -0.3), (0.33, -0.3)),
    "waving": ((-0.33, -0.3), (0.36, 0.22)),
    "arms raised": ((-0.36, 0.22), (0.36, 0.22)),
    "jumping": ((-0.38, 0.12), (0.38, 0.12)),
}


def draw_robot(f: Layer, pose: str) -> None:
    red, dark_red, metal, dark = (205, 45, 40), (150, 30, 30), (150, 155, 165), (60, 60, 70)
    base, spread = (0.12, 0.08) if pose == "jumping" else (0.0, 0.0)
    for side in (-1, 1):  # legs and feet
        x, foot = side * 0.11, side * (0.11 + spread)
        f.line([(x, base + 0.25), (foot, base + 0.04)], metal, 0.07)
        f.rect(foot - 0.08, base + 0.06, foot + 0.08, base, dark, 0.02)
    top = base + 0.62
    shoulder = top - 0.09
    for side, (dx, dy) in zip((-1, 1), ROBOT_ARMS[pose]):  # arms, hands as balls
        f.line([(side * 0.2, shoulder), (dx, shoulder + dy)], metal, 0.06)
        f.ellipse(dx, shoulder + dy, 0.05, 0.05, dark)
    f.ellipse(0, top - 0.19, 0.24, 0.2, red)  # round body
    f.ellipse(0, top - 0.21, 0.1, 0.08, (240, 200, 60))  # chest light
    head = top + 0.12
    f.line([(0, head + 0.12), (0.04, head + 0.3)], dark, 0.025)  # antenna
    f.ellipse(0.04, head + 0.31, 0.045, 0.045, (250, 210, 40))
    f.ellipse(0, head, 0.17, 0.15, dark_red)  # round head
    f.rect(-0.13, head + 0.06, 0.13, head - 0.05, (40, 45, 60), 0.04)  # visor
    for side in (-1, 1):
        f.ellipse(side * 0.06, head + 0.005, 0.03, 0.03, (120, 230, 255))


def draw_cat(f: Layer, pose: str) -> None:
    blue, dark_blue, pink = (60, 110, 215), (35, 70, 160), (240, 150, 170)
    if pose == "sitting":
        f.line([(0.2, 0.05), (0.38, 0.12), (0.4, 0.35)], dark_blue, 0.07)  # tail
        f.ellipse(0, 0.27, 0.22, 0.27, blue)  # upright body
        for side in (-1, 1):
            f.ellipse(side * 0.1, 0.04, 0.07, 0.04, dark_blue)
        hx, hy = 0.0, 0.62
    elif pose == "lying":
        f.line([(-0.4, 0.08), (-0.55, 0.05)], dark_blue, 0.07)
        f.ellipse(-0.05, 0.13, 0.38, 0.13, blue)
        hx, hy = 0.3, 0.27
    else:  # standing / walking: body horizontal on four legs
        walking = pose == "walking"
        f.line([(-0.3, 0.42), (-0.55, 0.75 if walking else 0.3)], dark_blue, 0.07)
        for i, lx in enumerate((-0.22, -0.1, 0.1, 0.22)):
            step = (0.05 if i % 2 else -0.05) if walking else 0.0
            f.line([(lx, 0.35), (lx + step, 0.03)], blue, 0.08)
        f.ellipse(0, 0.42, 0.35, 0.16, blue)
        hx, hy = 0.33, 0.62
    for side in (-1, 1):  # ears
        ex = hx + side * 0.11
        f.polygon([(ex - 0.07, hy + 0.08), (ex + 0.07, hy + 0.08), (ex + side * 0.02, hy + 0.27)], blue)
        f.polygon([(ex - 0.035, hy + 0.1), (ex + 0.035, hy + 0.1), (ex + side * 0.015, hy + 0.21)], pink)
    f.ellipse(hx, hy, 0.19, 0.16, blue)
    for side in (-1, 1):  # eyes with slit pupils, whiskers inside the head outline
        f.ellipse(hx + side * 0.075, hy + 0.02, 0.045, 0.05, (250, 220, 70))
        f.ellipse(hx + side * 0.075, hy + 0.02, 0.012, 0.04, (20, 20, 30))
        f.line([(hx + side * 0.04, hy - 0.07), (hx + side * 0.16, hy - 0.05)], dark_blue, 0.012)
    f.polygon([(hx - 0.025, hy - 0.04), (hx + 0.025, hy - 0.04), (hx, hy - 0.07)], pink)


def draw_cactus(f: Layer, pose: str) -> None:
    green, dark_green = (70, 160, 80), (40, 110, 55)
    pot_top, stem_top = 0.3, 0.95
    for side, joint, tip in ((-1, 0.62, 0.8), (1, 0.5, 0.66)):  # "leaning" is rotated by the caller
        f.line([(0, joint), (side * 0.24, joint), (side * 0.24, tip)], green, 0.11)
    f.rect(-0.11, stem_top, 0.11, pot_top, green, 0.11)
    for k in range(6):  # spines
        y = stem_top + (pot_top - stem_top) * (k + 0.6) / 7
        f.line([(-0.03, y), (0.03, y + 0.02)], dark_green, 0.012)
    if pose != "without flower":
        for dx, dy in ((-0.045, 0.0), (0.045, 0.0), (0.0, 0.045), (0.0, -0.03)):
            f.ellipse(dx, stem_top - 0.01 + dy, 0.04, 0.035, (240, 90, 160))
        f.ellipse(0, stem_top - 0.005, 0.025, 0.025, (255, 220, 80))
    f.polygon([(-0.22, pot_top), (0.22, pot_top), (0.16, 0), (-0.16, 0)], (195, 100, 60))  # pot
    f.rect(-0.25, pot_top + 0.07, 0.25, pot_top - 0.02, (170, 85, 50), 0.015)  # rim


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    class_word: str  # for the second word's embedding initialisation
    description: str
    draw: Callable[[Layer, str], None]
    poses: tuple[str, ...]  # cycled over the images; the first is used for the close-up
    extra_prompts: tuple[str, ...] = ()

    @property
    def words(self) -> str:
        return f"<{self.name}1> <{self.name}2>"

    @property
    def prompts(self) -> list[str]:
        base = (
            "a photo of {c}",
            "a photo of {c} on the beach",
            "{c} in a snowy forest",
            "a watercolor painting of {c}",
            "a close-up photo of {c}",
            "{c} on the moon, stars in the background",
        )
        return [p.format(c=self.words) for p in base + self.extra_prompts]


CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec(
        "robot", "robot",
        "a round red toy robot with a yellow-tipped antenna, a dark visor with cyan eyes, grey limbs",
        draw_robot, ("standing", "waving", "arms raised", "jumping"),
        ("{c} reading a book in a library", "{c} wearing a party hat"),
    ),
    ConceptSpec(
        "cat", "cat", "a blue cartoon cat with pink-lined ears, yellow slit eyes and a dark blue tail",
        draw_cat, ("sitting", "standing", "walking", "lying"),
        ("{c} sleeping on a sofa", "{c} playing with a ball of yarn"),
    ),
    ConceptSpec(
        "cactus", "plant", "a green two-armed cactus with a pink flower, in a terracotta pot",
        draw_cactus, ("upright", "leaning", "upright", "without flower"),
        ("{c} on a windowsill", "{c} in a desert at sunset"),
    ),
)


CONCEPT_NAMES: tuple[str, ...] = tuple(c.name for c in CONCEPTS)


def concept_spec(name: str) -> ConceptSpec:
    """The shipped concept called ``name`` (``robot``, ``cat``, ``cactus``)."""
    for spec in CONCEPTS:
        if spec.name == name:
            return spec
    raise ValueError(f"Unknown example concept {name!r}; expected one of {list(CONCEPT_NAMES)}")
