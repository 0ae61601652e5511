"""Properties every registered LoRA optimizer must have, parametrized over the whole registry.

After timm's ``tests/test_optim.py``: a state-dict round trip followed by lock-step stepping, no
NaN from zero-initialised factors, low-precision factors, clear errors for bad names and
hyper-parameters, and a loss that goes down. Whatever is registered at test time is covered.
Optimizers with ``needs_full_grad`` get ``G`` (``optimizer.full_grads.set_(A, G)``) consistent with the factor gradients
(``G_A = s B^T G``, ``G_B = s G A^T``); ``usv`` optimizers get (U, S, V) triples.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from mixofshow.optim import SPECS, build_optimizer, get_spec
from mixofshow.optim.registry import check_hparams

NAMES = sorted(SPECS)
SHAPES = [(12, 10, 2), (12, 10, 2), (9, 14, 4)]  # (m, n, r)
NEGATIVE_INVALID = (
    "eps", "weight_decay", "reg", "ratio", "damping", "clip_threshold", "skip_threshold", "update_capping", "grad_scaling",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def key_of(spec) -> str:
    return "triples" if spec.factorization == "usv" else "pairs"


def make_factors(spec, shapes, dtype=torch.float32, seed=0, zero=False):
    """Pairs (A r x n, B m x r) or triples (U m x r, S r x r, V n x r); B / S zero if ``zero``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    out = []
    for m, n, r in shapes:
        if spec.factorization == "usv":
            u, v = torch.linalg.qr(randn(m, r))[0], torch.linalg.qr(randn(n, r))[0]
            f = (u, torch.zeros(r, r, dtype=torch.float64) if zero else 0.5 * randn(r, r), v)
        else:
            f = (randn(r, n) / math.sqrt(n), torch.zeros(m, r, dtype=torch.float64) if zero else 0.5 * randn(m, r))
        out.append(tuple(t.to(dtype).requires_grad_() for t in f))
    return out


def clone_factors(factors, dtype=None):
    return [tuple(t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in f) for f in factors]


def delta(spec, f, scale):
    if spec.factorization == "usv":
        u, s, v = f
        return scale * u @ s @ v.T
    a, b = f
    return scale * b @ a


def set_grads(spec, factors, full_grads, scale, opt):
    """Factor gradients of ``sum <G, W>`` (so dL/dW = G for each pair), plus G itself in the
    optimizer's full gradients (``needs_full_grad``)."""
    for f, g in zip(factors, full_grads):
        for t in f:
            t.grad = None
        w = delta(spec, f, scale)
        (w * g.to(w.dtype)).sum().backward()
        if spec.needs_full_grad:
            fg = g.to(torch.float64 if f[0].dtype == torch.float64 else torch.float32)
            opt.full_grads.set_(f[0], fg)


def random_full_grads(shapes, gen, scale=1.0):
    return [scale * torch.randn(m, n, generator=gen, dtype=torch.float64) for m, n, _ in shapes]


def flat(factors):
    return [t for f in factors for t in f]


def make_optimizer(name, factors, lr=1e-2, scale=0.5, **hparams):
    return build_optimizer(name, [{key_of(SPECS[name]): factors, "lr": lr, "scale": scale}], **hparams)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_lock_step(name):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(1)
    grads = [random_full_grads(SHAPES, gen, 0.1) for _ in range(6)]
    f1 = make_factors(spec, SHAPES)
    opt1 = make_optimizer(name, f1)
    for k in range(3):
        set_grads(spec, f1, grads[k], 0.5, opt1)
        opt1.step()
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    f2 = clone_factors(f1)
    opt2 = make_optimizer(name, f2)
    opt2.load_state_dict(torch.load(buf))
    for k in range(3, 6):
        for factors, opt in ((f1, opt1), (f2, opt2)):
            set_grads(spec, factors, grads[k], 0.5, opt)
            opt.step()
        for t1, t2 in zip(flat(f1), flat(f2)):
            assert torch.equal(t1, t2), f"{name}: copies diverged at step {k}"


@pytest.mark.parametrize("name", NAMES)
def test_zero_initialised_factor_gives_finite_steps(name):
    spec = SPECS[name]
    factors = make_factors(spec, SHAPES, zero=True)
    gen = torch.Generator().manual_seed(2)
    targets = [0.3 * torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) for m, n, r in SHAPES]
    opt = make_optimizer(name, factors, lr=1e-2, scale=1.0)
    for _ in range(5):
        set_grads(spec, factors, [delta(spec, f, 1.0).detach() - t for f, t in zip(factors, targets)], 1.0, opt)
        opt.step()
        assert all(torch.isfinite(t).all() for t in flat(factors)), f"{name}: NaN/Inf from a zero init"
    assert any(delta(spec, f, 1.0).abs().max() > 0 for f in factors), f"{name}: a zero B never moved"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_factors_track_a_float32_run(name, dtype):
    spec = SPECS[name]
    low = clone_factors(make_factors(spec, SHAPES), dtype)
    ref = clone_factors(low, torch.float32)  # same starting values
    opt_low, opt_ref = make_optimizer(name, low, lr=5e-2), make_optimizer(name, ref, lr=5e-2)
    start = [t.detach().clone() for t in flat(ref)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        g = random_full_grads(SHAPES, gen, 0.1)
        set_grads(spec, ref, g, 0.5, opt_ref)
        for t_low, t_ref in zip(flat(low), flat(ref)):  # the same gradients, rounded
            t_low.grad = t_ref.grad.to(dtype)
            if opt_ref.full_grads is not None and t_ref in opt_ref.full_grads:
                opt_low.full_grads.set_(t_low, opt_ref.full_grads.grad(t_ref))
        opt_ref.step()
        opt_low.step()
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for t0, t_low, t_ref in zip(start, flat(low), flat(ref)):
        assert t_low.dtype == dtype
        d_low, d_ref = t_low.detach().float() - t0, t_ref.detach() - t0
        tol = 0.05 * d_ref.norm() + 4 * ulp * t0.norm() + 1e-6
        assert (d_low - d_ref).norm() <= tol, f"{name}: {dtype} step differs from float32"
    if spec.factorization == "ab":  # r x r statistics stay float32, also after a reload
        opt_low.load_state_dict(opt_low.state_dict())
        for m, n, r in SHAPES:
            for state in opt_low.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape[-2:] == (r, r) and value.dim() >= 2:
                        assert value.dtype == torch.float32, f"{name}: r x r state in {value.dtype}"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        get_spec("no-such-optimizer")
    assert all(name in str(err.value) for name in NAMES)
    with pytest.raises(ValueError):
        build_optimizer("no-such-optimizer", [])


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyper_parameters_raise_value_error(name):
    spec = SPECS[name]
    factors = make_factors(spec, SHAPES[:1])
    groups = [{key_of(spec): factors, "lr": 1e-3}]
    bad = [{"lr": -1.0}, {"not_a_hyper_parameter": 1}]
    for key, value in spec.defaults.items():
        if key == "betas":
            bad += [{"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}]
        elif key in ("beta", "beta1", "beta2"):
            bad.append({key: 1.5})
        elif key in NEGATIVE_INVALID:
            bad.append({key: -1.0})
    for hparams in bad:
        with pytest.raises(ValueError):
            build_optimizer(name, groups, **hparams)


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_low_rank_regression(name):
    spec = SPECS[name]
    shapes = [(16, 12, 4), (10, 14, 2)]
    gen = torch.Generator().manual_seed(4)
    targets = []
    for m, n, r in shapes:
        t = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
        targets.append(t / t.norm())

    def loss_of(factors):
        return sum(0.5 * (delta(spec, f, 1.0) - t).square().sum().item() for f, t in zip(factors, targets))

    initial, best = loss_of(make_factors(spec, shapes, zero=True)), math.inf
    for lr in (1e-1, 3e-2, 1e-2, 3e-3):
        factors = make_factors(spec, shapes, zero=True)
        opt = make_optimizer(name, factors, lr=lr, scale=1.0)
        for _ in range(60):
            set_grads(spec, factors, [delta(spec, f, 1.0).detach() - t for f, t in zip(factors, targets)], 1.0, opt)
            opt.step()
        final = loss_of(factors)
        best = min(best, final if math.isfinite(final) else math.inf)
    assert best < 0.5 * initial, f"{name}: loss {initial:.3g} -> {best:.3g} at the best lr"


# ----------------------------------------------------------------- contract 2: recommended lr, check_hparams


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_recommends_unet_and_text_encoder_lrs(name):
    lrs = SPECS[name].recommended_lr
    assert set(lrs) == {"unet", "text_encoder"} and all(v > 0 for v in lrs.values())
    assert set(SPECS[name].defaults) <= set(__import__("inspect").signature(SPECS[name].cls).parameters)
    check_hparams(name, dict(SPECS[name].defaults))  # the class defaults are valid


@pytest.mark.parametrize(
    "name,params,start",
    [
        ("adamw", {"betas": (1.5, 0.999)}, "betas: Invalid beta1: 1.5"),
        ("adamw", {"betas": "0.9"}, "betas: Invalid betas"),
        ("adamw", {"eps": -1}, "eps: Invalid eps: -1"),
        ("adamw", {"lr": -1.0}, "lr: Invalid learning rate: -1.0"),
        ("loraplus", {"ratio": 0}, "ratio: Invalid ratio: 0"),
        ("lora_rite", {"update_capping": -1.0}, "update_capping: Invalid update_capping"),
        ("lora_rite", {"apply_escape": "yes"}, "apply_escape: Invalid apply_escape"),
        ("lracs", {"gamma": 0.5}, "gamma: Invalid gamma"),
        ("adams", {"weight_decay": 0.1}, "weight_decay: Invalid weight_decay"),
        ("stella", {"retraction": "cayley"}, "retraction: Invalid retraction"),
        ("scaled_gd", {"betas": (0.9, 0.99)}, "betas: unknown hyper-parameter of optimizer 'scaled_gd'"),
    ],
)
def test_check_hparams_names_the_key_first(name, params, start):
    with pytest.raises(ValueError) as err:
        check_hparams(name, params)
    assert str(err.value).startswith(start), str(err.value)


def test_bad_optimizer_params_fail_at_config_load(tmp_path):
    from mixofshow.train.config import load_train_config
    from mixofshow.utils.config import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {concept_list: a.json}\nconcept: {words: ['<a1>']}\n"
                   "optimizer: {name: adamw, params: {betas: [0.9, 1.2]}}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer\.params\.betas: Invalid beta2: 1\.2"):
        load_train_config(cfg)
    cfg.write_text("data: {concept_list: a.json}\nconcept: {words: ['<a1>']}\noptimizer: {name: nope}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.name: Unknown optimizer 'nope'"):
        load_train_config(cfg)
    cfg.write_text("data: {concept_list: a.json}\nconcept: {words: ['<a1>']}\n"
                   "optimizer: {name: stella, params: {grad_scaling: 768, metric: euclidean}}\n")  # fmt: skip
    assert load_train_config(cfg).optimizer.params["metric"] == "euclidean"


def test_a_missing_or_broken_optimizer_module_fails_loudly(monkeypatch):
    """A typo in the module list (or a module that no longer imports) is an error, never a
    silently missing optimizer whose tests stop running."""
    from mixofshow.optim import registry

    monkeypatch.setattr(registry, "_MODULES", registry._MODULES + ("adamw_typo",))
    with pytest.raises(ModuleNotFoundError, match="adamw_typo"):
        registry._collect()
