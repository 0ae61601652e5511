"""A known-answer benchmark of the LoRA optimizers on the embedded model (offline).

The teacher is a concept with a known answer: its two words get fixed token embeddings
(``<tchr1>`` seeded random with the norm of a vocabulary row, ``<tchr2>`` the class word
``robot`` plus a seeded perturbation), and every LoRA layer of the text encoder and the UNet gets
a known rank-r change ``dW_T = U diag(sigma) V^T`` with singular values spaced geometrically from
1 to 1/kappa (ill-conditioned), scaled to ``delta_scale`` times the spectral norm of the base
weight. The teacher samples ``a photo of <tchr1> <tchr2>`` (DDIM, no guidance, so the images
come from the teacher's own conditional model); those images are the training set. Every
optimizer then trains a student from scratch (the usual ED-LoRA init) for each step budget and
seed, and the bench reports:

- held-out gap: the student's held-out denoising loss minus the teacher's, on the same fixed
  draws (``mixofshow/evaluate/heldout.py``); 0 = as good as the known answer;
- W distance: ``sqrt(sum_l ||dW_S - dW_T||^2) / sqrt(sum_l ||dW_T||^2)`` over all LoRA layers,
  ``dW = s B A`` (1 = nothing learned, 0 = the teacher's weights);
- prediction distance: ``sqrt(sum ||eps_S - eps_T||^2 / sum ||eps_T||^2)`` between the student's
  and the teacher's UNet predictions on those draws (0 = the teacher's denoiser); the header
  gives the same figure for the students' starting point;
- embedding distance: the same relative distance for the concept-token embeddings.

Why both a function-space and a weight-space answer: the embedded model has random weights, so
the teacher is not the minimiser of the denoising loss on its own samples (a random UNet is no
consistent denoiser), and the held-out gap can be negative; the prediction and W distances have
the known answer 0 whatever the base model.

Mean +- sample std over the seeds. All optimizers use the same learning rates (``--lr-unet``,
``--lr-text``, linear decay over each budget); the README table states them.

    python bench/teacher.py                      # default size: a few minutes on 2 busy cores
    python bench/teacher.py --big                # 128 px, budgets 25/100, every optimizer
    python bench/teacher.py --optimizers adamw,lora_rite,adams,stella --steps 10,30 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixofshow.concepts.attention import num_cross_attention_layers  # noqa: E402
from mixofshow.concepts.edlora import base_model_name  # noqa: E402
from mixofshow.concepts.io import ConceptFile, ConceptMeta, load_concept, save_concept  # noqa: E402
from mixofshow.concepts.lora import text_encoder_lora_targets, unet_lora_targets  # noqa: E402
from mixofshow.evaluate.heldout import heldout_predictions  # noqa: E402
from mixofshow.models.loading import load_pipeline  # noqa: E402
from mixofshow.train.config import load_train_config  # noqa: E402
from mixofshow.train.loop import train  # noqa: E402
from mixofshow.utils.memory import tune_cpu_allocator  # noqa: E402

WORDS = ["<tchr1>", "<tchr2>"]
PROMPT = "a photo of <tchr1> <tchr2>"


def known_delta(w0: torch.Tensor, rank: int, kappa: float, delta_scale: float, gen: torch.Generator):
    """(A, B) with ``B A = delta_scale * ||W0||_2 * U diag(sigma) V^T``, sigma from 1 to 1/kappa."""
    m, n = w0.shape
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -math.log10(kappa), rank, dtype=torch.float64)
    sigma = sigma * delta_scale * torch.linalg.matrix_norm(w0.double(), ord=2)
    return (torch.diag(sigma.sqrt()) @ v.T).float(), (u @ torch.diag(sigma.sqrt())).float()


def make_teacher(path: Path, blank_path: Path, rank: int, kappa: float, delta_scale: float,
                 seed: int = 1234, base_model: str = "embedded") -> ConceptFile:
    """Write the teacher to ``path`` and, to ``blank_path``, the students' starting point
    (no LoRA change, ``<tchr1>`` at 0 ~ its N(0, 0.013^2) init, ``<tchr2>`` = ``robot``)."""
    pipe = load_pipeline(base_model)
    gen = torch.Generator().manual_seed(seed)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    layers = num_cross_attention_layers(pipe.unet)
    row_norm = float(table.norm(dim=-1).mean())
    robot = table[pipe.tokenizer("robot").input_ids[1]]
    first = torch.randn(table.shape[1], generator=gen)
    embeddings = {
        WORDS[0]: (first / first.norm() * row_norm).expand(layers, -1).clone(),
        WORDS[1]: (robot + 0.5 * row_norm * torch.randn(layers, table.shape[1], generator=gen) / table.shape[1] ** 0.5),
    }
    lora = {}
    for component, names in (("text_encoder", text_encoder_lora_targets(pipe.text_encoder)),
                             ("unet", unet_lora_targets(pipe.unet))):
        module = getattr(pipe, component)
        for name in names:
            lora[f"{component}.{name}"] = known_delta(module.get_submodule(name).weight.detach(), rank, kappa,
                                                      delta_scale, gen)
    meta = ConceptMeta(base_model=base_model_name(pipe), rank=rank, scale=1.0, words=WORDS, num_layers=layers,
                       text_dim=table.shape[1], class_words={WORDS[0]: None, WORDS[1]: "robot"},
                       optimizer="teacher", replace_mapping={"<TOK>": " ".join(WORDS)},
                       extra={"kappa": kappa, "delta_scale": delta_scale, "seed": seed})
    concept = ConceptFile(meta, embeddings, lora)
    save_concept(path, concept)
    blank = {WORDS[0]: torch.zeros(layers, table.shape[1]), WORDS[1]: robot.expand(layers, -1).clone()}
    save_concept(blank_path, ConceptFile(meta, blank, {k: (a, torch.zeros_like(b)) for k, (a, b) in lora.items()}))
    return concept


def teacher_images(teacher: Path, folder: Path, images: int, resolution: int, steps: int,
                   base_model: str = "embedded", device: str = "cpu") -> Path:
    """The teacher's samples as a Mix-of-Show concept folder; returns its concept-list JSON."""
    from mixofshow.sample.load import load_adapter
    from mixofshow.sample.pipeline import SampleConfig, generate

    pipe = load_pipeline(base_model)
    adapter = load_adapter(pipe, teacher)
    pipe.to(device)
    samples = generate(pipe, adapter.encoder, SampleConfig(
        prompts=[PROMPT], num_images=images, seed=0, steps=steps, guidance_scale=1.0, scheduler="ddim",
        height=resolution, width=resolution), progress=False)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "caption").mkdir(exist_ok=True)
    for k, s in enumerate(samples):
        s.image.save(folder / "image" / f"teacher_{k:02d}.png")
        (folder / "caption" / f"teacher_{k:02d}.txt").write_text("a photo of <TOK>\n")
    listing = folder.parent / "teacher.json"
    listing.write_text(json.dumps([{"instance_prompt": "<TOK>", "instance_data_dir": str(folder / "image"),
                                    "caption_dir": str(folder / "caption")}]))
    return listing


def relative_distance(student: ConceptFile, teacher: ConceptFile) -> tuple[float, float]:
    """(W distance, embedding distance), both relative to the teacher's change."""
    num = den = 0.0
    for name, (a_t, b_t) in teacher.lora.items():
        d_t = teacher.meta.scale * (b_t.double() @ a_t.double())
        a_s, b_s = student.lora[name]
        d_s = student.meta.scale * (b_s.double() @ a_s.double())
        num += float((d_s - d_t).pow(2).sum())
        den += float(d_t.pow(2).sum())
    e_num = sum(float((student.embeddings[w].double() - teacher.embeddings[w].double()).pow(2).sum()) for w in WORDS)
    e_den = sum(float(teacher.embeddings[w].double().pow(2).sum()) for w in WORDS)
    return math.sqrt(num / den), math.sqrt(e_num / e_den)


def prediction_distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    """``sum ||eps_S - eps_T||^2 / sum ||eps_T||^2`` over the held-out draws (0: the teacher's denoiser)."""
    num = sum(float((s.double() - t.double()).pow(2).sum()) for s, t in zip(student, teacher))
    return math.sqrt(num / sum(float(t.double().pow(2).sum()) for t in teacher))


def fmt(values: list[float], digits: int = 3) -> str:
    if any(not math.isfinite(v) for v in values):
        return "nan (diverged)"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default="adamw,scaled_adamw,adams")
    p.add_argument("--steps", default="5,15", help="step budgets (comma-separated)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--kappa", type=float, default=100.0, help="condition number of the teacher's LoRA change")
    p.add_argument("--delta-scale", type=float, default=0.5, help="||dW_T||_2 / ||W0||_2 per layer")
    p.add_argument("--lr-unet", type=float, default=1e-3)
    p.add_argument("--lr-text", type=float, default=1e-4)
    p.add_argument("--images", type=int, default=8, help="teacher samples = training images")
    p.add_argument("--draws", type=int, default=8, help="held-out draws")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--big", action="store_true", help="128 px, budgets 25,100, 16 draws, every registered optimizer")
    p.add_argument("--output-dir", default="runs/bench_teacher")
    p.add_argument("--base-model", default="embedded", help="any base model `mixofshow train` takes (default embedded)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.big:
        from mixofshow.optim import SPECS

        args.resolution, args.steps, args.optimizers, args.draws = 128, "25,100", ",".join(SPECS), 16
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    optimizers = args.optimizers.split(",")

    started = time.perf_counter()
    teacher_path = out / "teacher.safetensors"
    teacher = make_teacher(teacher_path, out / "blank.safetensors", args.rank, args.kappa, args.delta_scale,
                           base_model=args.base_model)
    listing = teacher_images(teacher_path, out / "teacher_data", args.images, args.resolution, 20,
                             args.base_model, args.device)

    def config_for(name: str, steps: int, seed: int):
        return load_train_config(ROOT / "configs" / "example.yaml", {
            "name": "student", "base_model": args.base_model, "train.device": args.device, "output_dir": str(out / "students" / f"{name}_steps{steps}_seed{seed}"), "seed": seed,
            "data.concept_list": str(listing), "data.replace_mapping": {"<TOK>": " ".join(WORDS)},
            "data.resolution": args.resolution, "data.use_masks": False, "data.templates": False,
            "data.shuffle_tags": False, "data.flip_p": 0.0,
            "concept.words": WORDS, "concept.class_words": {WORDS[1]: "robot"}, "concept.freeze_norm": None,
            "lora.rank": args.rank, "optimizer.name": name, "optimizer.params": {},
            "optimizer.lr_unet": args.lr_unet, "optimizer.lr_text_encoder": args.lr_text,
            "train.max_steps": steps, "train.batch_size": 1, "train.checkpoint_every": 0, "validation.every": -1,
        })

    reference = config_for("adamw", 1, 0)
    floor, teacher_preds = heldout_predictions(reference, teacher_path, args.draws, args.device)
    _, base_preds = heldout_predictions(reference, out / "blank.safetensors", args.draws, args.device)
    base_dist = prediction_distance(base_preds, teacher_preds)
    rows = []
    for name in optimizers:
        for steps in budgets:
            gaps, dists, edists, pdists, times = [], [], [], [], []
            for seed in seeds:
                config = config_for(name, steps, seed)
                t0 = time.perf_counter()
                result = train(config, resume=False)
                times.append((time.perf_counter() - t0) / steps)
                student = load_concept(result.concept_path)
                loss, preds = heldout_predictions(config, result.concept_path, args.draws, args.device)
                gaps.append(loss - floor)
                pdists.append(prediction_distance(preds, teacher_preds))
                d, e = relative_distance(student, teacher)
                dists.append(d)
                edists.append(e)
            rows.append((name, steps, fmt(gaps, 4), fmt(pdists), fmt(dists), fmt(edists), statistics.fmean(times)))
            print(f"{name} {steps} steps: gap {rows[-1][2]}, prediction distance {rows[-1][3]}, "
                  f"W distance {rows[-1][4]}", file=sys.stderr)

    print(f"\nteacher: rank {args.rank}, kappa {args.kappa:g}, ||dW_T||_2 = {args.delta_scale:g} ||W0||_2 per layer; "
          f"{args.images} teacher images at {args.resolution} px; lr UNet {args.lr_unet:g}, text {args.lr_text:g} "
          f"(linear decay), batch 1; seeds {args.seeds}; teacher's held-out loss {floor:.4f} over {args.draws} draws; "
          f"prediction distance of the untrained init (no LoRA, teacher's words at class/random init): {base_dist:.3f}\n")
    print("| optimizer | steps | held-out loss gap to teacher | prediction distance to teacher | W distance (rel.) "
          "| embedding distance (rel.) | s / step (incl. build) |")
    print("|---|---|---|---|---|---|---|")
    for name, steps, gap, pdist, dist, edist, sec in rows:
        print(f"| `{name}` | {steps} | {gap} | {pdist} | {dist} | {edist} | {sec:.2f} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
