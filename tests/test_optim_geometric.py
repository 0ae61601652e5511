"""Geometric LoRA optimizers: adams, adams-full, lracs (LoRA-S), adaprelora, stella.

Properties from docs/optimizers.md (LoRA-S, AdaPreLoRA, StelLA), in float64 on small quadratic problems
``L = 1/2 ||s B A - T||^2`` (so ``G = s B A - T``, ``G_A = s B^T G``, ``G_B = s G A^T``).
"""

from __future__ import annotations

import pytest
import torch

from mixofshow.optim import build_optimizer, get_spec
from mixofshow.optim.full_grad import full_gradients_for
from mixofshow.optim.adams import adams_reference
from mixofshow.optim.lracs import lracs_reference

F64 = torch.float64
PAIR_OPTS = ["adams", "adams-full", "lracs", "adaprelora"]
MIXED = [(8, 6, 2), (8, 6, 2), (5, 7, 3), (8, 6, 2), (6, 6, 1), (10, 4, 4)]  # (m, n, r)


# ----------------------------------------------------------------------------- helpers


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_pairs(shapes, seed=0, dtype=F64, zero_b=False):
    g = gen(seed)
    pairs, targets = [], []
    for m, n, r in shapes:
        a = torch.randn(r, n, generator=g, dtype=F64) / n**0.5
        b = torch.zeros(m, r, dtype=F64) if zero_b else torch.randn(m, r, generator=g, dtype=F64)
        pairs.append((a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()))
        targets.append(torch.randn(m, n, generator=g, dtype=F64))
    return pairs, targets


def set_grads(pairs, targets, scale=1.0, opt=None):
    with torch.no_grad():
        for (a, b), t in zip(pairs, targets):
            a64, b64 = a.double(), b.double()
            g = scale * b64 @ a64 - t
            a.grad = (scale * b64.T @ g).to(a.dtype)
            b.grad = (scale * g @ a64.T).to(b.dtype)
            if opt is not None and opt.full_grads is not None:  # the full gradient G = dL/dW
                opt.full_grads.set_(a, g.float() if a.dtype != F64 else g)


def make_triples(shapes, seed=0, dtype=F64, zero_s=False):
    g = gen(seed)
    triples, targets = [], []
    for m, n, r in shapes:
        u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
        s = torch.zeros(r, r, dtype=F64) if zero_s else torch.randn(r, r, generator=g, dtype=F64)
        triples.append(tuple(x.to(dtype).requires_grad_() for x in (u, s, v)))
        targets.append(torch.randn(m, n, generator=g, dtype=F64))
    return triples, targets


def set_triple_grads(triples, targets, scale=1.0, opt=None):
    with torch.no_grad():
        for (u, s, v), t in zip(triples, targets):
            u64, s64, v64 = u.double(), s.double(), v.double()
            g = scale * u64 @ s64 @ v64.T - t
            u.grad = (scale * g @ v64 @ s64.T).to(u.dtype)
            s.grad = (scale * u64.T @ g @ v64).to(s.dtype)
            v.grad = (scale * g.T @ u64 @ s64).to(v.dtype)


def close(x, y, tol=1e-9):
    scale = max(float(y.abs().max()), 1.0)
    assert float((x - y).abs().max()) <= tol * scale, float((x - y).abs().max())


# ------------------------------------------------- plain, obviously correct one-pair versions


def plain_sylvester(mm, c):
    """Solve ``M K + K M = C`` by building the linear map column by column on basis matrices."""
    r = mm.shape[0]
    cols = []
    for j in range(r):
        for i in range(r):
            e = torch.zeros(r, r, dtype=F64)
            e[i, j] = 1.0
            cols.append((mm @ e + e @ mm).T.reshape(-1))
    return torch.linalg.solve(torch.stack(cols, 1), c.T.reshape(-1)).reshape(r, r).T


def plain_lift(b, a, xd):
    s_b, s_a = b.T @ b, a @ a.T
    k = plain_sylvester(s_b @ s_a, b.T @ xd @ a.T)
    return (xd @ a.T - b @ s_a @ k) @ torch.linalg.inv(s_a), torch.linalg.inv(s_b) @ (b.T @ xd - k @ s_b @ a)


class PlainAdam:
    def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps, self.m, self.v = b1, b2, eps, {}, {}

    def direction(self, key, g, t):
        self.m[key] = self.b1 * self.m.get(key, 0 * g) + (1 - self.b1) * g
        self.v[key] = self.b2 * self.v.get(key, 0 * g) + (1 - self.b2) * g**2
        mh, vh = self.m[key] / (1 - self.b1**t), self.v[key] / (1 - self.b2**t)
        return -mh / (vh.sqrt() + self.eps)


def plain_lracs_direction(g, st, t, beta=0.9, alpha=0.05, gamma=1.01, eps=1e-8):
    st["q"] = beta * st.get("q", 0) + (1 - beta) * (g**2).mean(1)
    st["c"] = beta * st.get("c", 0) + (1 - beta) * (g**2).mean(0)
    bc = 1 - beta**t
    gt = g / torch.sqrt(st["q"][:, None] / bc + eps) / torch.sqrt(st["c"][None, :] / bc + eps)
    norm = float(gt.norm())
    eta = 1.0 if t == 1 else gamma / max(norm / st["phi"], gamma)
    st["phi"] = eta * norm
    return -alpha * eta * gt


@pytest.mark.parametrize("name", ["adams", "adams-full", "lracs"])
@pytest.mark.parametrize("m,n,r", [(7, 5, 2), (6, 9, 1), (12, 10, 4)])
def test_lora_s_steps_match_plain_implementation(name, m, n, r):
    pairs, targets = make_pairs([(m, n, r)], seed=1)
    (a, b), t = pairs[0], targets[0]
    a_ref, b_ref = a.detach().clone(), b.detach().clone()
    opt = build_optimizer(name, [{"pairs": pairs, "lr": 0.05, "scale": 1.5}], damping=0.0)
    adam, st = PlainAdam(), {}
    for step in range(1, 4):
        set_grads(pairs, targets, 1.5, opt)
        opt.step()
        g = 1.5 * b_ref @ a_ref - t
        if name == "adams":
            da = adam.direction("A", 1.5 * b_ref.T @ g, step)
            db = adam.direction("B", 1.5 * g @ a_ref.T, step)
            xd = db @ a_ref + b_ref @ da
        elif name == "adams-full":
            xd = adam.direction("G", g, step)
        else:
            xd = plain_lracs_direction(g, st, step)
        bd, ad = plain_lift(b_ref, a_ref, xd)
        a_ref, b_ref = a_ref + 0.05 * ad, b_ref + 0.05 * bd
        close(a.detach(), a_ref, 1e-8)
        close(b.detach(), b_ref, 1e-8)


def test_lracs_norm_growth_limiter_engages():
    # G shrinks 10x from step 2 on; as the row/column EMAs catch up ||G~|| grows (1.5x at step 3),
    # and the limiter caps phi at gamma * phi_prev
    pairs, targets = make_pairs([(7, 5, 2)], seed=17)
    (a, b), t = pairs[0], targets[0]
    a_ref, b_ref, st = a.detach().clone(), b.detach().clone(), {}
    opt = build_optimizer("lracs", [{"pairs": pairs, "lr": 0.05}], damping=0.0)
    phis = []
    for step, factor in ((1, 1.0), (2, 0.1), (3, 0.1)):
        set_grads(pairs, targets, 1.0, opt)
        opt.full_grads.mul_(factor)
        opt.step()
        xd = plain_lracs_direction(factor * (b_ref @ a_ref - t), st, step)
        bd, ad = plain_lift(b_ref, a_ref, xd)
        a_ref, b_ref = a_ref + 0.05 * ad, b_ref + 0.05 * bd
        close(a.detach(), a_ref, 1e-8)
        close(b.detach(), b_ref, 1e-8)
        phis.append(float(opt.state[a]["phi"]))
        assert abs(phis[-1] - st["phi"]) <= 1e-9 * st["phi"]
    assert abs(phis[2] - 1.01 * phis[1]) <= 1e-9 * phis[1]


def test_library_references_match_optimizers():
    pairs, targets = make_pairs([(9, 7, 3)], seed=2)
    hp = {"lr": 0.03, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "damping": 1e-4}
    for name in ("adams", "adams-full"):
        ps = [tuple(x.detach().clone().requires_grad_() for x in p) for p in pairs]
        opt = build_optimizer(name, [{"pairs": ps}], lr=0.03, damping=1e-4)
        a, b, st = ps[0][0].detach().clone(), ps[0][1].detach().clone(), {}
        for _ in range(3):
            set_grads(ps, targets, 1.0, opt)
            opt.step()
            g = b @ a - targets[0]
            full = g if name == "adams-full" else None
            a, b = adams_reference(a, b, b.T @ g, g @ a.T, st, **hp, full_grad=full)
            close(ps[0][0].detach(), a, 1e-8)
            close(ps[0][1].detach(), b, 1e-8)
    ps = [tuple(x.detach().clone().requires_grad_() for x in p) for p in pairs]
    opt = build_optimizer("lracs", [{"pairs": ps}], lr=0.03, damping=1e-4)
    a, b, st = ps[0][0].detach().clone(), ps[0][1].detach().clone(), {}
    for _ in range(3):
        set_grads(ps, targets, 1.0, opt)
        opt.step()
        a, b = lracs_reference(a, b, b @ a - targets[0], st, lr=0.03, beta=0.9, alpha=0.05, gamma=1.01,
                               eps=1e-8, damping=1e-4)
        close(ps[0][0].detach(), a, 1e-8)
        close(ps[0][1].detach(), b, 1e-8)


# ----------------------------------------------------------------------------- gauge


def run_w(name, rot, steps=4, **hp):
    pairs, targets = make_pairs([(9, 7, 3)], seed=3)
    a, b = pairs[0]
    with torch.no_grad():
        pairs = [(torch.linalg.solve(rot, a).requires_grad_(), (b @ rot).requires_grad_())]
    opt = build_optimizer(name, [{"pairs": pairs, "lr": 0.05}], damping=0.0, **hp)
    ws = []
    for _ in range(steps):
        set_grads(pairs, targets, 1.0, opt)
        opt.step()
        ws.append((pairs[0][1] @ pairs[0][0]).detach())
    return ws


def random_rotation(r, seed):
    return torch.eye(r, dtype=F64) + 0.6 * torch.randn(r, r, generator=gen(seed), dtype=F64)


@pytest.mark.parametrize("name", ["adams-full", "lracs", "adaprelora"])
def test_full_gradient_optimizers_are_gauge_invariant(name):
    base = run_w(name, torch.eye(3, dtype=F64))
    for w, w_rot in zip(base, run_w(name, random_rotation(3, 4))):
        close(w_rot, w, 1e-8)


def test_adams_is_invariant_under_signed_permutations_only():
    base = run_w("adams", torch.eye(3, dtype=F64))
    perm = torch.tensor([[0.0, -1, 0], [0, 0, 1], [1, 0, 0]], dtype=F64)
    for w, w_rot in zip(base, run_w("adams", perm)):
        close(w_rot, w, 1e-9)
    # element-wise Adam moments are not gauge-equivariant: a general R changes the trajectory
    rotated = run_w("adams", random_rotation(3, 5))
    diff = max(float((w - w_rot).abs().max()) for w, w_rot in zip(base, rotated))
    assert diff > 1e-4


# ----------------------------------------------------------------------------- all of them


@pytest.mark.parametrize("name", PAIR_OPTS)
def test_zero_init_b_gives_finite_steps(name):
    pairs, targets = make_pairs(MIXED, seed=13, dtype=torch.float32, zero_b=True)
    before = [b.detach().clone() for _, b in pairs]
    opt = build_optimizer(name, [{"pairs": pairs, "lr": 1e-3}])
    for _ in range(4):
        set_grads(pairs, targets, 1.0, opt)
        opt.step()
        assert all(torch.isfinite(t).all() for p in pairs for t in p)
    assert all(float((b.detach() - b0).abs().max()) > 0 for (_, b), b0 in zip(pairs, before))


@pytest.mark.parametrize("name", PAIR_OPTS + ["stella"])
def test_batched_equals_per_pair_loop(name):
    make, grads, key = (
        (make_triples, set_triple_grads, "triples") if name == "stella" else (make_pairs, set_grads, "pairs")
    )
    tuples, targets = make(MIXED, seed=14)
    loose = [tuple(x.detach().clone().requires_grad_() for x in f) for f in tuples]
    opt = build_optimizer(name, [{key: tuples, "lr": 0.02}])
    singles = [build_optimizer(name, [{key: [f], "lr": 0.02}]) for f in loose]
    for _ in range(3):
        grads(tuples, targets, 1.0, opt)
        opt.step()
        for f, t, o in zip(loose, targets, singles):
            grads([f], [t], 1.0, o)
            o.step()
    for f, g in zip(tuples, loose):
        for x, y in zip(f, g):
            close(x.detach(), y.detach(), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", PAIR_OPTS + ["stella"])
def test_low_precision_factors_keep_linear_algebra_in_float32(name, dtype, monkeypatch):
    seen = []
    for fn in ("eigh", "svd", "solve_ex"):
        orig = getattr(torch.linalg, fn)

        def spy(x, *args, _orig=orig, **kw):
            seen.append(x.dtype)
            return _orig(x, *args, **kw)

        monkeypatch.setattr(torch.linalg, fn, spy)
    if name == "stella":
        tuples, targets = make_triples(MIXED[:3], seed=15, dtype=dtype)
        set_grads_fn, key = set_triple_grads, "triples"
    else:
        tuples, targets = make_pairs(MIXED[:3], seed=15, dtype=dtype)
        set_grads_fn, key = set_grads, "pairs"
    opt = build_optimizer(name, [{key: tuples, "lr": 1e-3}])
    for _ in range(2):
        set_grads_fn(tuples, targets, 1.0, opt)
        opt.step()
    assert seen and all(d == torch.float32 for d in seen)
    assert all(x.dtype == dtype and torch.isfinite(x).all() for f in tuples for x in f)
    states = list(opt.state.values())
    assert all(v.dtype == torch.float32 for st in states for k, v in st.items() if k != "step")
    # load_state_dict casts floating state to the parameter dtype; the fp32 moments must come back
    opt2 = build_optimizer(name, [{key: tuples, "lr": 1e-3}])
    opt2.load_state_dict(opt.state_dict())
    set_grads_fn(tuples, targets, 1.0, opt2)
    opt2.step()
    assert all(v.dtype == torch.float32 for st in opt2.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("name", PAIR_OPTS + ["stella"])
def test_state_dict_round_trip_then_lock_step(name):
    make, grads, key = (
        (make_triples, set_triple_grads, "triples") if name == "stella" else (make_pairs, set_grads, "pairs")
    )
    tuples, targets = make(MIXED[:3], seed=18)
    opt = build_optimizer(name, [{key: tuples, "lr": 0.02}])
    for _ in range(2):
        grads(tuples, targets, 1.0, opt)
        opt.step()
    twins = [tuple(x.detach().clone().requires_grad_() for x in f) for f in tuples]
    opt2 = build_optimizer(name, [{key: twins, "lr": 0.02}])
    opt2.load_state_dict(opt.state_dict())
    for _ in range(2):
        grads(tuples, targets, 1.0, opt)
        grads(twins, targets, 1.0, opt2)
        opt.step()
        opt2.step()
    for f, g in zip(tuples, twins):
        for x, y in zip(f, g):
            assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("name", ["adams-full", "lracs", "adaprelora"])
def test_missing_full_grad_raises(name):
    pairs, targets = make_pairs([(6, 5, 2)], seed=16)
    opt = build_optimizer(name, [{"pairs": pairs}])
    set_grads(pairs, targets, 1.0, opt)
    opt.full_grads.zero_()
    with pytest.raises(RuntimeError, match="full_grads="):
        opt.step()


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("adams", {"betas": (1.5, 0.999)}, "Invalid beta1: 1.5"),
        ("adams", {"weight_decay": 0.01}, "Invalid weight_decay"),
        ("adams-full", {"eps": -1.0}, "Invalid eps"),
        ("lracs", {"gamma": 0.5}, "Invalid gamma"),
        ("lracs", {"weight_decay": 0.1}, "Invalid weight_decay"),
        ("adaprelora", {"beta1": 1.0}, "Invalid beta1"),
        ("adaprelora", {"decay_rate": 0.5}, "Invalid decay_rate"),
        ("stella", {"betas": (0.9, -0.1)}, "Invalid beta2"),
    ],
)
def test_invalid_hyper_parameters(name, kwargs, match):
    key = "triples" if name == "stella" else "pairs"
    tuples = make_triples([(6, 5, 2)])[0] if name == "stella" else make_pairs([(6, 5, 2)])[0]
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, [{key: tuples}], **kwargs)


@pytest.mark.parametrize("name", PAIR_OPTS + ["stella"])
def test_steps_on_lora_linear_layers(name):
    from mixofshow.concepts.lora import LoRALinear

    torch.manual_seed(19)
    usv = name == "stella"
    layers = [
        LoRALinear(torch.nn.Linear(n, m), rank=r, scale=0.5, factorization="usv" if usv else "ab")
        for m, n, r in [(6, 5, 2), (6, 5, 2), (4, 7, 3)]
    ]
    if usv:
        group = {"triples": [(x.lora_U, x.lora_S, x.lora_V) for x in layers]}
    else:
        group = {"pairs": [(x.lora_down, x.lora_up) for x in layers]}
    full = full_gradients_for({"layers": torch.nn.ModuleList(layers)}, get_spec(name).cls)
    opt = build_optimizer(name, [{**group, "lr": 1e-2, "scale": 0.5}], full_grads=full)
    inputs = [torch.randn(3, 4, x.in_features) for x in layers]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = sum((x(i) - 1.0).square().mean() for x, i in zip(layers, inputs))
        loss.backward()
        if full is not None:  # the hook's G = dy^T x is dL/dW
            for x, i in zip(layers, inputs):
                w = x.base.weight.detach().clone().requires_grad_()
                ref = torch.autograd.grad(
                    (torch.nn.functional.linear(i, w + x.delta_weight().detach(), x.base.bias) - 1.0)
                    .square()
                    .mean(),
                    w,
                )[0]
                if full.mode == "matrix":
                    close(full.grad(x.lora_down), ref, 1e-5)
                else:  # adaprelora, one backward per step: only the row/column energies are kept
                    row, col = full.energies(x.lora_down)
                    close(row, ref.square().sum(1), 1e-5)
                    close(col, ref.square().sum(0), 1e-5)
        opt.step()
        losses.append(float(loss.detach()))
        assert all(torch.isfinite(t).all() for p in opt.param_groups for t in p["params"])
    assert losses[-1] < losses[0]
    if usv:
        for x in layers:
            eye = torch.eye(x.rank)
            assert float((x.lora_U.detach().T @ x.lora_U.detach() - eye).abs().max()) <= 1e-5
