"""The LoRA-S horizontal lift (``mixofshow/optim/lift.py``): the facts of docs/optimizers.md (LoRA-S).

Float64 throughout for the identities; damping 0 (only the tiny absolute floor) where they must be
exact, since the relative damping ``damping * tr(S) / r`` is not gauge-invariant.
"""

from __future__ import annotations

import pytest
import torch

from mixofshow.optim.lift import horizontal_lift, horizontal_lift_reference, lift_products

SHAPES = [(6, 5, 1), (7, 5, 2), (9, 12, 4), (16, 10, 8), (12, 12, 4)]  # (m, n, r)
F64 = torch.float64


def problem(m, n, r, seed=0, k=None, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)
    b = torch.randn(*lead, m, r, generator=g, dtype=dtype)
    a = torch.randn(*lead, r, n, generator=g, dtype=dtype)
    xd = torch.randn(*lead, m, n, generator=g, dtype=dtype)
    return b, a, xd


def lift(b, a, xd, damping=0.0, return_k=False):
    return horizontal_lift(b, a, *lift_products(b, a, xd), damping=damping, return_k=return_k)


def close(x, y, tol=1e-9):
    scale = max(float(y.abs().max()), 1.0)
    assert float((x - y).abs().max()) <= tol * scale, float((x - y).abs().max())


def projectors(b, a):
    p_b = b @ torch.linalg.solve(b.T @ b, b.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    return p_b, p_a


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_lift_is_the_tangent_projection(m, n, r):
    b, a, xd = problem(m, n, r)
    bd, ad = lift(b, a, xd)
    p_b, p_a = projectors(b, a)
    close(bd @ a + b @ ad, p_b @ xd + xd @ p_a - p_b @ xd @ p_a)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_sylvester_residual(m, n, r):
    b, a, xd = problem(m, n, r, seed=1)
    _, _, k = lift(b, a, xd, return_k=True)
    mm = (b.T @ b) @ (a @ a.T)
    close(mm @ k + k @ mm, b.T @ xd @ a.T)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_gauge_equivariance(m, n, r):
    b, a, xd = problem(m, n, r, seed=2)
    g = torch.Generator().manual_seed(3)
    rot = torch.eye(r, dtype=F64) + 0.5 * torch.randn(r, r, generator=g, dtype=F64)
    bd, ad = lift(b, a, xd)
    bd2, ad2 = lift(b @ rot, torch.linalg.solve(rot, a), xd)
    close(bd2, bd @ rot, 1e-8)
    close(ad2, torch.linalg.solve(rot, ad), 1e-8)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_lift_is_horizontal(m, n, r):
    b, a, xd = problem(m, n, r, seed=4)
    bd, ad = lift(b, a, xd)
    s_b, s_a = b.T @ b, a @ a.T
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        z = torch.randn(r, r, generator=g, dtype=F64)
        vb, va = b @ z, -z @ a
        inner = torch.trace(torch.linalg.solve(s_b, bd.T @ vb))
        inner = inner + torch.trace(torch.linalg.solve(s_a, ad @ va.T))
        scale = torch.trace(torch.linalg.solve(s_b, bd.T @ bd)).sqrt() * torch.trace(
            torch.linalg.solve(s_b, vb.T @ vb)
        ).sqrt()
        assert abs(float(inner)) <= 1e-9 * float(scale)


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_weight_decay_direction_gives_k_minus_half_lambda(m, n, r, lam):
    b, a, _ = problem(m, n, r, seed=6)
    bd, ad, k = lift(b, a, -lam * b @ a, return_k=True)
    close(k, -lam / 2 * torch.eye(r, dtype=F64))
    close(bd, -lam / 2 * b)
    close(ad, -lam / 2 * a)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_batched_matches_per_pair_reference(damping):
    for m, n, r in SHAPES:
        b, a, xd = problem(m, n, r, seed=7, k=3)
        bd, ad, k = lift(b, a, xd, damping=damping, return_k=True)
        for i in range(3):
            rb, ra, rk = horizontal_lift_reference(b[i], a[i], xd[i], damping)
            close(bd[i], rb, 1e-8)
            close(ad[i], ra, 1e-8)
            close(k[i], rk, 1e-8)


def test_single_pair_and_products():
    b, a, xd = problem(8, 5, 3, seed=8)
    xa, bx = lift_products(b, a, xd)
    close(xa, xd @ a.T)
    close(bx, b.T @ xd)
    bd, ad = horizontal_lift(b, a, xa, bx)
    assert bd.shape == (8, 3) and ad.shape == (3, 5)
    rb, ra, _ = horizontal_lift_reference(b, a, xd)
    close(bd, rb)
    close(ad, ra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_zero_init_b_is_finite_and_moves_b_only(m, n, r, dtype):
    _, a, xd = problem(m, n, r, seed=9, k=2, dtype=dtype)
    b = torch.zeros(2, m, r, dtype=dtype)
    bd, ad = lift(b, a, xd, damping=1e-6)
    assert torch.isfinite(bd).all() and torch.isfinite(ad).all()
    assert float(ad.abs().max()) == 0.0
    # with B = 0 the lift is Bd = Xd A^T S_A^-1 (the damped S_A of the same damping)
    ref = horizontal_lift_reference(b[0].double(), a[0].double(), xd[0].double(), 1e-6)[0]
    close(bd[0].double(), ref, 1e-9 if dtype == F64 else 1e-4)


def test_all_zero_factors_are_finite():
    b, a = torch.zeros(2, 6, 2), torch.zeros(2, 2, 5)
    xd = torch.randn(2, 6, 5)
    for t in lift(b, a, xd, damping=1e-6, return_k=True):
        assert torch.isfinite(t).all()


def test_tiny_b_in_float32_matches_float64():
    # B a millionth of A: the Grams differ by 1e12 and must not underflow inside eigh
    b, a, xd = problem(20, 9, 8, seed=10)
    b = b * 1e-6
    ref = lift(b, a, xd, damping=1e-6)
    got = lift(b.float(), a.float(), xd.float(), damping=1e-6)
    for x, y in zip(got, ref):
        close(x.double(), y, 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    b, a, xd = problem(9, 7, 4, seed=11, k=2)
    bd, ad = lift(b.to(dtype), a.to(dtype), xd.to(dtype), damping=1e-6)
    assert bd.dtype == torch.float32 and ad.dtype == torch.float32
    ref = lift(b.to(dtype).double(), a.to(dtype).double(), xd.to(dtype).double(), damping=1e-6)
    close(bd.double(), ref[0], 1e-3)
    close(ad.double(), ref[1], 1e-3)
