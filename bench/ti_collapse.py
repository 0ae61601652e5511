"""What collapsing ED-LoRA's layer-wise tokens to one costs (the A1111 / ComfyUI textual-inversion export).

Those tools give every cross-attention layer the same token, so ``mixofshow export --format
kohya`` writes each concept word as one vector: the mean of its L layer-wise vectors. This bench
samples the same prompts and seeds with the concept as trained (layer-wise) and with each word's
L vectors replaced by one collapsed vector (the mean; for comparison also the middle layer's
vector), LoRA on in both, and prints the mean absolute pixel difference (0-255) and the relative
L2 difference of the images against the layer-wise ones. One line per collapse::

    mean: |d pixel| X  rel L2 Y     (vs layer-wise)

    python bench/ti_collapse.py --concept runs/robot/robot.safetensors [--base-model NAME] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixofshow.concepts.io import ConceptFile, load_concept, save_concept  # noqa: E402
from mixofshow.models.loading import load_pipeline  # noqa: E402
from mixofshow.sample.load import load_adapter  # noqa: E402
from mixofshow.sample.pipeline import SampleConfig, generate  # noqa: E402

COLLAPSES = {
    "mean": lambda e: e.float().mean(0),
    "middle layer": lambda e: e.float()[e.shape[0] // 2],
}


def _images(base_model: str, concept_path: Path, prompts: list[str], steps: int) -> np.ndarray:
    pipe = load_pipeline(base_model)
    model = load_adapter(pipe, concept_path)
    config = SampleConfig(prompts, num_images=2, seed=0, steps=steps)
    return np.stack([np.asarray(s.image, np.float32) for s in generate(pipe, model.encoder, config, progress=False)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", required=True, type=Path, help="a trained concept file")
    p.add_argument("--base-model", help="default: the one recorded in the concept")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    concept = load_concept(args.concept)
    base = args.base_model or concept.meta.base_model
    words = " ".join(concept.meta.words)
    prompts = [f"a photo of {words}", f"a photo of {words} on the beach", f"a photo of {words} at night"]
    reference = _images(base, args.concept, prompts, args.steps)
    out = Path(args.concept).with_name(".ti_collapse.safetensors")
    try:
        for name, collapse in COLLAPSES.items():
            flat = {w: collapse(e).expand_as(e).clone() for w, e in concept.embeddings.items()}
            save_concept(out, ConceptFile(concept.meta, flat, concept.lora))
            images = _images(base, out, prompts, args.steps)
            diff = np.abs(images - reference).mean()
            rel = np.linalg.norm(images - reference) / np.linalg.norm(reference)
            print(f"{name}: |d pixel| {diff:.2f}  rel L2 {rel:.3f}     (vs layer-wise, {len(images)} images)")
    finally:
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
