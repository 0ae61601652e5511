"""The authors' options: StelLA (SonyResearch/stella) and LoRA-RITE's ``update_capping`` and
``apply_escape`` (gkevinyen5418/LoRA-RITE ``lora_rite.py``), each against a plain per-matrix
float64 reference written here from the published rule (docs/optimizers.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mixofshow.optim import build_optimizer

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(x, y, tol):
    scale = max(float(y.abs().max()), 1.0)
    assert float((x - y).abs().max()) <= tol * scale, float((x - y).abs().max())


# ----------------------------------------------------------------------------- StelLA


def stiefel_triple(m, n, r, seed):
    g = gen(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
    s = torch.randn(r, r, generator=g, dtype=F64)
    target = torch.randn(m, n, generator=g, dtype=F64)
    return (u, s, v), target


def triple_grads(u, s, v, target):
    g = u @ s @ v.T - target  # dL/dW of 1/2 ||U S V^T - T||^2
    return g @ v @ s.T, u.T @ g @ v, g.T @ u @ s


def authors_step(x, g, lr, eps, metric, c, retraction):
    """One first step for one Stiefel matrix, as stiefel.py / model.py do it (SVD polar, expm)."""
    rg = g - x @ (g.T @ x) if metric == "canonical" else g - x @ (0.5 * (x.T @ g + g.T @ x))
    d = -lr * rg / (rg.abs() + eps)  # Adam's first step from zero moments: m^ = g, v^ = g^2
    rows = x.shape[0]
    if c is not None and rows != c:
        d = d / math.sqrt(rows / c)
    d = d - x @ (0.5 * (x.T @ d + d.T @ x))
    if retraction == "polar":
        w, _, zt = torch.linalg.svd(x + d, full_matrices=False)
        return w @ zt
    a = x.T @ d
    q, rr = torch.linalg.qr(d - x @ a)
    r = x.shape[1]
    block = torch.zeros(2 * r, 2 * r, dtype=F64)
    block[:r, :r], block[:r, r:], block[r:, :r] = a, -rr.T, rr
    return torch.cat([x, q], 1) @ torch.linalg.matrix_exp(block)[:, :r]


@pytest.mark.parametrize(
    "options,c",
    [
        ({}, 768),  # the authors' defaults: canonical metric, scaling by the hidden size, polar
        ({"grad_scaling": 12.0, "retraction": "exp_map"}, 12.0),
        ({"metric": "euclidean", "grad_scaling": False}, None),
        ({"grad_scaling": 9.0}, 9.0),  # rows == c for U: no scaling there
    ],
)
def test_stella_one_step_matches_the_authors_rule(options, c):
    (u, s, v), target = stiefel_triple(9, 14, 3, seed=1)
    leaves = [t.clone().requires_grad_() for t in (u, s, v)]
    for t, g in zip(leaves, triple_grads(u, s, v, target)):
        t.grad = g
    lr, eps = 0.05, 1e-8
    opt = build_optimizer("stella", [{"triples": [tuple(leaves)], "lr": lr}], weight_decay=0.0, **options)
    opt.step()
    gu, gs, gv = triple_grads(u, s, v, target)
    metric, retraction = options.get("metric", "canonical"), options.get("retraction", "polar")
    close(leaves[0].detach(), authors_step(u, gu, lr, eps, metric, c, retraction), 1e-10)
    close(leaves[2].detach(), authors_step(v, gv, lr, eps, metric, c, retraction), 1e-10)
    close(leaves[1].detach(), s - lr * gs / (gs.abs() + eps), 1e-10)
    for x in (leaves[0], leaves[2]):
        close(x.detach().T @ x.detach(), torch.eye(3, dtype=F64), 1e-12)


def test_stella_options_change_the_step_and_hidden_size_comes_from_the_group():
    (u, s, v), target = stiefel_triple(20, 16, 4, seed=2)

    def one_step(group_extra=None, **options):
        leaves = [t.clone().requires_grad_() for t in (u, s, v)]
        for t, g in zip(leaves, triple_grads(u, s, v, target)):
            t.grad = g
        group = {"triples": [tuple(leaves)], "lr": 0.05, **(group_extra or {})}
        build_optimizer("stella", [group], **options).step()
        return leaves[0].detach()

    canonical, euclidean = one_step(grad_scaling=False), one_step(grad_scaling=False, metric="euclidean")
    assert float((canonical - euclidean).abs().max()) > 1e-3
    torch.testing.assert_close(one_step({"hidden_size": 8}), one_step(grad_scaling=8), rtol=0, atol=0)
    assert float((one_step() - one_step(grad_scaling=False)).abs().max()) > 1e-3  # 20 rows vs c = 768


def test_stella_group_builder_passes_the_text_encoder_hidden_size(embedded_pipeline_factory):
    from mixofshow.concepts.lora import inject_lora
    from mixofshow.optim.groups import lora_param_groups

    pipe = embedded_pipeline_factory()
    name = next(n for n, mod in pipe.text_encoder.named_modules() if n.endswith("q_proj"))
    inject_lora(pipe.text_encoder, [name], rank=2, scale=1.0, factorization="usv")
    groups = lora_param_groups({"text_encoder": pipe.text_encoder}, {"text_encoder": 1e-3})
    assert groups and all(g["hidden_size"] == pipe.text_encoder.config.hidden_size for g in groups)


@pytest.mark.parametrize("bad", [{"metric": "riemann"}, {"retraction": "qr"}, {"grad_scaling": -1.0}])
def test_stella_rejects_unknown_options(bad):
    (u, s, v), _ = stiefel_triple(6, 5, 2, seed=3)
    with pytest.raises(ValueError, match=f"Invalid {next(iter(bad))}"):
        build_optimizer("stella", [{"triples": [(u, s, v)]}], **bad)


# ----------------------------------------------------------------------------- LoRA-RITE


def rms(x):
    return x.square().mean().sqrt()


def authors_rite(a, b, ga, gb, st, *, lr, betas, eps, capping, escape):
    """LoRA-RITE for one pair in lora_rite.py's layout (param_l = A^T, param_r = B), clipping and
    skipping off, explicit eigendecompositions; ``st`` carries the state between steps."""
    t = st["t"] = st.get("t", 0) + 1
    b1, b2 = (beta * (1 - beta ** (t - 1)) / (1 - beta**t) for beta in betas)
    r = a.shape[0]
    bases = {"l": torch.linalg.qr(a.T), "r": torch.linalg.qr(b)}
    grads = {"l": ga.T @ torch.linalg.pinv(bases["r"][1]), "r": gb @ torch.linalg.pinv(bases["l"][1])}
    steps = {}
    for side, other in (("l", "r"), ("r", "l")):
        u = grads[side]
        p = bases[other][0].T @ st.get("basis_" + other, torch.zeros_like(bases[other][0]))
        v_old = st.get("v_" + side, torch.zeros(r, r, dtype=F64))
        v_moved = p @ v_old @ p.T
        v_moved = (v_moved + v_moved.T) / 2
        e = 0.0
        if escape:
            gap = (torch.linalg.eigvalsh(v_old) - torch.linalg.eigvalsh(v_moved)).max().clamp_min(0)
            lost = (torch.trace(v_old) - torch.trace(v_moved)).clamp_min(0)
            e = st["e_" + side] = b2 * (torch.minimum(gap, lost) + st.get("e_" + side, 0.0))
            st.setdefault("escapes", []).append(float(e))
        v = b2 * v_moved + (1 - b2) * u.T @ u / u.shape[0]
        lam, vec = torch.linalg.eigh(v)
        precond = vec @ torch.diag(1 / ((lam.clamp_min(0) + e).sqrt() + eps)) @ vec.T
        m = b1 * st.get("m_" + side, torch.zeros_like(u)) @ p.T + (1 - b1) * u @ precond
        st["v_" + side], st["m_" + side] = v, m
        if capping > 0:
            m = m / torch.clamp(rms(m) / capping, min=1.0)
        steps[side] = m @ torch.linalg.pinv(bases[other][1]).T
    st["basis_l"], st["basis_r"] = bases["l"][0], bases["r"][0]
    return a - lr * steps["l"].T, b - lr * steps["r"]


@pytest.mark.parametrize("capping,escape", [(0.02, False), (0.0, True), (0.02, True)])
def test_lora_rite_options_match_the_reference_rule(capping, escape):
    g = gen(4)
    m, n, r = 14, 11, 3
    a0 = torch.randn(r, n, generator=g, dtype=F64) / math.sqrt(n)
    b0 = 0.5 * torch.randn(m, r, generator=g, dtype=F64)
    targets = [torch.randn(m, n, generator=g, dtype=F64) for _ in range(4)]
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6)

    def run(update_capping, apply_escape):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = build_optimizer(
            "lora_rite", [{"pairs": [(a, b)], "lr": hp["lr"]}], betas=hp["betas"], eps=hp["eps"],
            clip_threshold=0.0, skip_threshold=0.0, update_capping=update_capping, apply_escape=apply_escape,
        )  # fmt: skip
        out = []
        for target in targets:  # the target moves, so the bases rotate and the transport loses mass
            grad = b.detach() @ a.detach() - target
            a.grad, b.grad = b.detach().T @ grad, grad @ a.detach().T
            opt.step()
            out.append((a.detach().clone(), b.detach().clone()))
        return out

    ours, st, a_ref, b_ref = run(capping, escape), {}, a0, b0
    for (a, b), target in zip(ours, targets):
        grad = b_ref @ a_ref - target
        a_ref, b_ref = authors_rite(
            a_ref, b_ref, b_ref.T @ grad, grad @ a_ref.T, st, capping=capping, escape=escape, **hp
        )
        close(a, a_ref, 1e-9)
        close(b, b_ref, 1e-9)
    plain = run(0.0, False)
    assert float((plain[-1][0] - ours[-1][0]).abs().max()) > 1e-6  # the option is engaged
    if escape:
        assert max(st["escapes"]) > 0.0
