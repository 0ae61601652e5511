"""LoRA-RITE's fast paths (``mixofshow/optim/rite_math.py``, docs/optimizers.md "lora_rite"):
the bases from r x r Grams (direct / preconditioned / Householder), the unmagnified gradient
folded into the preconditioner, the first moment kept in a transported frame.

Each path is checked on its own for accuracy, and every combination of forced paths gives the
per-pair reference's trajectory.
"""

from __future__ import annotations

import pytest
import torch

import mixofshow.optim.rite_math as rite_math
from mixofshow.optim import build_optimizer
from mixofshow.optim.rite_math import lora_rite_reference, rite_bases

F64 = torch.float64


def well_conditioned(k, r, gen, dtype):
    return torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=F64))[0].mT.to(dtype)  # (r, k), cond 1


def check_qr(x, bases, tol):
    """Q^T = L^-1 Y has orthonormal rows and X^T = Q R, in float64 arithmetic."""
    q_t = (bases.linv.double() @ bases.y[0].double())
    r = torch.linalg.inv(bases.rinv.double())
    eye = torch.eye(x.shape[1], dtype=F64)
    assert (q_t @ q_t.mT - eye).abs().max() < tol
    assert ((q_t.mT @ r) - x.double().mT).norm() / x.double().norm() < tol
    assert torch.allclose(r.triu(), r)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-13)])
def test_direct_bases_for_well_conditioned_factors(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([well_conditioned(640, 8, gen, dtype) * 0.03 for _ in range(3)])
    bases = rite_bases([x], torch.eye(8, dtype=dtype).expand(3, 8, 8))
    assert bases.householder == 0 and torch.isfinite(bases.cond_sq).all()  # direct
    assert bases.y[0] is x  # Q^T = L^-1 X: no product of the k-long rows
    check_qr(x, bases, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-13)])
def test_preconditioned_bases_for_an_ill_conditioned_factor_that_moved_little(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -3, 8, dtype=F64)  # cond 1e3: the direct Gram would lose 1e6 eps
    prev = torch.stack([scales[:, None] * well_conditioned(640, 8, gen, F64) for _ in range(3)])
    x = (prev + 1e-6 * torch.randn(prev.shape, generator=gen, dtype=F64)).to(dtype)
    rinv_prev = torch.linalg.inv(torch.linalg.qr(prev.mT)[1]).to(dtype)
    bases = rite_bases([x], rinv_prev)
    assert bases.householder == 0 and not torch.isfinite(bases.cond_sq).any()  # preconditioned
    check_qr(x, bases, tol)


def test_householder_bases_at_the_first_step_and_after_a_jump():
    gen = torch.Generator().manual_seed(2)
    scales = torch.logspace(0, -3, 8)
    x = torch.stack([scales[:, None] * well_conditioned(640, 8, gen, torch.float32) for _ in range(2)])
    assert rite_bases([x], None).householder == 1
    jumped = torch.eye(8).expand(2, 8, 8)  # a preconditioner unrelated to x
    bases = rite_bases([x], jumped)
    assert bases.householder == 1
    check_qr(x, bases, 1e-5)


PATHS = {
    "fast": {},
    "no direct bases": {"DIRECT_CONDITION": 0.0},
    "householder only": {"DIRECT_CONDITION": 0.0, "PRECONDITIONED_TOLERANCE": -1.0},
    "no folding": {"FOLD_CONDITION": 0.0},
    "rebase every step": {"FRAME_TOLERANCE": -1.0},
}


@pytest.mark.parametrize("capping", [0.0, 0.02])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_follows_the_reference(monkeypatch, path, capping):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(rite_math, name, value)
    gen = torch.Generator().manual_seed(3)
    shapes = [(48, 40, 4), (48, 40, 4), (32, 32, 4)]  # two pairs in one batch, one square pair
    pairs = [(torch.randn(r, n, generator=gen, dtype=F64) / n**0.5, 0.1 * torch.randn(m, r, generator=gen, dtype=F64))
             for m, n, r in shapes]  # fmt: skip
    pairs[2] = (pairs[2][0], torch.zeros_like(pairs[2][1]))  # a zero B: Householder, then the fast ways
    targets = [torch.randn(m, n, generator=gen, dtype=F64) * 0.3 for m, n, _ in shapes]
    leaves = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in pairs]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    opt = build_optimizer("lora_rite", [{"pairs": leaves, "lr": hp["lr"]}], betas=hp["betas"], eps=hp["eps"],
                          clip_threshold=0.0, skip_threshold=0.0, update_capping=capping)  # fmt: skip
    states = [{} for _ in pairs]
    for _ in range(6):
        for i, ((a, b), (la, lb), d) in enumerate(zip(pairs, leaves, targets)):
            g = b @ a - d
            la.grad, lb.grad = b.T @ g, g @ a.T
            if capping:
                pairs[i] = capped_reference(a, b, b.T @ g, g @ a.T, states[i], capping=capping, **hp)
            else:
                pairs[i] = lora_rite_reference(a, b, b.T @ g, g @ a.T, states[i], skip=0.0, **hp)
        opt.step()
        for (a, b), (la, lb) in zip(pairs, leaves):
            torch.testing.assert_close(la.detach(), a, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(lb.detach(), b, rtol=1e-9, atol=1e-11)


def capped_reference(a, b, ga, gb, state, *, capping, lr, betas, eps, weight_decay):
    """lora_rite_reference's moments, with the step from ``M / max(1, RMS(M) / cap)``."""
    lora_rite_reference(a, b, ga, gb, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, skip=0.0)
    r_b, r_a = torch.linalg.qr(b)[1], torch.linalg.qr(a.T)[1]

    def cap(m):
        return m / max(1.0, (m.square().mean().sqrt() / capping).item())

    a_new = a - lr * (torch.linalg.pinv(r_b) @ cap(state["m_a"]).T + weight_decay * a)
    b_new = b - lr * (cap(state["m_b"]) @ torch.linalg.pinv(r_a).T + weight_decay * b)
    return a_new, b_new


def test_float32_trajectory_stays_close_to_float64():
    """30 steps on a low-rank regression problem: the fast paths in float32 agree with the same
    optimizer in float64 to the accuracy of float32 (2.0e-7 measured; bound 1e-5)."""
    results = {}
    for dtype in (torch.float32, F64):
        gen = torch.Generator().manual_seed(4)
        a = torch.randn(8, 320, generator=gen, dtype=F64) / 320**0.5
        u = torch.linalg.qr(torch.randn(256, 24, generator=gen, dtype=F64))[0]
        v = torch.linalg.qr(torch.randn(320, 24, generator=gen, dtype=F64))[0]
        target = ((u * 0.9 ** torch.arange(24, dtype=F64)) @ v.T).to(dtype)
        la, lb = a.to(dtype).requires_grad_(), torch.zeros(256, 8, dtype=dtype, requires_grad=True)
        opt = build_optimizer("lora_rite", [{"pairs": [(la, lb)], "lr": 1e-3}])
        for _ in range(30):
            g = lb.detach() @ la.detach() - target
            la.grad, lb.grad = lb.detach().T @ g, g @ la.detach().T
            opt.step()
        results[dtype] = (lb.detach() @ la.detach()).double()
    w32, w64 = results[torch.float32], results[F64]
    assert (w32 - w64).norm() / w64.norm() < 1e-5


def test_state_of_an_earlier_version_is_a_clear_error():
    a = torch.randn(2, 6, dtype=F64, requires_grad=True)
    b = torch.randn(5, 2, dtype=F64, requires_grad=True)
    opt = build_optimizer("lora_rite", [{"pairs": [(a, b)], "lr": 1e-2}])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    saved = opt.state_dict()
    for st in saved["state"].values():  # the layout before the Cholesky bases: q_a, q_b
        if "y_a" in st:
            st["q_a"], st["q_b"] = st.pop("y_a"), st.pop("y_b")
    with pytest.raises(RuntimeError, match="lacks y_a, y_b: it was saved by another version"):
        opt.load_state_dict(saved)
