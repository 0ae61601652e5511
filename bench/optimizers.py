"""Step time and state size of every registered LoRA optimizer on Stable Diffusion 1.5's LoRA shapes.

Builds the 176 LoRA pairs of SD 1.5's attention layers (real shapes, random values and gradients):
48 text-encoder projections (768 x 768) and 128 UNet projections, per transformer block attn1
q, k, v, out (d x d) and attn2 q, out (d x d), k, v (d x 768), over 16 blocks of widths
320, 320, 640, 640, 1280, 1280 (down), 1280 (mid), 1280 x 3, 640 x 3, 320 x 3 (up).

For every optimizer and rank it prints::

    NAME rank=R step_ratio=X state_ratio=Y

``step_ratio`` = step time / step time of ``torch.optim.AdamW(foreach=True)`` on the same
tensors (the median, over rounds, of the ratio of the two timed back to back, which keeps it
stable on a busy machine), ``state_ratio`` = bytes of optimizer state / AdamW's. Optimizers that need the
full gradient get a random m x n ``G`` per pair (``opt.full_grads.set_``) (its cost in the LoRA layer's backward
hook is not counted); ``usv`` optimizers (StelLA) get (U, S, V) triples of the same shapes.

    python bench/optimizers.py [--ranks 4 16] [--optimizers adamw lora_rite] [--repeats 15]
                               [--budget 4] [--threads 1] [--default-malloc]

Like ``mixofshow train``, it raises glibc's mmap/trim thresholds first
(:func:`mixofshow.utils.memory.tune_cpu_allocator`); ``--default-malloc`` measures without.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mixofshow.optim import SPECS, build_optimizer
from mixofshow.utils.memory import tune_cpu_allocator

UNET_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
LRS = {"text_encoder": 1e-5, "unet": 1e-4}  # Mix-of-Show's learning rates


def sd15_shapes() -> list[tuple[str, int, int]]:
    """(component, m = out_features, n = in_features) of every LoRA layer of SD 1.5."""
    shapes = [("text_encoder", 768, 768)] * 48
    for d in UNET_WIDTHS:
        shapes += [("unet", d, d)] * 4  # attn1 q, k, v, out
        shapes += [("unet", d, d), ("unet", d, 768), ("unet", d, 768), ("unet", d, d)]  # attn2
    return shapes


def make_factors(rank: int, factorization: str, seed: int = 0) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Random factors with random gradients, (component, factor tuple) per layer."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for component, m, n in sd15_shapes():
        if factorization == "ab":
            shapes = [(rank, n), (m, rank)]
        else:
            shapes = [(m, rank), (rank, rank), (n, rank)]
        factors = []
        for shape in shapes:
            t = (torch.randn(shape, generator=gen) * 0.02).requires_grad_()
            t.grad = torch.randn(shape, generator=gen) * 1e-3
            factors.append(t)
        if factorization == "usv":  # orthonormal U, V
            with torch.no_grad():
                for i in (0, 2):
                    factors[i].copy_(torch.linalg.qr(factors[i])[0])
        out.append((component, tuple(factors)))
    return out


def make_groups(factors: list[tuple[str, tuple[torch.Tensor, ...]]], key: str) -> list[dict]:
    groups = []
    for component, lr in LRS.items():
        entries = [f for c, f in factors if c == component]
        groups.append({key: entries, "lr": lr, "scale": 1.0, "name": component})
    return groups


def add_full_grads(opt, factors: list[tuple[str, tuple[torch.Tensor, ...]]], seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, (a, b) in factors:
        opt.full_grads.set_(a, torch.randn(b.shape[0], a.shape[1], generator=gen) * 1e-3)


def clone_factors(factors: list[tuple[str, tuple[torch.Tensor, ...]]]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    out = []
    for component, f in factors:
        copies = []
        for t in f:
            c = t.detach().clone().requires_grad_()
            c.grad = t.grad.clone()
            copies.append(c)
        out.append((component, tuple(copies)))
    return out


def step_ratio(step: Callable[[], object], ref_step: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Median over rounds of (time of ``step``) / (time of ``ref_step``), timed back to back.

    Pairing the two in every round keeps the ratio stable when the machine's load drifts.
    ``repeats`` rounds, fewer (at least 3) once ``budget_s`` seconds have been spent.
    """
    for _ in range(2):  # warm-up, lazy state
        step()
        ref_step()
    ratios: list[float] = []
    spent = 0.0
    while len(ratios) < repeats and (len(ratios) < 3 or spent < budget_s):
        start = time.perf_counter()
        ref_step()
        middle = time.perf_counter()
        step()
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        spent += end - start
    return statistics.median(ratios)


def median_time(step: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (storage shared between views counted once)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                storage = v.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def torch_adamw(factors, **kwargs) -> torch.optim.Optimizer:
    groups = [
        {"params": [t for c, f in factors if c == component for t in f], "lr": lr}
        for component, lr in LRS.items()
    ]
    return torch.optim.AdamW(groups, weight_decay=1e-2, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--optimizers", nargs="+", default=None, help="registry names (default: all)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per optimizer")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per optimizer")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the LoRA tensors are small, and on a busy 2-core machine a "
        "second thread turns each op into a possible stall; the ratios are what matter)",
    )  # fmt: skip
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="keep glibc's default allocator thresholds (mixofshow's commands raise them, see "
        "mixofshow/utils/memory.py); big batched temporaries then page-fault at every step",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.default_malloc else tune_cpu_allocator()
    names = args.optimizers or sorted(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise SystemExit(f"Unknown optimizers {unknown}; expected some of {sorted(SPECS)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {len(sd15_shapes())} LoRA layers, "
          f"{'tuned' if tuned else 'default'} glibc malloc thresholds")
    for rank in args.ranks:
        base = make_factors(rank, "ab")
        ref = torch_adamw(clone_factors(base), foreach=True)
        t_ref = median_time(ref.step, args.repeats)
        bytes_ref = state_bytes(ref)
        print(f"# rank={rank}: torch AdamW(foreach) {t_ref * 1e3:.2f} ms/step, state {bytes_ref / 2**20:.1f} MiB")
        fused = torch_adamw(clone_factors(base), fused=True)
        ratio = step_ratio(fused.step, ref.step, args.repeats, args.budget)
        print(f"torch.AdamW(fused) rank={rank} step_ratio={ratio:.2f} state_ratio={state_bytes(fused) / bytes_ref:.2f}")
        for name in names:
            spec = SPECS[name]
            factors = make_factors(rank, spec.factorization) if spec.factorization != "ab" else clone_factors(base)
            key = "pairs" if spec.factorization == "ab" else "triples"
            opt = build_optimizer(name, make_groups(factors, key))
            if spec.needs_full_grad:
                add_full_grads(opt, factors)
            ratio = step_ratio(opt.step, ref.step, args.repeats, args.budget)
            print(f"{name} rank={rank} step_ratio={ratio:.2f} state_ratio={state_bytes(opt) / bytes_ref:.2f}", flush=True)


if __name__ == "__main__":
    main()
