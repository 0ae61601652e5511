"""``mixofshow evaluate`` and ``mixofshow compare``.

Examples::

    mixofshow evaluate samples/robot --reference-images datasets/concepts/robot/image
    mixofshow compare configs/example.yaml --optimizers adamw,adams --steps 60 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run_evaluate", "run_compare"]


def _clip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", default=None,
                   help="open_clip model name, a model-config .json, 'toyworld' (the toy world's evaluation CLIP) "
                        "or 'tiny' (random tiny CLIP, tests only); default: toyworld for images of the toy world, "
                        "else ViT-B-32-quickgelu")
    p.add_argument("--clip-weights", help="pretrained tag (default openai) or a local weights file; 'random' for random weights")
    p.add_argument("--dino-weights", help="local DINO ViT-S/16 weights file (timm or torch-hub layout); none: DINO skipped")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="CLIP-T / CLIP-I / DINO / identity scores of a folder written by `mixofshow sample`",
        description="Score the images of a sample folder: CLIP-T (image vs 'A photo depicts ' + prompt with "
        "concept words replaced by the class word, 2.5 * max(cos, 0)), CLIP-I (mean max(cos, 0) over all "
        "generated x reference pairs), DINO when its weights are given. Raw cosines are reported too.",
    )
    p.add_argument("samples_dir", metavar="SAMPLES_DIR", help="folder with index.json (from `mixofshow sample`)")
    p.add_argument("--reference-images", metavar="DIR", help="the concept's real images (CLIP-I, DINO)")
    p.add_argument("--out", metavar="FILE", help="output stem: FILE.json and FILE.csv (default SAMPLES_DIR/evaluation)")
    p.add_argument("--identity", default="auto", metavar="NAME",
                   help="toy world: score identity for this shipped concept (robot, cat, cactus) in every image; "
                        "'auto' (default): for prompts naming a shipped concept's words, on toy-world images; 'off'")
    p.add_argument("--class-word", action="append", default=[], metavar="WORDS=CLASS",
                   help="class word for concept words the concept file does not name, e.g. '<robot1> <robot2>=robot'")
    _clip_args(p)
    p.set_defaults(func=run_evaluate)

    c = subparsers.add_parser(
        "compare", help="train, sample and score one concept with several LoRA optimizers",
        description="Train the config's concept once per optimizer and seed (same data, seeds and steps), "
        "sample the same prompts and seeds, score them, and write comparison.csv/.md, plots and an image grid. "
        "Rerunning skips finished runs and resumes unfinished ones.",
    )
    c.add_argument("config", metavar="CONFIG", help="training config (may hold an `optimizers:` lr table)")
    c.add_argument("--optimizers", required=True, help="comma-separated names (`mixofshow optimizers`)")
    c.add_argument("--steps", type=int, help="steps per run (default: the config's train.max_steps)")
    c.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    c.add_argument("--output-dir", help="comparison folder (default runs/compare_<name>)")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--jobs", type=int, default=1, help="runs at once, one worker process each (default 1)")
    where.add_argument("--devices", help="comma-separated devices, one run on each at once, e.g. cuda:0,cuda:1")
    c.add_argument("--lr-grid", help="comma-separated lr factors tried per optimizer on the held-out loss, e.g. 0.3,1,3")
    c.add_argument("--grid-steps", type=int, help="steps of each lr-grid run (default --steps)")
    c.add_argument("--prompts", metavar="FILE", help="prompt list to sample (default: the config's validation prompts)")
    c.add_argument("--num-images", type=int, default=2, help="images per prompt, seeds 0..N-1 (default 2)")
    c.add_argument("--sample-steps", type=int, help="sampler steps (default: validation.steps)")
    c.add_argument("--scheduler", default="ddim", help="sampler (default ddim, as Mix-of-Show's evaluation)")
    c.add_argument("--heldout-draws", type=int, default=16, help="draws of the held-out loss (default 16)")
    _clip_args(c)
    c.set_defaults(func=run_compare)


def _class_words(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        words, sep, cls = item.rpartition("=")
        if not sep or not words.strip() or not cls.strip():
            raise ValueError(f"--class-word {item!r}: expected WORDS=CLASS, e.g. '<robot1> <robot2>=robot'")
        out[words.strip()] = cls.strip()
    return out


def _fmt(stats) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats["std"] is not None else "")


def run_evaluate(args) -> int:
    from pathlib import Path

    from mixofshow.evaluate.scores import evaluate

    out = Path(args.out) if args.out else Path(args.samples_dir) / "evaluation"
    report = evaluate(args.samples_dir, args.reference_images, args.clip, args.clip_weights,
                      dino_weights=args.dino_weights, out=out, class_words=_class_words(args.class_word),
                      device=args.device, identity=None if args.identity == "off" else args.identity)
    clip = report["clip"]
    print(f"CLIP {clip['model']} weights {clip['weights']}: {clip['formula']}")
    o = report["overall"]
    for key, name in (("clip_t", "CLIP-T"), ("clip_t_cos", "CLIP-T cos"), ("clip_i", "CLIP-I"),
                      ("clip_i_cos", "CLIP-I cos"), ("dino", "DINO cos"), ("identity", "identity")):
        print(f"  {name:<11} {_fmt(o[key])}  (n={o[key]['n']})")
    for note in report["notes"]:
        print(f"  note: {note}")
    stem = out.with_suffix("") if out.suffix in (".json", ".csv") else out
    print(f"wrote {stem}.json and {stem}.csv")
    return 0


def run_compare(args) -> int:
    from mixofshow.evaluate.comparison import compare

    prompts = None
    if args.prompts:
        from mixofshow.data import load_prompt_list

        prompts = load_prompt_list(args.prompts)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        grid = [float(f) for f in args.lr_grid.split(",") if f.strip()] if args.lr_grid else None
    except ValueError:
        raise ValueError("--seeds takes integers and --lr-grid numbers, comma-separated (e.g. 0,1,2 and 0.3,1,3)") from None

    def progress(p) -> None:
        eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds else ""
        if p.phase in ("report", "done", "cancelled") or p.step in (0, p.total):
            print(f"[{p.phase}] {p.run or ''} {p.step}/{p.total} (runs done {p.runs_done}/{p.runs_total}{eta}) {p.message}",
                  file=sys.stderr)

    result = compare(
        args.config, [o.strip() for o in args.optimizers.split(",") if o.strip()], seeds=seeds, steps=args.steps,
        output_dir=args.output_dir, jobs=args.jobs, devices=args.devices.split(",") if args.devices else None,
        lr_grid=grid, progress=progress, prompts=prompts, num_images=args.num_images,
        sample_steps=args.sample_steps, scheduler=args.scheduler, heldout_draws=args.heldout_draws,
        grid_steps=args.grid_steps, clip=args.clip, clip_weights=args.clip_weights, dino_weights=args.dino_weights,
    )
    if result.cancelled:
        print("cancelled; run the same command again to resume")
        return 130
    print((result.output_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return 0
