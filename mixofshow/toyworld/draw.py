"""Drawing primitives, backgrounds and the object classes of the toy world.

Everything is drawn with PIL on a supersampled RGBA layer and reduced with a box filter, so edges
are anti-aliased and a subject drawn on its own transparent layer carries its exact mask in the
alpha channel. The shipped example concepts (``scripts/make_example_datasets.py``) use the same
layers and backgrounds; their particular robot, cat and cactus are drawn there, not here, and the
world's versions of those classes differ from them on purpose (see ``docs/toyworld.md``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw

__all__ = ["SS", "RGB", "Layer", "mix", "gradient", "BACKGROUNDS", "CLASSES", "shade"]

SS = 4  # supersampling factor
RGB = tuple[int, int, int]


class Layer:
    """A supersampled RGBA image drawn in output pixels, or in subject units.

    Backgrounds use output pixels (x right, y down). A subject layer is made with
    ``origin=(cx, ground)`` and ``unit=u``: coordinates are then multiples of ``u`` from the
    subject's foot point, with y pointing up.
    """

    def __init__(self, size: int, background: RGB | None = None,
                 origin: tuple[float, float] | None = None, unit: float = 1.0) -> None:
        color = (*background, 255) if background else (0, 0, 0, 0)
        self.image = Image.new("RGBA", (size * SS, size * SS), color)
        self.draw = ImageDraw.Draw(self.image)
        self.ox, self.oy = origin or (0.0, 0.0)
        self.u, self.sy = unit, (1.0 if origin is None else -1.0)  # subject layers have y up

    def _p(self, x: float, y: float) -> tuple[float, float]:
        return (self.ox + x * self.u) * SS, (self.oy + self.sy * y * self.u) * SS

    def ellipse(self, x: float, y: float, rx: float, ry: float, color: RGB) -> None:
        (cx, cy), rx, ry = self._p(x, y), rx * self.u * SS, ry * self.u * SS
        self.draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(*color, 255))

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: RGB, radius: float = 0) -> None:
        (ax, ay), (bx, by) = self._p(x0, y0), self._p(x1, y1)
        box = [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]
        self.draw.rounded_rectangle(box, radius=radius * self.u * SS, fill=(*color, 255))

    def polygon(self, points: list[tuple[float, float]], color: RGB) -> None:
        self.draw.polygon([self._p(x, y) for x, y in points], fill=(*color, 255))

    def line(self, points: list[tuple[float, float]], color: RGB, width: float) -> None:
        pts, w = [self._p(x, y) for x, y in points], width * self.u * SS
        self.draw.line(pts, fill=(*color, 255), width=max(1, round(w)), joint="curve")
        for x, y in pts[:1] + pts[-1:]:  # round caps
            self.draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=(*color, 255))


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def shade(c: RGB, t: float = 0.3) -> RGB:
    """``c`` darkened by ``t`` (0: unchanged, 1: black)."""
    return mix(c, (0, 0, 0), t)


def gradient(layer: Layer, size: int, top: RGB, bottom: RGB, y0: float = 0, y1: float = -1) -> None:
    y1 = size if y1 < 0 else y1
    steps = max(1, round((y1 - y0) * SS))
    for i in range(steps):
        y = y0 * SS + i
        layer.draw.line([(0, y), (size * SS, y)], fill=(*mix(top, bottom, i / steps), 255))


# ----------------------------------------------------------------------------- backgrounds
# Each returns (tag for the caption, y of the ground line in output pixels). The tags are the
# words the example concepts' captions use, so the world's text encoder knows them.


def bg_outdoor(layer: Layer, size: int, rng: random.Random) -> tuple[str, float]:
    horizon = size * rng.uniform(0.55, 0.7)
    gradient(layer, size, (110, 170, 235), (215, 235, 250), 0, horizon)
    gradient(layer, size, (95, 170, 80), (60, 130, 55), horizon, size)
    k = size / 128  # sun and clouds keep their share of the frame at any size
    layer.ellipse(size * rng.uniform(0.1, 0.9), size * 0.15, 9 * k, 9 * k, (250, 225, 90))
    for _ in range(2):
        cx, cy = size * rng.uniform(0.0, 1.0), size * rng.uniform(0.1, 0.35)
        for dx in (-8, 0, 8):
            layer.ellipse(cx + dx * k, cy + (0 if dx else -3 * k), 8 * k, 5 * k, (250, 250, 252))
    return "outdoor", horizon + (size - horizon) * rng.uniform(0.4, 0.8)


def bg_beach(layer: Layer, size: int, rng: random.Random) -> tuple[str, float]:
    sea, sand = size * rng.uniform(0.45, 0.55), size * rng.uniform(0.62, 0.7)
    gradient(layer, size, (120, 190, 240), (225, 240, 250), 0, sea)
    gradient(layer, size, (40, 120, 190), (90, 170, 210), sea, sand)
    gradient(layer, size, (235, 215, 160), (215, 190, 130), sand, size)
    return "on the beach", sand + (size - sand) * rng.uniform(0.4, 0.8)


def bg_indoor(layer: Layer, size: int, rng: random.Random) -> tuple[str, float]:
    wall = rng.choice([(230, 220, 200), (205, 215, 225), (215, 230, 205)])
    floor_y = size * rng.uniform(0.62, 0.72)
    gradient(layer, size, wall, mix(wall, (120, 120, 120), 0.2), 0, floor_y)
    gradient(layer, size, (150, 105, 70), (120, 80, 50), floor_y, size)
    for i in range(1, 5):  # floor boards
        y = floor_y + (size - floor_y) * i / 5
        layer.line([(0, y), (size, y)], (105, 70, 45), 0.5 * size / 128)
    wx, k = size * rng.uniform(0.05, 0.6), size / 128
    layer.rect(wx, size * 0.12, wx + size * 0.3, size * 0.42, (245, 245, 245))
    layer.rect(wx + 2 * k, size * 0.12 + 2 * k, wx + size * 0.3 - 2 * k, size * 0.42 - 2 * k, (160, 205, 240))
    return "indoor", floor_y + (size - floor_y) * rng.uniform(0.4, 0.8)


def bg_night(layer: Layer, size: int, rng: random.Random) -> tuple[str, float]:
    horizon = size * rng.uniform(0.6, 0.72)
    gradient(layer, size, (15, 20, 55), (50, 55, 100), 0, horizon)
    gradient(layer, size, (35, 45, 40), (20, 28, 25), horizon, size)
    k = max(size / 128, 0.5)
    for _ in range(18):
        layer.ellipse(rng.uniform(0, size), rng.uniform(0, horizon * 0.9), 0.6 * k, 0.6 * k, (250, 250, 230))
    layer.ellipse(size * rng.uniform(0.15, 0.85), size * 0.18, 7 * size / 128, 7 * size / 128, (240, 240, 210))
    return "at night", horizon + (size - horizon) * rng.uniform(0.4, 0.8)


def bg_studio(layer: Layer, size: int, rng: random.Random) -> tuple[str, float]:
    tone = rng.choice([(235, 235, 235), (245, 235, 220), (225, 235, 245)])
    gradient(layer, size, tone, mix(tone, (140, 140, 140), 0.35))
    return "simple background", size * rng.uniform(0.8, 0.9)


BACKGROUNDS: list[Callable[[Layer, int, random.Random], tuple[str, float]]] = [
    bg_outdoor, bg_indoor, bg_beach, bg_studio, bg_night,
]


# ----------------------------------------------------------------------------- object classes
# ``draw(layer, body_colour, rng)`` draws one instance in subject units: foot point at (0, 0),
# about 1 unit tall and at most 0.5 wide either side. ``rng`` gives the small shape variations.

DARK, METAL, WHITE = (55, 55, 65), (150, 155, 165), (245, 245, 245)


def draw_robot(f: Layer, c: RGB, rng: random.Random) -> None:
    """Boxy: square head with two bolts and round white eyes. Never an antenna, never red."""
    leg, arm = rng.uniform(0.22, 0.32), rng.uniform(-0.15, 0.2)
    for side in (-1, 1):
        f.line([(side * 0.1, leg + 0.04), (side * 0.1, 0.05)], METAL, 0.07)
        f.rect(side * 0.1 - 0.08, 0.06, side * 0.1 + 0.08, 0.0, DARK, 0.02)
        f.line([(side * 0.22, leg + 0.28), (side * 0.36, leg + 0.14 + arm)], METAL, 0.06)
        f.ellipse(side * 0.36, leg + 0.14 + arm, 0.05, 0.05, DARK)
    top = leg + 0.36
    f.rect(-0.23, top, 0.23, leg, c, 0.04)  # body
    f.rect(-0.08, top - 0.08, 0.08, top - 0.18, shade(c, 0.35), 0.02)  # chest panel
    f.rect(-0.16, top + 0.3, 0.16, top + 0.02, shade(c, 0.15), 0.03)  # head
    for side in (-1, 1):
        f.rect(side * 0.16 - 0.03, top + 0.2, side * 0.16 + 0.03, top + 0.12, DARK)  # bolts
        f.ellipse(side * 0.065, top + 0.17, 0.04, 0.04, WHITE)
        f.ellipse(side * 0.065, top + 0.17, 0.018, 0.018, DARK)


def draw_cat(f: Layer, c: RGB, rng: random.Random) -> None:
    """Sitting or standing; green round eyes, ears lined in a darker body colour. Never blue."""
    dark = shade(c, 0.3)
    if rng.random() < 0.5:  # sitting
        f.line([(0.2, 0.05), (0.38, 0.12), (0.4, 0.35)], dark, 0.07)
        f.ellipse(0, 0.27, 0.22, 0.27, c)
        hx, hy = 0.0, 0.62
    else:  # standing
        f.line([(-0.3, 0.42), (-0.5, rng.uniform(0.3, 0.75))], dark, 0.07)
        for lx in (-0.22, -0.1, 0.1, 0.22):
            f.line([(lx, 0.35), (lx, 0.03)], c, 0.08)
        f.ellipse(0, 0.42, 0.35, 0.16, c)
        hx, hy = 0.3, 0.62
    for side in (-1, 1):
        ex = hx + side * 0.11
        f.polygon([(ex - 0.07, hy + 0.08), (ex + 0.07, hy + 0.08), (ex + side * 0.02, hy + 0.27)], c)
        f.polygon([(ex - 0.035, hy + 0.1), (ex + 0.035, hy + 0.1), (ex + side * 0.015, hy + 0.21)], dark)
    f.ellipse(hx, hy, 0.19, 0.16, c)
    for side in (-1, 1):
        f.ellipse(hx + side * 0.075, hy + 0.02, 0.04, 0.04, (90, 200, 90))
        f.ellipse(hx + side * 0.075, hy + 0.02, 0.018, 0.018, (20, 20, 30))
    f.ellipse(hx, hy - 0.05, 0.025, 0.02, dark)


def draw_cactus(f: Layer, c: RGB, rng: random.Random) -> None:
    """A stem with one or two arms in a grey pot. Never green, never a flower or a terracotta pot."""
    pot_top, stem_top = 0.28, rng.uniform(0.85, 1.0)
    arms = ((-1, 0.6, 0.78), (1, 0.5, 0.66)) if rng.random() < 0.6 else ((rng.choice([-1, 1]), 0.55, 0.75),)
    for side, joint, tip in arms:
        f.line([(0, joint), (side * 0.24, joint), (side * 0.24, tip)], c, 0.11)
    f.rect(-0.11, stem_top, 0.11, pot_top, c, 0.11)
    for k in range(5):
        y = stem_top + (pot_top - stem_top) * (k + 0.6) / 6
        f.line([(-0.03, y), (0.03, y + 0.02)], shade(c, 0.4), 0.012)
    f.polygon([(-0.2, pot_top), (0.2, pot_top), (0.15, 0), (-0.15, 0)], (125, 125, 130))
    f.rect(-0.23, pot_top + 0.06, 0.23, pot_top - 0.02, (100, 100, 105), 0.015)


def draw_dog(f: Layer, c: RGB, rng: random.Random) -> None:
    dark = shade(c, 0.35)
    f.line([(-0.33, 0.45), (-0.45, rng.uniform(0.55, 0.7))], c, 0.06)  # tail up
    for lx in (-0.25, -0.13, 0.13, 0.25):
        f.line([(lx, 0.32), (lx, 0.03)], c, 0.09)
    f.ellipse(0, 0.4, 0.36, 0.15, c)
    hx, hy = 0.32, 0.6
    f.ellipse(hx + 0.13, hy - 0.05, 0.1, 0.07, c)  # snout
    f.ellipse(hx, hy, 0.15, 0.14, c)
    f.ellipse(hx - 0.1, hy - 0.05, 0.05, 0.12, dark)  # floppy ear
    f.ellipse(hx + 0.21, hy - 0.02, 0.03, 0.03, DARK)  # nose
    f.ellipse(hx + 0.04, hy + 0.04, 0.025, 0.025, DARK)


def draw_tree(f: Layer, c: RGB, rng: random.Random) -> None:
    """Brown trunk, a crown of three blobs in the body colour."""
    h = rng.uniform(0.35, 0.45)
    f.rect(-0.06, h + 0.1, 0.06, 0.0, (95, 65, 40))
    f.ellipse(-0.17, h + 0.2, 0.2, 0.18, shade(c, 0.15))
    f.ellipse(0.17, h + 0.2, 0.2, 0.18, shade(c, 0.15))
    f.ellipse(0, h + 0.38, 0.24, 0.22, c)


def draw_house(f: Layer, c: RGB, rng: random.Random) -> None:
    wall = rng.uniform(0.45, 0.55)
    f.rect(-0.36, wall, 0.36, 0.0, c)
    f.polygon([(-0.44, wall), (0.44, wall), (0.0, wall + rng.uniform(0.3, 0.42))], (95, 75, 75))
    f.rect(-0.08, 0.26, 0.08, 0.0, shade(c, 0.5))  # door
    for side in (-1, 1):
        f.rect(side * 0.23 - 0.08, wall - 0.1, side * 0.23 + 0.08, wall - 0.24, (170, 210, 240))


def draw_car(f: Layer, c: RGB, rng: random.Random) -> None:
    roof = rng.uniform(0.42, 0.5)
    f.rect(-0.24, roof, 0.18, 0.22, c, 0.06)  # cabin
    for x0, x1 in ((-0.19, -0.04), (0.0, 0.13)):
        f.rect(x0, roof - 0.05, x1, 0.27, (170, 210, 240), 0.02)
    f.rect(-0.48, 0.3, 0.48, 0.08, c, 0.06)  # body
    f.rect(0.4, 0.25, 0.47, 0.19, (250, 230, 140))  # head light
    for x in (-0.28, 0.28):
        f.ellipse(x, 0.09, 0.1, 0.1, DARK)
        f.ellipse(x, 0.09, 0.04, 0.04, METAL)


def draw_flower(f: Layer, c: RGB, rng: random.Random) -> None:
    h = rng.uniform(0.6, 0.72)
    green = (60, 140, 60)
    f.line([(0, 0), (0, h)], green, 0.04)
    f.ellipse(0.08, h * 0.4, 0.08, 0.035, green)
    f.ellipse(-0.08, h * 0.55, 0.08, 0.035, green)
    n = rng.choice([5, 6])
    for k in range(n):
        a = 2 * math.pi * k / n
        f.ellipse(0.13 * math.cos(a), h + 0.13 * math.sin(a), 0.09, 0.09, c)
    yellowish = c[0] > 190 and c[1] > 160 and c[2] < 110
    f.ellipse(0, h, 0.07, 0.07, (190, 100, 30) if yellowish else (250, 210, 60))


def draw_ball(f: Layer, c: RGB, rng: random.Random) -> None:
    r = rng.uniform(0.22, 0.3)
    f.ellipse(0, r, r, r, c)
    f.line([(-r * 0.9, r * 1.25), (r * 0.9, r * 0.75)], WHITE, 0.05)
    f.ellipse(-r * 0.35, r * 1.4, r * 0.18, r * 0.14, mix(c, WHITE, 0.6))


def draw_bird(f: Layer, c: RGB, rng: random.Random) -> None:
    for x in (-0.05, 0.05):
        f.line([(x, 0.15), (x, 0.0)], (220, 150, 50), 0.025)
    f.polygon([(-0.32, 0.38), (-0.2, 0.3), (-0.22, 0.42)], shade(c, 0.3))  # tail
    f.ellipse(0, 0.3, 0.22, 0.16, c)
    f.ellipse(0.17, 0.48, 0.12, 0.11, c)
    f.polygon([(0.27, 0.51), (0.27, 0.45), (0.38, 0.48)], (235, 150, 40))  # beak
    f.ellipse(0.2, 0.5, 0.022, 0.022, DARK)
    f.ellipse(-0.03, 0.32, 0.13, 0.08, shade(c, 0.25 + rng.uniform(0, 0.1)))  # wing


CLASSES: dict[str, Callable[[Layer, RGB, random.Random], None]] = {
    "robot": draw_robot, "cat": draw_cat, "cactus": draw_cactus, "dog": draw_dog, "tree": draw_tree,
    "house": draw_house, "car": draw_car, "flower": draw_flower, "ball": draw_ball, "bird": draw_bird,
}
