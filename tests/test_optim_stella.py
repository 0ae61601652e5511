"""StelLA (docs/optimizers.md): U, V stay orthonormal, the polar factor and tangent projection,
and the optimizer against its module reference over several steps (zero S included)."""

from __future__ import annotations

import pytest
import torch

from mixofshow.optim import build_optimizer
from mixofshow.optim.stella import polar, stella_reference, stiefel_project
from test_optim_geometric import F64, MIXED, close, gen, make_triples, set_triple_grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_stella_keeps_u_and_v_orthonormal(dtype, tol):
    triples, targets = make_triples([*MIXED, (24, 20, 8), (24, 20, 8)], seed=10, dtype=dtype)
    opt = build_optimizer("stella", [{"triples": triples, "lr": 0.05}])
    for _ in range(10):
        set_triple_grads(triples, targets)
        opt.step()
        for u, _, v in triples:
            for x in (u, v):
                eye = torch.eye(x.shape[1], dtype=dtype)
                assert float((x.detach().T @ x.detach() - eye).abs().max()) <= tol


def test_polar_and_tangent_projection():
    g = gen(11)
    x = torch.linalg.qr(torch.randn(4, 9, 3, generator=g, dtype=F64))[0]
    close(polar(x), x, 1e-12)
    y = torch.randn(4, 9, 3, generator=g, dtype=F64)
    py = polar(y)
    close(py.transpose(-1, -2) @ py, torch.eye(3, dtype=F64).expand(4, 3, 3), 1e-12)
    e, v = torch.linalg.eigh(y.transpose(-1, -2) @ y)
    close(py, y @ (v * e.rsqrt()[..., None, :]) @ v.transpose(-1, -2), 1e-10)
    d = stiefel_project(x, y)
    xtd = x.transpose(-1, -2) @ d
    close(xtd + xtd.transpose(-1, -2), torch.zeros(4, 3, 3, dtype=F64), 1e-12)


@pytest.mark.parametrize("shape", [(9, 7, 3), (20, 14, 8)])  # r-major and own-layout storage (rows_layout)
def test_stella_matches_reference_and_zero_s_is_safe(shape):
    triples, targets = make_triples([shape], seed=12, zero_s=True)
    u0 = triples[0][0].detach().clone()
    ref, st = [x.detach().clone() for x in triples[0]], {}
    opt = build_optimizer("stella", [{"triples": triples, "lr": 0.05}], weight_decay=0.1)
    for i in range(3):
        set_triple_grads(triples, targets)
        opt.step()
        ref = list(stella_reference(*ref, *(x.grad for x in triples[0]), st, lr=0.05, beta1=0.9,
                                    beta2=0.999, eps=1e-8, weight_decay=0.1, scaling_c=768))
        for x, y in zip(triples[0], ref):
            assert torch.isfinite(x).all()
            close(x.detach(), y, 1e-9)
        if i == 0:  # S = 0 gives zero U, V gradients: only S moves
            close(triples[0][0].detach(), u0, 1e-12)


