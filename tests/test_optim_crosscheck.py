"""Cross-checks against an independent public implementation: ``pytorch-optimizer`` (test-only
dependency, ``requirements-dev.txt``): its ``RACS`` for the direction ``lracs`` lifts, and its
``LoRARite``. Where the semantics differ, the test states how and asserts the documented
difference (docs/optimizers.md, "Cross-checks")."""

from __future__ import annotations

import math

import pytest
import torch

from mixofshow.optim import build_optimizer
from mixofshow.optim.lracs import racs_direction

pytorch_optimizer = pytest.importorskip("pytorch_optimizer", reason="test-only dependency: pip install -r requirements-dev.txt")

F64 = torch.float64
BETA, ALPHA, GAMMA, EPS = 0.9, 0.05, 1.01, 1e-8

pytestmark = pytest.mark.usefixtures("one_thread")


def their_racs_directions(grads):
    """The update of ``pytorch_optimizer.RACS`` (lr 1) on a parameter, one gradient per step."""
    p = torch.zeros_like(grads[0], requires_grad=True)
    opt = pytorch_optimizer.RACS([p], lr=1.0, beta=BETA, alpha=ALPHA, gamma=GAMMA, eps=EPS)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(p.detach() - before)
    return out


def our_racs_directions(grads, col_init, bias_correction):
    m, n = grads[0].shape
    row, col, phi = torch.zeros(1, m, dtype=F64), torch.full((1, n), col_init, dtype=F64), torch.zeros(1, dtype=F64)
    out = []
    for t, g in enumerate(grads, 1):
        bc = 1.0 - BETA**t if bias_correction else 1.0
        xd, row, col, phi = racs_direction(g[None], row, col, phi, bc, beta=BETA, alpha=ALPHA, gamma=GAMMA, eps=EPS)
        out.append(xd[0])
    return out


def random_grads(steps, seed, shrink=False):
    gen = torch.Generator().manual_seed(seed)
    grads = [0.3 * torch.randn(9, 7, generator=gen, dtype=F64) for _ in range(steps)]
    if shrink:  # a shrinking gradient makes ||G~|| grow: the norm-growth limiter engages
        grads = [g * 0.2**i for i, g in enumerate(grads)]
    return grads


@pytest.mark.parametrize("shrink", [False, True])
def test_racs_direction_matches_pytorch_optimizer_where_semantics_match(shrink):
    # their column scale starts at ones and neither scale is bias-corrected; with those two
    # settings our direction is theirs (up to their +eps in the limiter's denominator)
    grads = random_grads(4, seed=0, shrink=shrink)
    for ours, theirs in zip(our_racs_directions(grads, 1.0, False), their_racs_directions(grads)):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)


def test_racs_first_step_differs_from_pytorch_optimizer_as_documented():
    # ours (lracs): both scales start at 0 and are bias-corrected, so step 1 is scale-free,
    # G / sqrt(rowmean(G^2) + eps) / sqrt(colmean(G^2) + eps); theirs divides by
    # sqrt((1 - b) rowmean + eps) sqrt(b + (1 - b) colmean + eps)
    (g,) = random_grads(1, seed=1)
    ours = our_racs_directions([g], 0.0, True)[0]
    theirs = their_racs_directions([g])[0]
    row, col = g.square().mean(1, keepdim=True), g.square().mean(0, keepdim=True)
    predicted = torch.sqrt((row + EPS) / ((1 - BETA) * row + EPS)) * torch.sqrt((col + EPS) / (BETA + (1 - BETA) * col + EPS))
    torch.testing.assert_close(theirs / ours, predicted, rtol=1e-9, atol=0)
    assert float((theirs / ours - 1).abs().max()) > 0.1  # a real difference, not rounding; and ours scales as 1/|G|:
    torch.testing.assert_close(our_racs_directions([10 * g], 0.0, True)[0], 0.1 * ours, rtol=1e-6, atol=0)  # 1/|G|


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"apply_escape": True},
        {"clip_threshold": 0.0, "skip_threshold": 0.0, "weight_decay": 0.01},
    ],
)
def test_lora_rite_matches_pytorch_optimizer(options):
    # same semantics except one: their preconditioner is 1 / (sqrt(lambda + E + eps^2) + eps),
    # ours (and the authors' lora_rite.py) 1 / (sqrt(lambda + E) + eps): agreement to ~1e-8
    for _ in lora_rite_pair_runs(options, steps=4):
        pass


def test_lora_rite_update_capping_differs_from_pytorch_optimizer_as_documented():
    # the authors cap the step taken from the first moment and keep the moment itself uncapped;
    # pytorch-optimizer stores the capped moment. Step 1 agrees, the stored moments differ.
    cap = 0.02
    runs = lora_rite_pair_runs({"update_capping": cap}, steps=3, compare_after=1)
    opt, ref, ours, theirs = next(runs)
    a, b = ours[0]
    ours_m, theirs_m = opt.state[a]["m_a"], ref.state[theirs[0][0]]["m_l"]  # M_A^T (r x n), M_A (n x r)
    assert float(theirs_m.square().mean().sqrt()) <= cap * (1 + 1e-9)
    assert float(ours_m.square().mean().sqrt()) > 1.5 * cap
    for _ in runs:
        pass
    gap = max(float((x.detach() - y.detach()).abs().max()) for p, q in zip(ours, theirs) for x, y in zip(p, q))
    assert gap > 1e-6


def lora_rite_pair_runs(options, steps, compare_after=None):
    """Step ours and pytorch-optimizer's LoRARite in lock step; asserts agreement after every
    step up to ``compare_after`` (all steps when None) and yields (opt, ref, ours, theirs)."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(14, 11, 3), (8, 8, 2)]
    pairs = [(torch.randn(r, n, generator=gen, dtype=F64) / math.sqrt(n), 0.5 * torch.randn(m, r, generator=gen, dtype=F64))
             for m, n, r in shapes]  # fmt: skip
    ours = [tuple(t.clone().requires_grad_() for t in p) for p in pairs]
    theirs = [tuple(t.clone().requires_grad_() for t in p) for p in pairs]
    names = {"clip_threshold": "clip_unmagnified_grad", "skip_threshold": "update_skipping"}
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    opt = build_optimizer("lora_rite", [{"pairs": ours, "lr": hp["lr"]}], betas=hp["betas"], eps=hp["eps"], **options)
    ref = pytorch_optimizer.LoRARite([t for p in theirs for t in p], **hp, **{names.get(k, k): v for k, v in options.items()})
    for step in range(1, steps + 1):
        targets = [torch.randn(m, n, generator=gen, dtype=F64) for m, n, _ in shapes]
        for factors in (ours, theirs):
            for (a, b), target in zip(factors, targets):
                g = b.detach() @ a.detach() - target
                a.grad, b.grad = b.detach().T @ g, g @ a.detach().T
        opt.step()
        ref.step()
        if compare_after is None or step <= compare_after:
            for p, q in zip(ours, theirs):
                for x, y in zip(p, q):
                    torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-8, atol=1e-10)
        yield opt, ref, ours, theirs
