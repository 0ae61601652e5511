"""Sampling speed on the embedded model: regional vs plain, and batch 4 vs batch 1.

Everything goes through :func:`mixofshow.sample.pipeline.generate` (no files written), on the
embedded tiny SD at its native 128 x 128 (latents 16 x 16), DPM-Solver, CFG 7.5, with a toy
ED-LoRA concept loaded (random LoRA factors), so the layer-wise contexts are 16 layers wide as with
a real concept. Each configuration is timed ``--repeats`` times, interleaved with the others so a
busy machine slows them alike, after one warm-up round; the figures are medians. One line each::

    regional/plain per image (2 regions, batch B): X
    images/s batch 1: A  batch 4: B  (ratio B/A)

``regional`` has two regions (left and right halves, each with its own prompt and negative
prompt) applied at every step, the default; ``plain`` is the same prompts without regions.

    python bench/sampling.py [--steps 10] [--repeats 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixofshow.models.embedded import build_embedded_pipeline  # noqa: E402
from mixofshow.sample.load import load_adapter  # noqa: E402
from mixofshow.sample.pipeline import SampleConfig, generate  # noqa: E402
from mixofshow.sample.regions import Region  # noqa: E402
from tests.test_sample import make_toy_concept  # noqa: E402


def _concept_pipeline(device: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "toy.safetensors"
        make_toy_concept(path, build_embedded_pipeline)  # the tests' toy concept (random LoRA factors)
        pipe = build_embedded_pipeline()
        adapter = load_adapter(pipe, path)
    pipe.to(device)
    return pipe, adapter.encoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, encoder = _concept_pipeline(args.device)
    regions = [
        Region("<toy1> <toy2>, standing", "blurry", box=(0.0, 0.0, 1.0, 0.5)),
        Region("a red car", "lowres", box=(0.0, 0.5, 1.0, 1.0)),
    ]
    prompts = ["<toy1> <toy2> and a car in a street"]

    def config(batch: int, with_regions: bool) -> SampleConfig:
        return SampleConfig(prompts, negative_prompt="ugly", num_images=4, batch_size=batch, steps=args.steps,
                            regions=regions if with_regions else None)

    runs = {"plain-4": config(4, False), "regional-4": config(4, True), "plain-1": config(1, False),
            "regional-1": config(1, True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats + 1):
        for name, cfg in runs.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(pipe, encoder, cfg, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_:  # round 0 warms up
                times[name].append((time.perf_counter() - start) / cfg.num_images)
    med = {name: statistics.median(v) for name, v in times.items()}
    for batch in (4, 1):
        print(f"regional/plain per image (2 regions, batch {batch}): {med[f'regional-{batch}'] / med[f'plain-{batch}']:.2f}")
    ips1, ips4 = 1 / med["plain-1"], 1 / med["plain-4"]
    print(f"images/s batch 1: {ips1:.2f}  batch 4: {ips4:.2f}  (ratio {ips4 / ips1:.2f}; {args.steps} steps, "
          f"{args.device}, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
