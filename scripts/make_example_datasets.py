#!/usr/bin/env python
"""Draw the small example concepts shipped in ``datasets/`` (deterministic from ``--seed``).

Three toy concepts are drawn with PIL at 4x supersampling and reduced with a box filter: a round
red robot with an antenna, a blue cat and a cactus in a terracotta pot. The subject is drawn on its
own transparent layer, so its alpha channel is the exact subject mask (soft only where a pixel is
partly covered). Each concept gets ``image/*.jpg``, ``caption/*.txt``, ``mask/*.png``, a
concept-list JSON and a validation prompt list; the READMEs are written too.

    python scripts/make_example_datasets.py              # writes ./datasets
    python scripts/make_example_datasets.py --out /tmp/ds --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mixofshow.toyworld.draw import BACKGROUNDS, SS, Layer  # shared with the toy world

# ----------------------------------------------------------------------------- subjects


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


# ----------------------------------------------------------------------------- generation


def render(
    spec: ConceptSpec, index: int, count: int, size: int, rng: random.Random, offset: int
) -> tuple[Image.Image, Image.Image, str]:
    """One image, its exact subject mask and its caption."""
    close_up = index == count - 1 and count > 1
    pose = spec.poses[0] if close_up else spec.poses[index % len(spec.poses)]
    background = Layer(size, (255, 255, 255))
    bg_tag, ground = BACKGROUNDS[(index + offset) % len(BACKGROUNDS)](background, size, rng)
    if close_up:  # the subject fills the frame and is cut off at the bottom
        u, ground, framing = size * 1.1, size * 1.25, "close-up"
        cx = size * rng.uniform(0.45, 0.55)
    else:
        u, framing = size * rng.uniform(0.42, 0.68), "full body"
        ground = max(ground, u * 1.08)
        half = 0.56 * u  # the widest subject (a standing cat) reaches 0.55 u either side
        cx = rng.uniform(half, size - half)
    mirror = rng.random() < 0.5

    subject = Layer(size, origin=(cx, ground), unit=u)
    spec.draw(subject, pose)
    if pose == "leaning":
        angle = rng.choice([-1, 1]) * rng.uniform(8, 14)
        pivot = (cx * SS, ground * SS)
        subject.image = subject.image.rotate(angle, Image.Resampling.BICUBIC, center=pivot)
    if mirror:
        subject.image = subject.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cx = size - cx
    if not close_up:  # soft contact shadow, part of the background (mask 0)
        shadow = Layer(size)
        shadow.draw.ellipse([(cx - 0.3 * u) * SS, (ground - 0.04 * u) * SS, (cx + 0.3 * u) * SS,
                             (ground + 0.04 * u) * SS], fill=(0, 0, 0, 60))
        background.image = Image.alpha_composite(background.image, shadow.image)
    composed = Image.alpha_composite(background.image, subject.image).convert("RGB")
    image = composed.resize((size, size), Image.Resampling.BOX)
    mask = subject.image.getchannel("A").resize((size, size), Image.Resampling.BOX)
    return image, mask, f"<TOK>, {pose}, {bg_tag}, {framing}"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def _remove_stale(folder: Path, keep: set[str]) -> None:
    for p in folder.iterdir():
        if p.is_file() and p.name not in keep and p.suffix.lower() in {".jpg", ".png", ".txt"}:
            p.unlink()


def write_concept(spec: ConceptSpec, offset: int, out: Path, seed: int, count: int, size: int) -> int:
    rng = random.Random(seed * 1000 + offset)
    root = out / "concepts" / spec.name
    stems = [f"{spec.name}_{i:02d}" for i in range(count)]
    for kind in ("image", "caption", "mask"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        image, mask, caption = render(spec, i, count, size, rng, offset)
        image.save(root / "image" / f"{stem}.jpg", quality=90, optimize=False)
        mask.save(root / "mask" / f"{stem}.png", optimize=False)
        _write_text(root / "caption" / f"{stem}.txt", caption + "\n")
    for kind, ext in (("image", ".jpg"), ("mask", ".png"), ("caption", ".txt")):
        _remove_stale(root / kind, {stem + ext for stem in stems})
    entry = [{
        "instance_prompt": "<TOK>",
        "instance_data_dir": f"{spec.name}/image",
        "caption_dir": f"{spec.name}/caption",
        "mask_dir": f"{spec.name}/mask",
    }]
    _write_text(out / "concepts" / f"{spec.name}.json", json.dumps(entry, indent=2) + "\n")
    header = (f"# Validation prompts for the example concept '{spec.name}' "
              f"({spec.words}, class word '{spec.class_word}').\n")
    _write_text(out / "prompts" / f"{spec.name}.txt", header + "\n".join(spec.prompts) + "\n")
    return count


MULTI_PROMPTS = (
    "a photo of <robot1> <robot2> and <cat1> <cat2> on the beach",
    "<cat1> <cat2> sitting next to <cactus1> <cactus2> on a windowsill",
    "<robot1> <robot2> watering <cactus1> <cactus2> in a garden",
    "a watercolor painting of <robot1> <robot2>, <cat1> <cat2> and <cactus1> <cactus2>",
    "<robot1> <robot2> and <cat1> <cat2> in a snowy forest",
    "<cat1> <cat2> and <cactus1> <cactus2> on the moon, stars in the background",
)


def datasets_readme(counts: dict[str, int], size: int, seed: int) -> str:
    rows = "\n".join(
        f"| `{s.name}` | `{s.words}` | `{s.class_word}` | {counts[s.name]} | {s.description} |"
        for s in CONCEPTS
    )
    return f"""# Example datasets

Small procedurally drawn concepts for tests, the demo and quick experiments. They are generated by
`python scripts/make_example_datasets.py --out datasets --seed {seed}` (deterministic: the same
seed gives byte-identical files) and are free of any license restriction (no third-party images).

| concept | words (replace mapping) | class word | images | what it shows |
|---|---|---|---|---|
{rows}

Every image is {size}x{size}. The last image of each concept is a close-up, the others show the
whole subject at varied positions, sizes, poses and backgrounds (outdoor, indoor, beach, plain
background, night), mirrored at random.

## Layout (Mix-of-Show)

```
concepts/<name>.json          concept list: [{{"instance_prompt": "<TOK>", "instance_data_dir": ...}}]
concepts/<name>/image/*.jpg   training images
concepts/<name>/caption/*.txt first line: "<TOK>, <pose>, <background>, <framing>"
concepts/<name>/mask/*.png    exact subject masks (grayscale, 255 = subject, soft edges)
prompts/<name>.txt            validation prompts (see prompts/README.md)
```

Paths inside a concept-list JSON are relative to the JSON's folder.

## Replace mapping convention

Captions write the concept as the placeholder `<TOK>`. A training config maps it to the concept's
two words, `{{"<TOK>": "<name1> <name2>"}}` (e.g. `{{"<TOK>": "<robot1> <robot2>"}}`). ED-LoRA
initialises the first word at random and the second from the class word's embedding (`robot`,
`cat`, `plant` above). The validation prompts already use the two words.

```python
from mixofshow.data import ConceptDataset
ds = ConceptDataset("datasets/concepts/robot.json", {{"<TOK>": "<robot1> <robot2>"}}, resolution=128)
```
"""


def prompts_readme() -> str:
    names = ", ".join(f"`{s.name}.txt`" for s in CONCEPTS)
    return f"""# Validation prompt lists

One prompt per line; blank lines and lines starting with `#` are ignored
(`mixofshow.data.load_prompt_list`). Concepts are written with their two words, as they appear
after the replace mapping (`<robot1> <robot2>`), so the files work for a single trained concept
and, unchanged, for a fused model.

- {names}: one concept each.
- `multi.txt`: several example concepts in one prompt, for fused models and regional sampling.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets",
                        help="output folder (default: the repository's datasets/)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--images", type=int, default=8, help="images per concept (default 8)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.size < 16:
        parser.error("--images must be >= 1 and --size >= 16")
    out: Path = args.out
    counts = {spec.name: write_concept(spec, k, out, args.seed, args.images, args.size)
              for k, spec in enumerate(CONCEPTS)}
    multi = "# Prompts with several example concepts (fused models, regional sampling).\n"
    _write_text(out / "prompts" / "multi.txt", multi + "\n".join(MULTI_PROMPTS) + "\n")
    _write_text(out / "README.md", datasets_readme(counts, args.size, args.seed))
    _write_text(out / "prompts" / "README.md", prompts_readme())
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {sum(counts.values())} images of {len(counts)} concepts to {out} ({total >> 10} KiB)")


if __name__ == "__main__":
    main()
