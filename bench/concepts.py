"""Personalisation on the toy world: the base model vs each trained shipped concept, over seeds.

For each concept (robot, cat, cactus) and seed, trains its config (``configs/example.yaml``,
``cat.yaml``, ``cactus.yaml``: base model toyworld) and samples the held-out scene prompts (``mixofshow/toyworld/personalisation.py``:
the concept on a named side, beside a world object: no training image shows either) with the
concept, and the same prompts with the concept described to the base model in words (``a red
robot``). Scores: CLIP-T and CLIP-I by the world's evaluation CLIP, identity by the identity
judge. Prints a markdown table, mean +- std over seeds, and writes ``OUT/concepts.json``::

    OMP_NUM_THREADS=1 python bench/concepts.py [--concepts robot,cat,cactus] [--seeds 0,1,2] \
        [--set KEY=VALUE ...] [--out runs/bench_concepts]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"robot": "example.yaml", "cat": "cat.yaml", "cactus": "cactus.yaml"}
METRICS = (("identity", "identity"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def run_one(name: str, seed: int, out: Path, overrides: dict, scorer, images: int) -> dict:
    from mixofshow.evaluate.prompts import list_images
    from mixofshow.models.loading import load_pipeline
    from mixofshow.sample.load import load_adapter, load_base
    from mixofshow.toyworld.personalisation import base_subject, concept_subject, measure, scene_prompts
    from mixofshow.train.config import load_train_config
    from mixofshow.train.loop import train

    config = load_train_config(REPO / "configs" / CONFIGS[name],
                               {"output_dir": str(out / f"{name}_seed{seed}"), "seed": seed, "validation.every": -1,
                                **overrides})
    refs = list_images(REPO / "datasets" / "concepts" / name / "image")
    started = time.perf_counter()
    result = train(config, overwrite=True)
    seconds = time.perf_counter() - started
    row = {"concept": name, "seed": seed, "train_seconds": round(seconds, 1), "steps": result.steps}
    pipe = load_pipeline("toyworld")
    base = load_base(pipe)
    row["base"] = measure(pipe, base.encoder, scene_prompts(base_subject(name), name), out / f"{name}_seed{seed}" / "base",
                          refs, name, num_images=images, seed=seed * 100, scorer=scorer)
    pipe = load_pipeline("toyworld")
    model = load_adapter(pipe, result.concept_path)
    row["concept_scores"] = measure(pipe, model.encoder, scene_prompts(concept_subject(name), name),
                                    out / f"{name}_seed{seed}" / "concept", refs, name, num_images=images,
                                    seed=seed * 100, scorer=scorer, concept=str(result.concept_path))
    return row


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| concept | model | " + " | ".join(h for _, h in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in rows if r["concept"] == name]
        for label, key in (("base (class + colour in words)", "base"), ("trained concept", "concept_scores")):
            cells = [_stats([r[key][k]["mean"] for r in mine]) for k, _ in METRICS]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", default="robot,cat,cactus")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--out", type=Path, default=Path("runs/bench_concepts"))
    args = p.parse_args(argv)
    from mixofshow.evaluate.clip import ClipSpec, load_clip

    overrides = {k: _value(v) for k, _, v in (s.partition("=") for s in args.set)}
    scorer = load_clip(ClipSpec(model="toyworld"), device="cpu")
    rows = []
    for name in args.concepts.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_one(name, seed, args.out, overrides, scorer, args.images))
            r = rows[-1]
            print(f"{name} seed {seed}: {r['steps']} steps in {r['train_seconds']} s; identity base "
                  f"{r['base']['identity']['mean']:.3f} concept {r['concept_scores']['identity']['mean']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concepts.json").write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
