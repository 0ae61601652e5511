"""How fast each registered LoRA optimizer fits an ill-conditioned low-rank matrix.

Minimises ``0.5 ||s B A - dW||_F^2`` over LoRA factors (B zero-initialised, A as LoRALinear
initialises it; ``usv`` optimizers: U, V random orthonormal, S zero) for a target ``dW`` of size
m x n (64 x 48) and rank 4 with singular values spaced geometrically from 1 to 1/kappa, scaled to
unit Frobenius norm (gradients of the size a mean-reduced loss gives). Optimizers with
``needs_full_grad`` get ``G = s B A - dW``. Each optimizer runs with its registry defaults at
every learning rate of a grid; the best lr is, among the runs that do not diverge, the one
reaching relative error 1e-2 first (then 1e-1, then the lowest final error); "inf" marks a
divergence. Prints one row per optimizer and condition number.

    python bench/convergence.py [--quick] [--steps N] [--kappas 1e2 1e3] [--optimizers adamw ...]
"""

from __future__ import annotations

import argparse
import math

import torch

from mixofshow.optim import SPECS, build_optimizer

M, N, TARGET_RANK = 64, 48, 4
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
QUICK_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def target(kappa: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(M, TARGET_RANK, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(N, TARGET_RANK, generator=gen, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -math.log10(kappa), TARGET_RANK, dtype=torch.float64)
    dw = u @ torch.diag(sigma) @ v.T
    return (dw / dw.norm()).float()


def init_factors(factorization: str, rank: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    if factorization == "usv":
        u = torch.linalg.qr(torch.randn(M, rank, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(N, rank, generator=gen))[0]
        return tuple(t.requires_grad_() for t in (u, torch.zeros(rank, rank), v))
    bound = 1.0 / math.sqrt(N)  # kaiming_uniform(a=sqrt(5)), as LoRALinear
    a = (torch.rand(rank, N, generator=gen) * 2 - 1) * bound
    return a.requires_grad_(), torch.zeros(M, rank, requires_grad=True)


def product(factors: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
    if len(factors) == 3:
        u, s, v = factors
        return scale * u @ s @ v.T
    a, b = factors
    return scale * b @ a


def run(name: str, lr: float, dw: torch.Tensor, steps: int, rank: int, scale: float = 1.0) -> list[float]:
    """Relative error ||s B A - dW|| / ||dW|| after each step (stops early on divergence)."""
    spec = SPECS[name]
    factors = init_factors(spec.factorization, rank)
    key = "triples" if spec.factorization == "usv" else "pairs"
    opt = build_optimizer(name, [{key: [factors], "lr": lr, "scale": scale}])
    errors = []
    for _ in range(steps):
        opt.zero_grad()
        w = product(factors, scale)
        residual = w - dw
        (0.5 * residual.square().sum()).backward()
        if spec.needs_full_grad:
            opt.full_grads.set_(factors[0], residual.detach())
        opt.step()
        with torch.no_grad():
            err = ((product(factors, scale) - dw).norm() / dw.norm()).item()
        errors.append(err)
        if not math.isfinite(err) or err > 1e3:
            break
    return errors


def first_below(errors: list[float], level: float) -> int | None:
    return next((i + 1 for i, e in enumerate(errors) if e <= level), None)


def score(errors: list[float], steps: int) -> tuple:
    """Sort key: finished without diverging, then reach 1e-2 first, then 1e-1 first, then the
    lowest final error."""
    diverged = len(errors) < steps or not math.isfinite(errors[-1]) or errors[-1] > 1.0
    s2, s1 = first_below(errors, 1e-2), first_below(errors, 1e-1)
    return (diverged, s2 is None, s2 or 0, s1 is None, s1 or 0, errors[-1] if not diverged else math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps, 6 learning rates")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e2, 1e3, 1e4])
    parser.add_argument("--optimizers", nargs="+", default=None, help="registry names (default: all)")
    parser.add_argument("--rank", type=int, default=TARGET_RANK, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (300 if args.quick else 1000)
    lrs = QUICK_LRS if args.quick else LRS
    names = args.optimizers or sorted(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise SystemExit(f"Unknown optimizers {unknown}; expected some of {sorted(SPECS)}")
    print(f"# {M}x{N} target of rank {TARGET_RANK}, LoRA rank {args.rank}, {steps} steps, lrs {list(lrs)}")
    header = f"{'optimizer':<14}{'kappa':>8}{'best lr':>9}{'steps<1e-1':>12}{'steps<1e-2':>12}{'final rel err':>15}"
    print(header)
    for name in names:
        for kappa in args.kappas:
            dw = target(kappa)
            runs = {lr: run(name, lr, dw, steps, args.rank) for lr in lrs}
            lr = min(runs, key=lambda k: score(runs[k], steps))
            errors = runs[lr]
            s1, s2 = first_below(errors, 1e-1), first_below(errors, 1e-2)
            final = errors[-1] if len(errors) == steps else math.inf
            print(f"{name:<14}{kappa:>8.0e}{lr:>9.0e}{s1 or '-':>12}{s2 or '-':>12}{final:>15.2e}")


if __name__ == "__main__":
    main()
