"""The batching machinery of the optimizers: one call for many buckets, the fused Adam directions,
and several param groups (each with its own hyper-parameters) batched together."""

from __future__ import annotations

import pytest
import torch

from mixofshow.optim import build_optimizer
from mixofshow.optim.bucketed import adam_directions, adam_directions_
from mixofshow.optim.batching import concat_call, rows_layout, rows_matmul
from mixofshow.utils.memory import tune_cpu_allocator
from test_optim_geometric import MIXED, close, make_pairs, make_triples, set_grads, set_triple_grads


def test_concat_call_equals_one_call_per_batch_with_per_row_scalars():
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(k, 3, 3, generator=g), torch.randn(k, 3, 5, generator=g)) for k in (2, 4, 1)]
    items.append((torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 5, generator=g)))  # another shape

    def fn(s, x, scale):
        if isinstance(scale, torch.Tensor):
            scale = scale[:, None, None]
        return (s @ x * scale, s.sum((-1, -2)))

    scalars = [1.0, 2.0, 0.5, 3.0]
    got = concat_call(fn, items, scalars)
    for (s, x), value, out in zip(items, scalars, got):
        expected = fn(s, x, value)
        assert len(out) == 2
        for a, b in zip(out, expected):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_directions_equal_the_foreach_formula(dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (4, 6), (3, 2)]
    grads = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    grads[1] = torch.randn(6, 4, generator=g, dtype=dtype).mT  # non-contiguous: must be handled
    m1 = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    v1 = [torch.rand(*s, generator=g, dtype=dtype) for s in shapes]
    m2, v2 = [t.clone() for t in m1], [t.clone() for t in v1]
    steps = [torch.tensor(3.0)] * 3
    out = [torch.zeros(*s, dtype=dtype) for s in shapes]
    adam_directions_(out, grads, m1, v1, steps, beta1=0.9, beta2=0.99, eps=1e-8)
    expected = adam_directions(m2, v2, grads, 0.9, 0.99, 1e-8, [3, 3, 3])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(out + m1 + v1, list(expected) + m2 + v2):
        close(a, b, tol)


@pytest.mark.parametrize("name", ["adams", "adams-full", "lracs", "adaprelora", "stella"])
def test_groups_with_their_own_hyperparameters_batch_like_separate_optimizers(name):
    usv = name == "stella"
    make, grads, key = (make_triples, set_triple_grads, "triples") if usv else (make_pairs, set_grads, "pairs")
    tuples, targets = make(MIXED, seed=21)
    twins = [tuple(x.detach().clone().requires_grad_() for x in f) for f in tuples]
    # the second group changes hyper-parameters this optimizer reads per group (a key it does not
    # read is an error; AdamS and LRACS take no weight decay at all)
    own = {"betas": (0.8, 0.99), "beta": 0.8, "beta1": 0.8, "damping": 1e-3, "weight_decay": 0.1}
    takes = build_optimizer(name, [{key: tuples[:1]}]).defaults
    extra = {k: v for k, v in own.items() if k in takes}
    assert len(extra) >= 2, extra
    groups = [{key: tuples[:3], "lr": 0.02}, {key: tuples[3:], "lr": 0.05, **extra}]
    separate = [build_optimizer(name, [{**group, key: twins[:3] if i == 0 else twins[3:]}])
                for i, group in enumerate(groups)]  # fmt: skip
    together = build_optimizer(name, groups)
    for _ in range(3):
        grads(tuples, targets, 1.0, together)
        grads(twins[:3], targets[:3], 1.0, separate[0])
        grads(twins[3:], targets[3:], 1.0, separate[1])
        together.step()
        for opt in separate:
            opt.step()
    for f, g in zip(tuples, twins):
        for x, y in zip(f, g):
            close(x.detach(), y.detach(), 1e-10)


@pytest.mark.parametrize("name", ["adams", "lracs", "stella"])
def test_a_group_key_the_optimizer_does_not_take_is_an_error(name):
    usv = name == "stella"
    make, key = (make_triples, "triples") if usv else (make_pairs, "pairs")
    tuples, _ = make(MIXED, seed=3)
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['betaz'\]; it takes \["):
        build_optimizer(name, [{key: tuples, "lr": 0.01, "betaz": (0.9, 0.99)}])


def test_allocator_tuning_is_accepted_by_glibc_and_a_no_op_elsewhere():
    import platform

    assert tune_cpu_allocator() is (platform.libc_ver()[0] == "glibc")


def test_state_of_another_layout_is_a_clear_error():
    triples, targets = make_triples(MIXED[:2], seed=22)
    opt = build_optimizer("stella", [{"triples": triples, "lr": 0.01}])
    set_triple_grads(triples, targets)
    opt.step()
    saved = opt.state_dict()
    for st in saved["state"].values():
        if "exp_avg_U" in st:
            st["exp_avg_U"] = st["exp_avg_U"].mT.contiguous()  # the (m, r) layout of older states
    opt.load_state_dict(saved)
    set_triple_grads(triples, targets)
    with pytest.raises(RuntimeError, match="exp_avg_U.*expected"):
        opt.step()


@pytest.mark.parametrize("r", [4, 8])
def test_rows_layout_and_matmul_keep_the_math_and_the_storage(r):
    g = torch.Generator().manual_seed(30)
    x = torch.randn(3, 50, r, generator=g, dtype=torch.float64)
    w, add = torch.randn(3, r, r, generator=g, dtype=torch.float64), torch.randn(3, 50, r, generator=g, dtype=torch.float64)
    stored = rows_layout(x)
    assert torch.equal(stored, x) and stored.is_contiguous() == (r >= 8)  # r-major below rank 8
    for out, expected in ((rows_matmul(stored, w), x @ w),
                          (rows_matmul(stored, w, rows_layout(add), beta=0.5, alpha=-2.0), 0.5 * add - 2.0 * x @ w)):  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert out.stride() == stored.stride()
