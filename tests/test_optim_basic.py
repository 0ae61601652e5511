"""adamw, loraplus, scaled_gd / scaled_adamw, lora_rite and the param-group helpers.

Property tests run in float64: gauge (in)variance ``(B, A) -> (B R, R^-1 A)`` over several steps,
scaled GD's first-order W-space step, each optimizer's step against a plain per-pair
implementation written here, and the batched path against the modules' per-pair references.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixofshow.concepts.lora import LoRALinear, inject_lora, lora_layers
from mixofshow.optim import SPECS, build_optimizer
from mixofshow.optim.adamw import adamw_reference
from mixofshow.optim.batching import stack
from mixofshow.optim.full_grad import full_gradients_for
from mixofshow.optim.groups import lora_param_groups
from mixofshow.optim.lora_rite import lora_rite_reference, unmagnified_reference
from mixofshow.optim.scaled import precondition_reference

F64 = torch.float64
SHAPES = [(12, 10, 1), (8, 14, 2), (16, 16, 4), (20, 9, 8)]  # (m, n, r): m != n, r in {1, 2, 4, 8}
MIXED = [(12, 10, 2), (12, 10, 2), (16, 16, 4), (16, 16, 4), (16, 16, 4), (9, 14, 4), (20, 9, 8)]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pair(m, n, r, gen, dtype=F64):
    a = torch.randn(r, n, generator=gen, dtype=F64) / math.sqrt(n)
    b = 0.5 * torch.randn(m, r, generator=gen, dtype=F64)
    return a.to(dtype), b.to(dtype)


def randn_like(t, gen):
    return torch.randn(t.shape, generator=gen, dtype=t.dtype)


def leaf(t):
    return t.detach().clone().requires_grad_()


def set_pair_grads(a, b, g, scale):
    """Factor gradients for dL/dW = G: G_A = s B^T G, G_B = s G A^T."""
    a.grad = scale * b.detach().T @ g
    b.grad = scale * g @ a.detach().T


def random_invertible(r, gen):
    q1 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))[0]
    return q1 @ torch.diag(torch.exp(torch.rand(r, generator=gen, dtype=F64) * 2 - 1)) @ q2


def w_trajectory(name, a, b, target, steps, lr, scale=0.7, **hparams):
    """W = s B A after each step on 0.5 ||s B A - target||^2."""
    a, b = leaf(a), leaf(b)
    opt = build_optimizer(name, [{"pairs": [(a, b)], "lr": lr, "scale": scale}], **hparams)
    ws = []
    for _ in range(steps):
        set_pair_grads(a, b, scale * b.detach() @ a.detach() - target, scale)
        opt.step()
        ws.append(scale * b.detach() @ a.detach())
    return torch.stack(ws)


def gauge_gap(name, shape, seed, **hparams):
    """Relative gap between the W trajectories of (B, A) and (B R, R^-1 A)."""
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    a, b = random_pair(m, n, r, gen)
    target = torch.randn(m, n, generator=gen, dtype=F64)
    rot = random_invertible(r, gen)
    w1 = w_trajectory(name, a, b, target, 5, **hparams)
    w2 = w_trajectory(name, torch.linalg.solve(rot, a), b @ rot, target, 5, **hparams)
    return ((w1 - w2).abs().max() / w1.abs().max()).item()


# ----------------------------------------------------------------------------------- adamw, loraplus


def adamw_torch_copy(pairs, lr, ratio=None, **kwargs):
    copies = [(leaf(a), leaf(b)) for a, b in pairs]
    if ratio is None:
        groups = [{"params": [t for p in copies for t in p], "lr": lr}]
    else:
        groups = [{"params": [a for a, _ in copies], "lr": lr}, {"params": [b for _, b in copies], "lr": lr * ratio}]
    return copies, torch.optim.AdamW(groups, weight_decay=1e-2, **kwargs)


def step_together(runs, steps, seed):
    """Step several (pairs, optimizer) runs on identical random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [(torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)) for a, b in runs[0][0]]
        for pairs, opt in runs:
            for (a, b), (ga, gb) in zip(pairs, grads):
                a.grad, b.grad = ga.clone(), gb.clone()
            opt.step()


def float32_pairs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(leaf(t) for t in random_pair(m, n, r, gen, torch.float32)) for m, n, r in MIXED]


def test_adamw_equals_torch_adamw_exactly():
    pairs = float32_pairs()
    ours = build_optimizer("adamw", [{"pairs": pairs, "lr": 1e-2}])
    fused = adamw_torch_copy(pairs, 1e-2, fused=True)
    foreach_pairs = [(leaf(a), leaf(b)) for a, b in pairs]
    ours_foreach = build_optimizer("adamw", [{"pairs": foreach_pairs, "lr": 1e-2}], fused=False)
    torch_foreach = adamw_torch_copy(pairs, 1e-2, foreach=True)
    step_together([(pairs, ours), fused, (foreach_pairs, ours_foreach), torch_foreach], 5, seed=1)
    for p, q, u, v in zip(*(flat_pairs(x) for x in (pairs, fused[0], foreach_pairs, torch_foreach[0]))):
        assert torch.equal(p, q)  # same fused kernel
        assert torch.equal(u, v)  # same foreach code
        torch.testing.assert_close(p, u, rtol=1e-5, atol=1e-7)


def flat_pairs(pairs):
    return [t for p in pairs for t in p]


def test_adamw_matches_its_plain_reference_over_steps():
    gen = torch.Generator().manual_seed(4)
    pairs = [tuple(leaf(t) for t in random_pair(m, n, r, gen)) for m, n, r in MIXED[:3]]
    opt = build_optimizer("adamw", [{"pairs": pairs, "lr": 1e-2}], weight_decay=0.1)
    plain = [(t.detach().clone(), torch.zeros_like(t), torch.zeros_like(t)) for t in flat_pairs(pairs)]
    for step in range(1, 5):
        grads = [torch.randn(t.shape, generator=gen, dtype=F64) for t in flat_pairs(pairs)]
        for t, g in zip(flat_pairs(pairs), grads):
            t.grad = g
        opt.step()
        plain = [
            adamw_reference(p, g, m, v, step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
            for (p, m, v), g in zip(plain, grads)
        ]
        for t, (p, _, _) in zip(flat_pairs(pairs), plain):
            torch.testing.assert_close(t.detach(), p, rtol=1e-12, atol=1e-14)


def test_stack_reuses_consecutive_views_and_copies_otherwise():
    base = torch.randn(4, 3, 5)
    views = base.unbind(0)
    same = stack(views)
    assert same.data_ptr() == base.data_ptr() and torch.equal(same, base)
    assert torch.equal(stack(views[::-1]), base.flip(0))  # not consecutive: a copy
    transposed = torch.randn(4, 5, 3).mT  # non-contiguous slices: a copy
    assert torch.equal(stack(transposed.unbind(0)), transposed)
    col_major = torch.empty_strided((4, 5, 3), (15, 1, 5)).copy_(torch.randn(4, 5, 3))
    q = col_major.mT  # as LAPACK's Q.mT: a view whose slices are contiguous
    reused = stack(q.unbind(0))
    assert reused.data_ptr() == q.data_ptr() and torch.equal(reused, q)
    assert stack(views, torch.float64).dtype == torch.float64


def test_loraplus_ratio_one_equals_adamw_and_ratio_matches_torch_groups():
    base = float32_pairs(seed=2)
    runs = {}
    for name, kw in (("adamw", {}), ("loraplus", {"ratio": 1.0}), ("loraplus-16", {"ratio": 16.0})):
        pairs = [(leaf(a), leaf(b)) for a, b in base]
        runs[name] = (pairs, build_optimizer(name.split("-")[0], [{"pairs": pairs, "lr": 1e-3}], **kw))
    reference_16 = adamw_torch_copy(base, 1e-3, ratio=16.0, fused=True)
    step_together([*runs.values(), reference_16], 4, seed=3)
    for p, q in zip(flat_pairs(runs["adamw"][0]), flat_pairs(runs["loraplus"][0])):
        assert torch.equal(p, q)
    for p, q in zip(flat_pairs(runs["loraplus-16"][0]), flat_pairs(reference_16[0])):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------ gauge properties


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_gd_is_gauge_invariant(shape):
    assert gauge_gap("scaled_gd", shape, seed=5, lr=0.05, reg=1e-12) < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_adamw_is_not_gauge_invariant(shape):
    assert gauge_gap("scaled_adamw", shape, seed=5, lr=0.05, reg=1e-12, weight_decay=0.0) > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_lora_rite_is_gauge_invariant(shape):
    gap = gauge_gap("lora_rite", shape, seed=6, lr=0.05, weight_decay=0.0, clip_threshold=0.0, skip_threshold=0.0)
    assert gap < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_gd_first_order_step_is_the_tangent_projection(shape):
    m, n, r = shape
    gen = torch.Generator().manual_seed(7)
    a, b = (leaf(t) for t in random_pair(m, n, r, gen))
    g, scale, lr = torch.randn(m, n, generator=gen, dtype=F64), 0.7, 1e-7
    w0 = scale * b.detach() @ a.detach()
    set_pair_grads(a, b, g, scale)
    build_optimizer("scaled_gd", [{"pairs": [(a, b)], "lr": lr, "scale": scale}], reg=1e-12).step()
    dw = (scale * b.detach() @ a.detach() - w0) / lr
    bd, ad = b.detach(), a.detach()
    p_b = bd @ torch.linalg.pinv(bd)  # projector on col(B)
    p_a = torch.linalg.pinv(ad) @ ad  # projector on row(A)
    expected = -(p_b @ g + g @ p_a)
    assert ((dw - expected).norm() / expected.norm()).item() < 1e-5


# ----------------------------------------------------------------- one step against plain formulas


def plain_adamw(x, g, lr, betas, eps, wd):
    """First AdamW step from zero moments."""
    m = (1 - betas[0]) * g / (1 - betas[0])
    v = (1 - betas[1]) * g * g / (1 - betas[1])
    return x * (1 - lr * wd) - lr * m / (v.sqrt() + eps)


def plain_damped_solve(s, rhs, reg):
    r = s.shape[0]
    return torch.linalg.solve(s + reg * torch.trace(s) / r * torch.eye(r, dtype=s.dtype), rhs)


def plain_lora_rite(a, b, ga, gb, state, lr, betas, eps, wd, skip, clip):
    """LoRA-RITE per the paper, one pair, explicit inverses and eigendecompositions."""
    t = state["t"] = state.get("t", 0) + 1
    b1, b2 = (beta * (1 - beta ** (t - 1)) / (1 - beta**t) for beta in betas)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    una, unb = ga.T @ torch.linalg.inv(rb), gb @ torch.linalg.inv(ra)
    una, unb = (u if skip == 0 or u.square().mean().sqrt() <= skip else 0 * u for u in (una, unb))
    norm = torch.sqrt(una.square().sum() + unb.square().sum())
    una, unb = (u * min(1.0, clip / norm.item()) for u in (una, unb))
    new = {}
    for side, u, q, k in (("a", una, qb, a.shape[1]), ("b", unb, qa, b.shape[0])):
        tr = q.T @ state.get("q" + side, torch.zeros_like(q))
        v = b2 * tr @ state.get("v" + side, torch.zeros(q.shape[1], q.shape[1], dtype=F64)) @ tr.T
        v = v + (1 - b2) * u.T @ u / k
        lam, vec = torch.linalg.eigh(v)
        s_ = u @ vec @ torch.diag(1 / (lam.sqrt() + eps)) @ vec.T
        new["m" + side] = b1 * state.get("m" + side, torch.zeros_like(u)) @ tr.T + (1 - b1) * s_
        new["v" + side], new["q" + side] = v, q
    state.update(new)
    a_new = a - lr * (torch.linalg.inv(rb) @ new["ma"].T + wd * a)
    b_new = b - lr * (new["mb"] @ torch.linalg.inv(ra).T + wd * b)
    return a_new, b_new


def one_pair_problem(seed, m=14, n=11, r=3):
    gen = torch.Generator().manual_seed(seed)
    a, b = random_pair(m, n, r, gen)
    g = 0.05 * torch.randn(m, n, generator=gen, dtype=F64)
    return a, b, 0.8 * b.T @ g, 0.8 * g @ a.T  # scale s = 0.8


@pytest.mark.parametrize("name", ["adamw", "loraplus", "scaled_gd", "scaled_adamw"])
def test_one_step_matches_plain_formulas(name):
    a0, b0, ga, gb = one_pair_problem(seed=8)
    lr, betas, eps, wd, reg = 1e-2, (0.9, 0.999), 1e-8, 0.05, 1e-3
    hparams = {"weight_decay": wd}
    if name == "adamw" or name == "loraplus":
        lr_b = lr * (16.0 if name == "loraplus" else 1.0)
        expected = plain_adamw(a0, ga, lr, betas, eps, wd), plain_adamw(b0, gb, lr_b, betas, eps, wd)
    else:
        hparams["reg"] = reg
        sb, sa = 0.64 * b0.T @ b0, 0.64 * a0 @ a0.T
        pa, pb = plain_damped_solve(sb, ga, reg), plain_damped_solve(sa, gb.T, reg).T
        if name == "scaled_gd":
            expected = a0 * (1 - lr * wd) - lr * pa, b0 * (1 - lr * wd) - lr * pb
        else:
            expected = plain_adamw(a0, pa, lr, betas, eps, wd), plain_adamw(b0, pb, lr, betas, eps, wd)
    a, b = leaf(a0), leaf(b0)
    a.grad, b.grad = ga.clone(), gb.clone()
    build_optimizer(name, [{"pairs": [(a, b)], "lr": lr, "scale": 0.8}], **hparams).step()
    torch.testing.assert_close(a.detach(), expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach(), expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("skip", [0.0, 1.0])
def test_lora_rite_steps_match_plain_formulas(skip):
    a0, b0, ga, gb = one_pair_problem(seed=9)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, wd=0.01, skip=skip, clip=0.05)
    a, b = leaf(a0), leaf(b0)
    opt = build_optimizer(
        "lora_rite", [{"pairs": [(a, b)], "lr": hp["lr"]}], betas=hp["betas"], eps=hp["eps"],
        weight_decay=hp["wd"], clip_threshold=hp["clip"], skip_threshold=skip,
    )  # fmt: skip
    state, a_ref, b_ref = {}, a0, b0
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):  # steps 2, 3 exercise the basis transport and the bias correction
        g = 0.05 * torch.randn(b0.shape[0], a0.shape[1], generator=gen, dtype=F64)
        set_pair_grads(a, b, g, 0.8)
        opt.step()
        a_ref, b_ref = plain_lora_rite(a_ref, b_ref, 0.8 * b_ref.T @ g, 0.8 * g @ a_ref.T, state, **hp)
        torch.testing.assert_close(a.detach(), a_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(b.detach(), b_ref, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------- batched == per-pair loop


def mixed_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = [random_pair(m, n, r, gen) for m, n, r in MIXED]
    return [pairs[:3], pairs[3:]]  # two groups


def test_scaled_batched_equals_per_pair_loop():
    groups, lrs, scales, reg = mixed_groups(seed=11), (1e-2, 3e-2), (0.5, 1.0), 1e-4
    gen = torch.Generator().manual_seed(12)
    grads = [[(randn_like(a, gen), randn_like(b, gen)) for a, b in pairs] for pairs in groups]
    leaves = [[(leaf(a), leaf(b)) for a, b in pairs] for pairs in groups]
    for pairs, grad in zip(leaves, grads):
        for (a, b), (ga, gb) in zip(pairs, grad):
            a.grad, b.grad = ga, gb
    opt_groups = [{"pairs": p, "lr": lr, "scale": s} for p, lr, s in zip(leaves, lrs, scales)]
    build_optimizer("scaled_gd", opt_groups, reg=reg).step()
    for pairs, grad, out, lr, s in zip(groups, grads, leaves, lrs, scales):
        for (a, b), (ga, gb), (a_new, b_new) in zip(pairs, grad, out):
            pa, pb = precondition_reference(a, b, ga, gb, s, reg)
            torch.testing.assert_close(a_new.detach(), a - lr * pa, rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(b_new.detach(), b - lr * pb, rtol=1e-11, atol=1e-13)


def test_lora_rite_batched_equals_per_pair_loop():
    groups, lrs = mixed_groups(seed=13), (1e-2, 2e-2)
    hp = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    leaves = [[(leaf(a), leaf(b)) for a, b in pairs] for pairs in groups]
    opt = build_optimizer(
        "lora_rite", [{"pairs": p, "lr": lr} for p, lr in zip(leaves, lrs)], clip_threshold=0.5, skip_threshold=1.0, **hp
    )
    states = [[{} for _ in pairs] for pairs in groups]
    gen = torch.Generator().manual_seed(14)
    for step in range(3):
        gs = [[0.05 * torch.randn(b.shape[0], a.shape[1], generator=gen, dtype=F64) for a, b in p] for p in groups]
        gs[0][0] = gs[0][0] * (1e4 if step == 1 else 1.0)  # a pair whose unmagnified gradient is skipped
        full = [[(b.T @ g, g @ a.T) for (a, b), g in zip(p, gp)] for p, gp in zip(groups, gs)]
        unmag = [unmagnified_reference(a, b, ga, gb, 1.0) for p, f in zip(groups, full) for (a, b), (ga, gb) in zip(p, f)]
        scale = min(1.0, 0.5 / math.sqrt(sum(u.square().sum().item() for pair in unmag for u in pair)))
        for pairs, lv, f, st, lr in zip(groups, leaves, full, states, lrs):
            for i, ((a, b), (la, lb), (ga, gb)) in enumerate(zip(pairs, lv, f)):
                la.grad, lb.grad = ga.clone(), gb.clone()
                pairs[i] = lora_rite_reference(a, b, ga, gb, st[i], lr=lr, skip=1.0, grad_scale=scale, **hp)
        opt.step()
        for pairs, lv in zip(groups, leaves):
            for (a, b), (la, lb) in zip(pairs, lv):
                torch.testing.assert_close(la.detach(), a, rtol=1e-9, atol=1e-11)
                torch.testing.assert_close(lb.detach(), b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------- groups


class Tiny(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.q_proj, self.k_proj, self.head = nn.Linear(width, width), nn.Linear(width, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.k_proj(torch.tanh(self.q_proj(x)))))


def tiny_components(factorization="ab", seed=0):
    torch.manual_seed(seed)
    te, unet = Tiny(), Tiny()
    inject_lora(te, ["q_proj", "k_proj"], rank=2, scale=1.0, factorization=factorization)
    inject_lora(unet, ["q_proj"], rank=2, scale=0.5, factorization=factorization)
    return {"text_encoder": te, "unet": unet}


def test_lora_param_groups_by_module_type():
    comps = tiny_components()
    comps["unet"].lora_fake = nn.Linear(3, 3)  # a LoRA-looking name that is no LoRALinear
    groups = lora_param_groups(comps, {"text_encoder": 1e-5, "unet": 1e-4}, weight_decay=0.0)
    assert [(g["name"], g["lr"], g["scale"], len(g["pairs"])) for g in groups] == [
        ("text_encoder", 1e-5, 1.0, 2),
        ("unet", 1e-4, 0.5, 1),
    ]
    assert groups[0]["weight_decay"] == 0.0
    layer = comps["unet"].q_proj
    assert isinstance(layer, LoRALinear) and groups[1]["pairs"] == [(layer.lora_down, layer.lora_up)]
    triples = lora_param_groups(tiny_components("usv"), {"text_encoder": 1.0, "unet": 1.0})
    assert all(len(t) == 3 for g in triples for t in g["triples"])
    with pytest.raises(ValueError, match="unet"):
        lora_param_groups(comps, {"text_encoder": 1e-5})
    assert lora_param_groups({"vae": Tiny()}, {"vae": 1.0}) == []  # LoRA off: no group
    comps["unet"].q_proj.requires_grad_(False)
    assert [g["name"] for g in lora_param_groups(comps, {"text_encoder": 1.0, "unet": 1.0})] == ["text_encoder"]
    with pytest.raises(ValueError, match="usv"):
        lora_param_groups(comps, {"text_encoder": 1.0, "unet": 1.0}, factorization="usv")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_groups_work_with_every_registered_optimizer(name):
    spec = SPECS[name]
    comps = tiny_components(spec.factorization, seed=1)
    groups = lora_param_groups(comps, {"text_encoder": 1e-2, "unet": 1e-2}, factorization=spec.factorization)
    full = full_gradients_for(comps, spec.cls)  # only optimizers that read G pay for the hook
    assert (full is None) == (not spec.needs_full_grad)
    assert all((layer.full_grad_sink is full) for m in comps.values() for _, layer in lora_layers(m))
    opt = build_optimizer(name, groups, full_grads=full)
    params = [t for g in opt.param_groups for t in g["params"]]
    before = [t.detach().clone() for t in params]
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(5, 6)
        sum(m(x).square().mean() for m in comps.values()).backward()
        opt.step()
    assert all(torch.isfinite(t).all() for t in params)
    assert any(not torch.equal(t, t0) for t, t0 in zip(params, before))
