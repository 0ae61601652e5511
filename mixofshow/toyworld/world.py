"""The toy world: scenes with known answers, a caption and a ground truth for each.

A scene is one of five backgrounds with one or two objects of ten classes, each in one of eight
named body colours, at a named position (left, center, right). ``scene(split, index, seed)`` is
a pure function: the same arguments give the same pixels on every machine, so a split is defined
by its seed and size, never stored.

Held out, so that a concept has something to learn and the benchmarks judge generalisation:

- **The example concepts' looks.** The world never draws a red robot (nor a robot with an
  antenna or a round body), a blue cat (nor yellow slit eyes or pink inner ears) or a green
  cactus (nor a pink flower or a terracotta pot): those are the shipped concepts in
  ``datasets/concepts/``, which the base model therefore cannot draw from a text prompt.
- **Twenty (class, colour, background) triples** (:data:`HELD_OUT_TRIPLES`) never occur in the
  ``train`` and ``val`` splits; every ``test`` scene contains one, so test prompts are
  compositions the model has never seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from mixofshow.toyworld.draw import BACKGROUNDS, CLASSES, RGB, SS, Layer

__all__ = [
    "COLOURS",
    "CLASS_NAMES",
    "BACKGROUND_NAMES",
    "POSITIONS",
    "CONCEPT_LOOKS",
    "HELD_OUT_TRIPLES",
    "SPLITS",
    "WorldObject",
    "Scene",
    "allowed_colours",
    "caption_of",
    "mirrored",
    "attribute_variants",
    "class_twin",
    "sample_layout",
    "render",
    "paste_subject",
    "jitter_colour",
    "finish",
    "scene",
]

COLOURS: dict[str, RGB] = {
    "red": (210, 45, 40), "orange": (240, 135, 30), "yellow": (240, 210, 45), "green": (60, 165, 70),
    "blue": (50, 100, 220), "purple": (135, 65, 185), "pink": (245, 140, 190), "brown": (125, 80, 45),
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
BACKGROUND_NAMES: tuple[str, ...] = ("outdoor", "indoor", "on the beach", "simple background", "at night")
POSITIONS: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}  # x of the foot point / width
_POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
# the example concepts: class -> the body colour that class never has in the world
CONCEPT_LOOKS: dict[str, str] = {"robot": "red", "cat": "blue", "cactus": "green"}
SPLITS = ("train", "val", "test")
_JITTER = 14  # per-channel body colour jitter


def allowed_colours(cls: str) -> list[str]:
    """The colour names objects of class ``cls`` may have (all but a concept's own colour)."""
    return [c for c in COLOURS if CONCEPT_LOOKS.get(cls) != c]


def _held_out_triples() -> frozenset[tuple[str, str, str]]:
    """Two (class, colour, background) triples per class, spread over colours and backgrounds."""
    out = set()
    for k, cls in enumerate(CLASS_NAMES):
        colours = allowed_colours(cls)
        for j in range(2):
            out.add((cls, colours[(3 * k + 4 * j + 1) % len(colours)], BACKGROUND_NAMES[(k + 2 * j) % 5]))
    return frozenset(out)


HELD_OUT_TRIPLES = _held_out_triples()


@dataclass(frozen=True)
class WorldObject:
    cls: str
    colour: str
    position: str
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]
    caption: str

    def to_dict(self) -> dict:
        return {"background": self.background, "caption": self.caption,
                "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        objs = tuple(WorldObject(o["cls"], o["colour"], o["position"], tuple(o["box"])) for o in d["objects"])
        return Scene(d["background"], objs, d["caption"])


def caption_of(background: str, objects: tuple[WorldObject, ...] | list[WorldObject]) -> str:
    """``"a photo of a blue dog on the left, on the beach"``; two objects: ``"a photo of a red cat
    and a green car, at night, the cat on the right"`` (the other one is on the other side)."""
    a = objects[0]
    if len(objects) == 1:
        return f"a photo of {_a(a.colour)} {a.cls} {_POSITION_PHRASES[a.position]}, {background}"
    b = objects[1]
    return (f"a photo of {_a(a.colour)} {a.cls} and {_a(b.colour)} {b.cls}, {background}, "
            f"the {a.cls} on the {a.position}")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sample_layout(rng: random.Random, split: str = "train") -> tuple[str, list[WorldObject]]:
    """A background and one or two objects (distinct classes) with colours and positions.

    ``train`` and ``val`` never contain a held-out triple; ``test`` always does (its first object).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}")
    while True:
        background = rng.choice(BACKGROUND_NAMES)
        count = 1 if rng.random() < 0.7 else 2
        classes = rng.sample(CLASS_NAMES, count)
        colours = [rng.choice(allowed_colours(c)) for c in classes]
        positions = [rng.choice(list(POSITIONS))] if count == 1 else rng.sample(["left", "right"], 2)
        objs = [WorldObject(k, c, p) for k, c, p in zip(classes, colours, positions)]
        held = [(o.cls, o.colour, background) in HELD_OUT_TRIPLES for o in objs]
        if (split == "test" and held[0]) or (split != "test" and not any(held)):
            return background, objs


def jitter_colour(rgb: RGB, rng: random.Random) -> RGB:
    return tuple(min(255, max(0, v + rng.randint(-_JITTER, _JITTER))) for v in rgb)  # type: ignore[return-value]


def render(background: str, objects: list[WorldObject], size: int, rng: random.Random) -> tuple[np.ndarray, Scene]:
    """Draw a layout: (``size`` x ``size`` x 3 uint8 image, the scene with each object's box)."""
    canvas = Layer(size, (255, 255, 255))
    draw_bg = BACKGROUNDS[BACKGROUND_NAMES.index(background)]
    _, ground = draw_bg(canvas, size, rng)
    two = len(objects) == 2
    placed = []
    for obj in objects:
        u = size * (rng.uniform(0.3, 0.4) if two else rng.uniform(0.4, 0.56))
        g = min(max(ground + rng.uniform(-0.03, 0.03) * size, u * 1.02), size - 1.0)
        cx = size * (POSITIONS[obj.position] + rng.uniform(-0.04, 0.04))
        cx = min(max(cx, 0.5 * u), size - 0.5 * u)
        mirror = rng.random() < 0.5
        colour = jitter_colour(COLOURS[obj.colour], rng)
        box = paste_subject(canvas, cx, g, u, mirror, lambda layer: CLASSES[obj.cls](layer, colour, rng))
        placed.append(WorldObject(obj.cls, obj.colour, obj.position, box))
    return finish(canvas), Scene(background, tuple(placed), caption_of(background, placed))


def paste_subject(canvas: Layer, cx: float, ground: float, u: float, mirror: bool,
                  draw: Callable[[Layer], None]) -> tuple[int, int, int, int]:
    """Draw a subject (``draw(layer)`` in subject units) with its foot point at ``(cx, ground)``,
    ``u`` pixels per unit, mirrored or not, and a contact shadow onto ``canvas``; its pixel box."""
    size = canvas.image.width // SS
    layer = Layer(size, origin=(size - cx if mirror else cx, ground), unit=u)
    draw(layer)
    if mirror:
        layer.image = layer.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    shadow = Layer(size)
    shadow.draw.ellipse([(cx - 0.3 * u) * SS, (ground - 0.04 * u) * SS, (cx + 0.3 * u) * SS,
                         (ground + 0.04 * u) * SS], fill=(0, 0, 0, 60))
    canvas.image = Image.alpha_composite(canvas.image, shadow.image)
    canvas.image = Image.alpha_composite(canvas.image, layer.image)
    alpha = layer.image.getchannel("A").resize((size, size), Image.Resampling.BOX)
    box = alpha.point(lambda a: 255 if a >= 64 else 0).getbbox() or (0, 0, 0, 0)
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def finish(canvas: Layer) -> np.ndarray:
    """The supersampled canvas reduced to its output size, as uint8 RGB."""
    size = canvas.image.width // SS
    return np.asarray(canvas.image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


_MIRROR = {"left": "right", "center": "center", "right": "left"}


def mirrored(s: Scene, size: int) -> Scene:
    """The ground truth of ``s``'s image flipped left to right (positions and boxes swapped)."""
    objs = tuple(WorldObject(o.cls, o.colour, _MIRROR[o.position], (size - o.box[2], o.box[1], size - o.box[0], o.box[3]))
                 for o in s.objects)
    return Scene(s.background, objs, caption_of(s.background, objs))


def class_twin(s: Scene, rng: random.Random, size: int = 64) -> tuple[np.ndarray, Scene]:
    """``s``'s layout (background, colours, positions) drawn again with the first object of another
    class: a hard negative that differs from ``s``'s caption in the class word only. The new class
    respects the held-out looks and triples."""
    first, rest = s.objects[0], list(s.objects[1:])
    taken = {o.cls for o in s.objects}
    choices = [c for c in CLASS_NAMES if c not in taken and first.colour in allowed_colours(c)
               and (c, first.colour, s.background) not in HELD_OUT_TRIPLES]
    objects = [WorldObject(rng.choice(choices), first.colour, first.position)]
    objects += [WorldObject(o.cls, o.colour, o.position) for o in rest]
    return render(s.background, objects, size, rng)


def attribute_variants(s: Scene) -> dict[str, tuple[list[str], int]]:
    """For a one-object scene: per attribute, captions that differ from the true one only in that
    attribute, and the index of the true one (the zero-shot probes of a judge)."""
    if len(s.objects) != 1:
        raise ValueError("attribute probes are defined for one-object scenes")
    o = s.objects[0]
    choices = {"class": CLASS_NAMES, "colour": tuple(COLOURS), "background": BACKGROUND_NAMES, "position": tuple(POSITIONS)}
    out = {}
    for attr, values in choices.items():
        captions = []
        for v in values:
            obj = WorldObject(v if attr == "class" else o.cls, v if attr == "colour" else o.colour,
                              v if attr == "position" else o.position)
            captions.append(caption_of(v if attr == "background" else s.background, [obj]))
        truth = {"class": o.cls, "colour": o.colour, "background": s.background, "position": o.position}[attr]
        out[attr] = (captions, list(values).index(truth))
    return out


def scene(split: str, index: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, Scene]:
    """Scene ``index`` of ``split`` for ``seed``: (image, ground truth); deterministic."""
    rng = random.Random(f"toyworld/{seed}/{split}/{index}")
    background, objects = sample_layout(rng, split)
    return render(background, objects, size, rng)
