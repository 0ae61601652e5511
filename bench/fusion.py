"""Gradient fusion: the closed form against the original's LBFGS on Stable Diffusion 1.5's layer shapes.

For each concept count N it times, per kind of layer, both ways of solving
``min_W sum_i ||W X_i - W_i X_i||^2`` on the same synthetic activations:

- the original (Mix-of-Show ``gradient_fusion.py``, re-implemented): all inputs and target
  outputs stored (fp32), ``torch.optim.LBFGS`` from W0 on the chunked MSE (lr 1, history 25,
  strong Wolfe, tolerances 1e-16, best iterate kept), 500 iterations for text-encoder and K/V
  layers and 50 for spatial layers, as the original runs them;
- ours (``mixofshow.fuse.gram``): activations streamed chunk by chunk (one sampler step or one
  prompt batch at a time, as the forward hooks see them) into float64 Grams, nothing kept, each
  concept's change given as its LoRA factors (as ``mixofshow fuse`` does), then
  ``solve_closed_form`` (Cholesky, ridge anchored at W0).

Layer kinds (SD 1.5; tokens per concept as the original records them):

    text      768 x 768    16 layer-wise versions x (7 + 4 tokens) = 176          48 layers
    kv-320    320 x 768    2 prompts x (2 concept tokens + end) = 6                10 layers
    kv-640    640 x 768    6                                                       10 layers
    kv-1280  1280 x 768    6                                                       12 layers
    sp-320    320 x 320    64 x 64 x 20 steps = 81,920                             30 layers
    sp-640    640 x 640    32 x 32 x 20 = 20,480                                   30 layers
    sp-1280  1280 x 1280   16 x 16 x 20 = 5,120                                    30 layers
    sp-mid   1280 x 1280    8 x 8 x 20 = 1,280                                      6 layers

Synthetic activations: a heavy-tailed spectrum (singular values ~ k^-0.5) in a basis shared by
all concepts, plus a per-concept mean; each concept's LoRA is rank 4 with norm 5% of W0's.
Each kind is solved once per N and its times are scaled to its layer count, so the figures
estimate a whole SD 1.5 fusion: LBFGS solves every layer on its own (one layer's time x count);
the closed form builds one Gram per input tensor, which several layers read (CLIP q/k/v; K and V
of a cross-attention; attn1 q/k/v of a transformer block: ``groups`` below), as ``mixofshow
fuse`` does, so it is timed on such groups (a Gram shared by 3 layers, each with its own target
and solve) and on single layers. One line per N::

    concepts=N speedup=X objective_ratio=Y peak_mb=Z

``speedup`` = LBFGS time / closed-form time (whole model); ``objective_ratio`` = the closed
form's objective / LBFGS's, summed over the model's layers (``--verbose`` shows every kind, with
per-layer times: the closed form's averaged over the layers sharing a Gram);
``peak_mb`` = the closed form's peak working memory for one layer (Grams, one streamed chunk, the
solve), measured in a separate, untimed run as the peak RSS increase on CPU
(``/proc/self/clear_refs``, with glibc set to map and unmap every allocation >= 64 KiB, so that
the block's own tensors count) or the peak allocation on CUDA; it does not grow with N.
``--verbose`` also prints the size of the activations LBFGS stores. Timed runs use the allocator
settings of ``mixofshow``'s commands (:func:`mixofshow.utils.memory.tune_cpu_allocator`) for
both methods. Closed-form times are the median of 3 runs (they
are short, and a busy machine's noise shows), LBFGS runs once. ``--quick`` keeps the iterations but shrinks the layers (text 192 wide,
K/V 80 x 192, one spatial kind 128 wide with 16 x 16 x 5 tokens) and N to 2, 5, 14: under a
minute on CPU, one thread unless ``--threads``. On CPU the speedup is bounded by the ratio of float64 to float32 matrix-multiply
speed (the closed form's Grams are float64, the original's LBFGS float32).

    python bench/fusion.py [--quick] [--concepts 2 5 8 11 14] [--kinds sp-320] [--device cuda] [--verbose]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mixofshow.fuse.gram import GramStats, LowRank, objective, solve_closed_form
from mixofshow.utils.memory import tune_cpu_allocator


@dataclass(frozen=True)
class Kind:
    name: str
    n: int  # input width
    m: int  # output width
    rows: int  # input rows per concept
    chunk: int  # rows per streamed chunk (one sampler step, or all of a prompt batch)
    count: int  # layers of this kind in the model
    iters: int  # the original's LBFGS iterations
    groups: tuple[int, ...] = (1,)  # per block: how many of its layers read each input

    def __post_init__(self) -> None:
        if self.count % sum(self.groups):
            raise ValueError(f"{self.name}: {self.count} layers are not whole blocks of {self.groups}")


# layers per input: CLIP q/k/v share theirs, out_proj not; cross-attention K and V read the same
# text states; per transformer block, attn1 q/k/v share one input, attn1 out, attn2 q, attn2 out not
TEXT, KV, SPATIAL = (3, 1), (2,), (3, 1, 1, 1)


def sd15_kinds(text_iters: int, spatial_iters: int) -> list[Kind]:
    return [
        Kind("text", 768, 768, 176, 176, 48, text_iters, TEXT),
        Kind("kv-320", 768, 320, 6, 6, 10, text_iters, KV),
        Kind("kv-640", 768, 640, 6, 6, 10, text_iters, KV),
        Kind("kv-1280", 768, 1280, 6, 6, 12, text_iters, KV),
        Kind("sp-320", 320, 320, 64 * 64 * 20, 64 * 64, 30, spatial_iters, SPATIAL),
        Kind("sp-640", 640, 640, 32 * 32 * 20, 32 * 32, 30, spatial_iters, SPATIAL),
        Kind("sp-1280", 1280, 1280, 16 * 16 * 20, 16 * 16, 30, spatial_iters, SPATIAL),
        Kind("sp-mid", 1280, 1280, 8 * 8 * 20, 8 * 8, 6, spatial_iters, SPATIAL),
    ]


def quick_kinds(text_iters: int, spatial_iters: int) -> list[Kind]:
    # widths / 4 (text, K/V), / 2.5 (spatial); 4 layer-wise versions; 16 x 16 latents, 5 steps
    return [
        Kind("text", 192, 192, 44, 44, 48, text_iters, TEXT),
        Kind("kv-320", 192, 80, 6, 6, 10, text_iters, KV),
        Kind("sp-320", 128, 128, 16 * 16 * 5, 16 * 16, 30, spatial_iters, SPATIAL),
    ]


class Problem:
    """Deterministic synthetic activations and concept weights of one layer kind."""

    def __init__(self, kind: Kind, concepts: int, device: torch.device, seed: int = 0) -> None:
        self.kind, self.concepts, self.device = kind, concepts, device
        gen = torch.Generator().manual_seed(seed)
        n, m = kind.n, kind.m
        basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
        spectrum = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
        self.mix = (basis * spectrum).T.contiguous().to(device)  # rows @ mix: heavy-tailed spectrum
        self.mean = (0.3 * torch.randn(n, generator=gen)).to(device)
        self.w0 = (torch.randn(m, n, generator=gen) / math.sqrt(n)).to(device)
        self.targets, self.changes, self.means = [], [], []
        for _ in range(concepts):
            a = torch.randn(4, n, generator=gen)
            b = torch.randn(m, 4, generator=gen)
            b *= 0.05 * self.w0.norm().cpu() / (b @ a).norm()
            self.changes.append(LowRank(b.to(device), a.to(device)))  # the concept's LoRA
            self.targets.append(self.w0 + self.changes[-1].dense())  # its weight, for the original
            self.means.append((0.2 * torch.randn(n, generator=gen)).to(device))
        self.seed = seed

    def chunks(self, concept: int):
        """The concept's input rows, one streamed chunk at a time (regenerated identically)."""
        kind = self.kind
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + concept + 1)
        for start in range(0, kind.rows, kind.chunk):
            rows = min(kind.chunk, kind.rows - start)
            z = torch.randn(rows, kind.n, generator=gen, device=self.device)
            yield z @ self.mix + self.mean + self.means[concept]


def original_lbfgs(inputs: torch.Tensor, outputs: torch.Tensor, w0: torch.Tensor, iters: int) -> torch.Tensor:
    """Mix-of-Show's ``update_quasi_newton`` (re-implemented): LBFGS on the chunked MSE from W0."""
    weight = w0.clone().requires_grad_(True)
    best = {"loss": math.inf, "weight": w0.clone()}
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=iters, history_size=25,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        loss = 0
        for start in range(0, inputs.shape[0], 5000):
            x, y = inputs[start:start + 5000], outputs[start:start + 5000]
            loss = loss + F.mse_loss(F.linear(x, weight), y) * x.shape[0]
        loss = loss / inputs.shape[0]
        if loss.item() < best["loss"]:
            best["loss"], best["weight"] = loss.item(), weight.detach().clone()
        loss.backward()
        return loss

    optimizer.step(closure)
    return best["weight"]


class PeakMemory:
    """Peak memory increase of a block: CUDA allocator peak, or peak RSS via /proc/self/clear_refs.

    On CPU, glibc is told for the block to serve every allocation >= 64 KiB by mmap and to give it
    back on free, after returning all free memory to the system, so the peak RSS counts the
    block's own tensors and not memory freed earlier and reused. That makes every allocation
    fault its pages in, so the block is not timed; afterwards glibc goes back to reusing memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _malloc_mode(exact=True)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.mb = max(0.0, (_status_kb("VmHWM") * 1024 - self.start) / 2**20)
            _malloc_mode(exact=False)


def _malloc_mode(exact: bool) -> None:
    if not exact:  # as mixofshow's commands run
        tune_cpu_allocator()
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)
    tune_cpu_allocator(mmap_threshold=64 * 1024, trim_threshold=128 * 1024)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def closed_form_run(problem: Problem, ridge: float, heads: int = 1) -> tuple[float, GramStats, torch.Tensor]:
    """Stream every concept's chunks into the Grams of ``heads`` layers reading them and solve
    each layer; only the updates and solves are timed. Returns the first layer's statistics."""
    device, seconds = problem.device, 0.0
    first = GramStats(problem.w0)
    layers = [first] + [GramStats(problem.w0, share=first) for _ in range(heads - 1)]
    for i in range(problem.concepts):
        for x in problem.chunks(i):  # the model makes the activations; the hooks see them one by one
            _sync(device)
            t = time.perf_counter()
            for stats in layers:
                stats.update(x, problem.changes[i], concept=i)
            _sync(device)
            seconds += time.perf_counter() - t
            del x
    t = time.perf_counter()
    weights = [solve_closed_form(stats, ridge) for stats in layers]
    _sync(device)
    return seconds + time.perf_counter() - t, first, weights[0]


def closed_form_time(problem: Problem, ridge: float, repeats: int = 3) -> tuple[float, GramStats, torch.Tensor]:
    """The closed form's time for all ``kind.count`` layers of the problem's kind (each group of
    layers sharing a Gram timed together), with one layer's statistics and solution."""
    kind = problem.kind
    # short, so a busy machine's noise shows: the median of a few runs
    per_group = {}
    for heads in sorted(set(kind.groups)):
        runs = [closed_form_run(problem, ridge, heads) for _ in range(repeats)]
        per_group[heads] = statistics.median(r[0] for r in runs)
    _, stats, weight = runs[0]
    return kind.count // sum(kind.groups) * sum(per_group[h] for h in kind.groups), stats, weight


def run_kind(kind: Kind, concepts: int, device: torch.device, ridge: float, repeats: int = 3) -> dict:
    """Both methods on one kind; times are for all ``kind.count`` layers (LBFGS: one layer's x count)."""
    problem = Problem(kind, concepts, device)
    with PeakMemory(device) as mem_closed:  # untimed: exact accounting slows allocations down
        closed_form_run(problem, ridge, heads=max(kind.groups))
    closed_time, stats, w_closed = closed_form_time(problem, ridge, repeats)  # LBFGS runs once
    # the original: store every input and output, then LBFGS
    inputs = torch.cat([x for i in range(concepts) for x in problem.chunks(i)])
    outputs = torch.cat([x @ problem.targets[i].T for i in range(concepts) for x in problem.chunks(i)])
    stored_mb = (inputs.numel() * inputs.element_size() + outputs.numel() * outputs.element_size()) / 2**20
    _sync(device)
    t = time.perf_counter()
    w_lbfgs = original_lbfgs(inputs, outputs, problem.w0, kind.iters)
    _sync(device)
    lbfgs_time = time.perf_counter() - t
    del inputs, outputs
    return {
        "closed_time": closed_time,
        "lbfgs_time": lbfgs_time * kind.count,  # the original solves every layer on its own
        "closed_obj": objective(w_closed, stats),
        "lbfgs_obj": objective(w_lbfgs, stats),
        "base_obj": objective(problem.w0, stats),
        "closed_mb": mem_closed.mb,
        "lbfgs_mb": stored_mb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced widths and token counts (< 1 min on CPU)")
    parser.add_argument("--concepts", type=int, nargs="+", help="concept counts (default 2 5 8 11 14; quick: 2 5 14)")
    parser.add_argument("--lbfgs-iters", type=int, help="LBFGS iterations, text and K/V (default 500, the original's)")
    parser.add_argument("--lbfgs-spatial-iters", type=int, help="LBFGS iterations, spatial (default 50, the original's)")
    parser.add_argument("--ridge", type=float, default=1e-6, help="closed-form ridge relative to mean(diag G)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; quick: 1)")
    parser.add_argument("--kinds", nargs="+", help="only these layer kinds (e.g. sp-320)")
    parser.add_argument("--verbose", action="store_true", help="per layer kind: times, objectives, memory")
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        # quick layers are small: one thread is the efficient choice for both methods, and on a
        # shared machine it keeps other processes from turning every small op into a wait
        torch.set_num_threads(args.threads or 1)
    _malloc_mode(exact=False)
    device = torch.device(args.device)
    text_iters = args.lbfgs_iters or 500
    spatial_iters = args.lbfgs_spatial_iters or 50
    kinds = (quick_kinds if args.quick else sd15_kinds)(text_iters, spatial_iters)
    if args.kinds:
        unknown = sorted(set(args.kinds) - {k.name for k in kinds})
        if unknown:
            parser.error(f"unknown layer kind {unknown[0]!r}; expected some of {[k.name for k in kinds]}")
        kinds = [k for k in kinds if k.name in args.kinds]
    counts = args.concepts or ([2, 5, 14] if args.quick else [2, 5, 8, 11, 14])
    # first-call allocations (threads, LAPACK workspaces) do not belong to any measurement
    run_kind(Kind("warm-up", 64, 32, 64, 32, 1, 5), 2, device, args.ridge)
    for kind in kinds:
        closed_form_run(Problem(replace(kind, rows=kind.chunk), 2, device), args.ridge)
    print(f"# {'quick' if args.quick else 'SD 1.5'} layer kinds on {device} ({torch.get_num_threads()} threads); "
          f"LBFGS {text_iters} iterations (text, K/V), {spatial_iters} (spatial); ridge {args.ridge:g}")
    for concepts in counts:
        results = {kind.name: run_kind(kind, concepts, device, args.ridge) for kind in kinds}
        total = {key: sum(r[key] for r in results.values()) for key in ("closed_time", "lbfgs_time")}
        total.update({key: sum(r[key] * k.count for k, r in zip(kinds, results.values()))
                      for key in ("closed_obj", "lbfgs_obj")})
        if args.verbose:
            for kind in kinds:
                r = results[kind.name]
                print(f"#   N={concepts} {kind.name:8s} x{kind.count:<3d} per layer: lbfgs {r['lbfgs_time'] / kind.count:8.3f}s "
                      f"closed {r['closed_time'] / kind.count:7.4f}s  objective/base: lbfgs {r['lbfgs_obj'] / r['base_obj']:.3e} "
                      f"closed {r['closed_obj'] / r['base_obj']:.3e}  MB: lbfgs stores {r['lbfgs_mb']:.0f}, "
                      f"closed-form peak {r['closed_mb']:.0f}")
        peak = max(r["closed_mb"] for r in results.values())
        print(f"concepts={concepts} speedup={total['lbfgs_time'] / total['closed_time']:.1f} "
              f"objective_ratio={total['closed_obj'] / total['lbfgs_obj']:.4g} peak_mb={peak:.1f}", flush=True)


if __name__ == "__main__":
    main()
