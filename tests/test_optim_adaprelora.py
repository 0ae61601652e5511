"""AdaPreLoRA (docs/optimizers.md): the closed-form factor directions are the H-orthogonal
projection, equivariant, and the first step uses Adafactor's statistics and the LoRA scale."""

from __future__ import annotations

import pytest
import torch

from mixofshow.optim import build_optimizer
from mixofshow.optim.adaprelora import adaprelora_direction, adaprelora_direction_reference
from test_optim_geometric import F64, close, gen, make_pairs, random_rotation, set_grads


def adapre_problem(m, n, r, seed):
    g = gen(seed)
    b, a = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64)
    grad = torch.randn(m, n, generator=g, dtype=F64)
    p, q = torch.randn(m, generator=g, dtype=F64).exp(), torch.randn(n, generator=g, dtype=F64).exp()
    return b, a, grad, p, q


def adapre(b, a, grad, p, q):
    da, db = adaprelora_direction(b[None], a[None], (b.T @ grad)[None], (grad @ a.T)[None], p[None], q[None])
    return da[0], db[0]


@pytest.mark.parametrize("m,n,r", [(9, 6, 3), (6, 11, 1), (16, 10, 8), (12, 12, 4)])
def test_adaprelora_is_the_h_orthogonal_projection(m, n, r):
    b, a, grad, p, q = adapre_problem(m, n, r, seed=6)
    da, db = adapre(b, a, grad, p, q)
    e = grad / p[:, None] / q[None, :] - (b @ da + db @ a)
    big_p, big_q = torch.diag(p), torch.diag(q)
    scale = float((big_p @ grad).abs().max())
    assert float((b.T @ big_p @ e @ big_q).abs().max()) <= 1e-9 * scale * float(b.abs().max())
    assert float((big_p @ e @ big_q @ a.T).abs().max()) <= 1e-9 * scale * float(a.abs().max())
    rd, rb = adaprelora_direction_reference(b, a, grad, p, q)
    close(da, rd)
    close(db, rb)


def test_adaprelora_equivariance_and_identity_preconditioner():
    b, a, grad, p, q = adapre_problem(10, 7, 3, seed=7)
    rot = random_rotation(3, 8)
    da, db = adapre(b, a, grad, p, q)
    da2, db2 = adapre(b @ rot, torch.linalg.solve(rot, a), grad, p, q)
    close(da2, torch.linalg.solve(rot, da), 1e-8)
    close(db2, db @ rot, 1e-8)
    ones_m, ones_n = torch.ones(10, dtype=F64), torch.ones(7, dtype=F64)
    da, db = adapre(b, a, grad, ones_m, ones_n)
    p_b = b @ torch.linalg.solve(b.T @ b, b.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    close(b @ da + db @ a, p_b @ grad + grad @ p_a - p_b @ grad @ p_a)


def test_adaprelora_first_step_uses_adafactor_statistics_and_scale():
    pairs, targets = make_pairs([(8, 6, 2)], seed=9)
    (a, b), t = pairs[0], targets[0]
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = build_optimizer("adaprelora", [{"pairs": pairs, "lr": 0.1, "scale": 2.0}], beta1=0.0, damping=0.0)
    set_grads(pairs, targets, 2.0, opt)
    opt.step()
    grad = 2.0 * b0 @ a0 - t
    g2 = grad**2 + 1e-30
    p = g2.sum(1).sqrt()
    q = g2.sum(0).sqrt() / g2.sum().sqrt()
    da, db = adaprelora_direction_reference(b0, a0, grad, p, q)
    # W = s B A moves by lr * (projection) to first order: factors move by lr * d / s
    close(a.detach(), a0 - 0.1 * da / 2.0, 1e-9)
    close(b.detach(), b0 - 0.1 * db / 2.0, 1e-9)


