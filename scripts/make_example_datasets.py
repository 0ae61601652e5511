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
from pathlib import Path

from PIL import Image

from mixofshow.toyworld.concepts import CONCEPTS, ConceptSpec  # the concepts' looks, shared with the toy world
from mixofshow.toyworld.draw import BACKGROUNDS, SS, Layer

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
