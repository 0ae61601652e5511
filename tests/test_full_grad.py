"""The full gradient G = dL/dW as an explicit object (``mixofshow/optim/full_grad.py``).

Properties: the hook's G is dL/dW; the "energies" mode (G reduced in the hook) gives the same
optimizer steps as keeping G; gradient accumulation over micro-batches equals one batch of their
concatenation; clipping and the fp16 loss scaler's unscale cover G (a real ``torch.amp.GradScaler``
on CPU, driven like accelerate drives it); an all-reduce over 2 processes equals one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mixofshow.concepts.lora import LoRALinear, lora_layers
from mixofshow.optim import build_optimizer, get_spec
from mixofshow.optim.full_grad import (
    ENERGIES,
    MATRIX,
    FullGradients,
    choose_mode,
    clip_grad_norm_,
    finish_backward_,
    full_gradients_for,
)
from mixofshow.optim.groups import lora_param_groups

F64 = torch.float64
FULL_GRAD_OPTS = ["adams-full", "lracs", "adaprelora"]


def make_model(dtype=F64, seed=0):
    """Two LoRA layers (B non-zero, so every factor gradient is non-zero) around a tanh."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [LoRALinear(nn.Linear(6, 5), 2, 0.5, generator=gen), LoRALinear(nn.Linear(5, 4), 2, 0.5, generator=gen)]
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1]).to(dtype)
    with torch.no_grad():
        for layer in layers:
            layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=gen, dtype=dtype))
    return model


def make_batches(steps, micro, size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(size, 3, 6, generator=gen, dtype=F64), torch.randn(size, 3, 4, generator=gen, dtype=F64))
         for _ in range(micro)]
        for _ in range(steps)
    ]  # fmt: skip


class StandInAccelerator:
    """What ``finish_backward_`` uses of accelerate's ``Accelerator`` with fp16 mixed precision:
    ``scaler`` (a real ``torch.amp.GradScaler`` on CPU) and ``unscale_gradients()``, which calls
    ``scaler.unscale_`` on every prepared optimizer, as accelerate does."""

    num_processes = 1

    def __init__(self, scaler, optimizers):
        self.scaler, self.optimizers = scaler, optimizers

    def unscale_gradients(self):
        for opt in self.optimizers:
            self.scaler.unscale_(opt)


def train(name, batches, mode=None, lr=0.05, scale=None, max_norm=None, unscale_full=True):
    """Train ``make_model()`` with optimizer ``name``: one step per entry of ``batches``, one
    backward pass per micro-batch; returns the factors after every step."""
    model = make_model()
    layers = [layer for _, layer in lora_layers(model)]
    accumulation = len(batches[0])
    mode = mode or choose_mode(get_spec(name).cls.full_grad_energies_only, accumulation)
    full = FullGradients.for_layers(layers, mode) if get_spec(name).needs_full_grad else None
    opt = build_optimizer(name, lora_param_groups({"m": model}, {"m": lr}), full_grads=full)
    params = [p for layer in layers for p in (layer.lora_down, layer.lora_up)]
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    accelerator = StandInAccelerator(scaler, [opt]) if scaler else StandInAccelerator(None, [])
    trajectory = []
    for step_batches in batches:
        for x, y in step_batches:
            loss = (model(x) - y).square().mean() / accumulation
            (scaler.scale(loss) if scaler else loss).backward()
        if unscale_full:
            finish_backward_(accelerator, full)
        else:  # the factor gradients only (what accelerate did before the full gradient was explicit)
            accelerator.unscale_gradients() if scaler else None
        if max_norm is not None:
            clip_grad_norm_(params, full, max_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def assert_same(run1, run2, tol=1e-10):
    for step1, step2 in zip(run1, run2, strict=True):
        for x, y in zip(step1, step2):
            assert float((x - y).abs().max()) <= tol * max(1.0, float(y.abs().max()))


def assert_moved(run):
    start = [p for p in make_model().parameters() if p.requires_grad]
    assert any(float((x - x0.detach()).abs().max()) > 1e-4 for x, x0 in zip(run[-1], start))


# ----------------------------------------------------------------------------- the hook


def test_hook_gives_dl_dw_for_each_layer():
    model = make_model()
    layers = [layer for _, layer in lora_layers(model)]
    full = FullGradients.for_layers(layers)
    (x, y), = make_batches(1, 1, 4)[0]
    weights = [layer.base.weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    (model(x) - y).square().mean().backward()
    for layer, w in zip(layers, weights):
        # the frozen W0 stands in for W: dL/dW0 = dL/dW
        assert torch.allclose(full.grad(layer.lora_down), w.grad, atol=1e-12)
    full.detach()
    assert all(layer.full_grad_sink is None for layer in layers)


def test_only_optimizers_that_ask_pay():
    model = make_model()
    assert full_gradients_for({"m": model}, get_spec("adamw").cls) is None
    assert all(layer.full_grad_sink is None for _, layer in lora_layers(model))
    assert full_gradients_for({"m": model}, get_spec("adaprelora").cls).mode == ENERGIES
    assert full_gradients_for({"m": model}, get_spec("adaprelora").cls, accumulation_steps=2).mode == MATRIX
    assert full_gradients_for({"m": model}, get_spec("adaprelora").cls, num_processes=2).mode == MATRIX
    assert full_gradients_for({"m": model}, get_spec("lracs").cls).mode == MATRIX  # reads G~ itself


def test_optimizers_that_read_g_refuse_energies_mode():
    model = make_model()
    full = FullGradients.for_layers([layer for _, layer in lora_layers(model)], ENERGIES)
    with pytest.raises(ValueError, match="mode 'matrix'"):
        build_optimizer("lracs", lora_param_groups({"m": model}, {"m": 1e-2}), full_grads=full)
    other = make_model(seed=3)  # full gradients of other layers
    with pytest.raises(ValueError, match="do not hold the pair"):
        build_optimizer("adaprelora", lora_param_groups({"m": other}, {"m": 1e-2}), full_grads=full)


# ----------------------------------------------------------------------------- modes


def test_energies_mode_gives_the_same_steps_as_keeping_g():
    batches = make_batches(4, 1, 5)
    energies = train("adaprelora", batches, mode=ENERGIES)
    assert_same(energies, train("adaprelora", batches, mode=MATRIX))
    assert_moved(energies)


@pytest.mark.parametrize("name", FULL_GRAD_OPTS + ["adamw"])
def test_accumulation_over_two_micro_batches_equals_one_concatenated_batch(name):
    micro = make_batches(3, 2, 4)
    whole = [[(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step]))] for step in micro]
    accumulated = train(name, micro)  # adaprelora: 2 backward passes per step -> keeps G
    assert_same(accumulated, train(name, whole))
    assert_moved(accumulated)


def test_energies_mode_refuses_a_second_backward_in_one_step():
    model = make_model()
    FullGradients.for_layers([layer for _, layer in lora_layers(model)], ENERGIES)
    (x, y), = make_batches(1, 1, 2)[0]
    (model(x) - y).square().mean().backward()
    with pytest.raises(RuntimeError, match="energies of a sum"):
        model(x)


@pytest.mark.parametrize("how", ["twice", "checkpoint", "checkpoint-reentrant", "checkpoint-late"])
def test_energies_mode_with_repeated_calls_and_checkpointing(how):
    """A layer used twice in a forward pass contributes twice to G, and gradient checkpointing
    reruns its forward inside the backward pass (its hook then runs or not, before or after the
    layer's own): the energies must be those of the whole G, as in "matrix" mode."""
    results = {}
    for mode in (MATRIX, ENERGIES):
        model = make_model()
        layer = model[0]
        full = FullGradients.for_layers([layer], mode)
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
        if how == "twice":
            out = layer(layer(x)[..., :1].expand(-1, 6) + x)
        elif how == "checkpoint-late":  # the layer's hook runs first, then the recomputation
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
                out.sum().backward()
        else:  # tanh saves its output: the recomputation runs the layer's forward in the backward
            region = lambda t: torch.tanh(layer(t))  # noqa: E731
            out = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=how.endswith("reentrant"))
        if how != "checkpoint-late":
            out.square().sum().backward()
        results[mode] = full.energies(layer.lora_down)
        if mode == MATRIX:
            results["g"] = full.grad(layer.lora_down)
    for a, b in zip(results[MATRIX], results[ENERGIES]):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    assert torch.allclose(results[MATRIX][0], results["g"].square().sum(1))


# ----------------------------------------------------------------------------- clipping, scaling


@pytest.mark.parametrize("mode", [MATRIX, ENERGIES])
def test_clip_grad_norm_includes_g(mode):
    gen = torch.Generator().manual_seed(7)
    pairs = [(torch.randn(2, 6, dtype=F64), torch.randn(5, 2, dtype=F64)) for _ in range(2)]
    gs = [torch.randn(5, 6, generator=gen, dtype=F64) for _ in pairs]
    params = [torch.zeros(3, dtype=F64, requires_grad=True), torch.zeros(4, dtype=F64, requires_grad=True)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
    ref_grads = [p.grad.clone() for p in params] + [g.clone() for g in gs]
    expected_norm = torch.stack([t.norm() for t in ref_grads]).norm()
    ref = [t.clone().requires_grad_() for t in ref_grads]
    for t, g in zip(ref, ref_grads):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 0.5)  # torch's rule on [grads..., G...]
    full = FullGradients(pairs, mode)
    for (a, _), g in zip(pairs, gs):
        full.set_(a, g)
    total = clip_grad_norm_(params, full, 0.5)
    assert torch.allclose(total.double(), expected_norm, rtol=1e-6)
    for p, t in zip(params, ref):
        assert torch.allclose(p.grad, t.grad, rtol=1e-6)
    for (a, _), t in zip(pairs, ref[len(params):]):
        row, col = full.energies(a)  # energies scale with the square of the coefficient
        assert torch.allclose(row, t.grad.square().sum(1), rtol=1e-6)
        assert torch.allclose(col, t.grad.square().sum(0), rtol=1e-6)
        if mode == MATRIX:
            assert torch.allclose(full.grad(a), t.grad, rtol=1e-6)


@pytest.mark.parametrize("name", FULL_GRAD_OPTS + ["adamw"])
@pytest.mark.parametrize("max_norm", [None, 0.3])
def test_scaled_loss_gives_the_same_steps_as_unscaled(name, max_norm):
    batches = make_batches(3, 1, 4)
    unscaled = train(name, batches, max_norm=max_norm)
    assert_same(train(name, batches, scale=2.0**12, max_norm=max_norm), unscaled, 1e-9)
    assert_moved(unscaled)


def test_leaving_g_scaled_changes_the_steps():
    """The negative control: without unscaling G (the old behaviour), fp16 runs of lracs differ."""
    batches = make_batches(2, 1, 4)
    unscaled = train("lracs", batches)
    stale = train("lracs", batches, scale=2.0**12, unscale_full=False)
    diff = max(float((x - y).abs().max()) for x, y in zip(stale[-1], unscaled[-1]))
    assert diff > 1e-4


def test_energies_mode_cannot_be_all_reduced():
    pairs = [(torch.randn(2, 6), torch.randn(5, 2))]
    with pytest.raises(RuntimeError, match="cannot be all-reduced"):
        FullGradients(pairs, ENERGIES).all_reduce_(lambda t: t)


# ----------------------------------------------------------------------------- two processes

_WORKER = textwrap.dedent(
    """
    import sys, torch
    from accelerate import Accelerator
    sys.path.insert(0, sys.argv[1])
    from test_full_grad import make_batches, make_model
    from mixofshow.concepts.lora import lora_layers
    from mixofshow.optim.full_grad import FullGradients, finish_backward_
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model = make_model()
    layers = [layer for _, layer in lora_layers(model)]
    full = FullGradients.for_layers(layers)
    (x, y), = make_batches(1, 1, 6)[0]
    half = slice(0, 3) if accelerator.process_index == 0 else slice(3, 6)
    (model(x[half]) - y[half]).square().mean().backward()
    finish_backward_(accelerator, full)
    if accelerator.is_main_process:
        torch.save([full.grad(layer.lora_down) for layer in layers], sys.argv[2])
    accelerator.wait_for_everyone()
    # an orderly teardown: exiting with gloo's threads alive can abort ("terminate called without
    # an active exception", seen once in a fresh-clone CI run on a loaded machine)
    torch.distributed.destroy_process_group()
    """
)


def test_all_reduce_over_two_processes_equals_one_process(tmp_path):
    """Each of 2 gloo processes takes half the batch; after ``finish_backward_`` (accelerate's
    mean all-reduce) their G equals one process's G on the whole batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "g.pt"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-c", _WORKER, os.path.dirname(__file__), str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        log = p.communicate(timeout=240)[0].decode()
        assert p.returncode == 0, log[-3000:]
    reduced = torch.load(out, weights_only=True)
    model = make_model()
    layers = [layer for _, layer in lora_layers(model)]
    full = FullGradients.for_layers(layers)
    (x, y), = make_batches(1, 1, 6)[0]
    (model(x) - y).square().mean().backward()
    for layer, g in zip(layers, reduced):
        assert torch.allclose(g, full.grad(layer.lora_down), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- the training loop


def test_training_loop_clips_with_the_full_gradient(tmp_path, monkeypatch, small_train_config):
    """``train.max_grad_norm`` in the loop: the norm includes G, kept (mode "matrix") because of
    the 2 micro-batches per step, and the run trains."""
    from mixofshow.train.loop import train as train_loop

    seen = []
    original = FullGradients.norm_sq

    def spy(self):
        value = original(self)
        seen.append((self.mode, float(value)))
        return value

    monkeypatch.setattr(FullGradients, "norm_sq", spy)
    overrides = {"optimizer.name": "adaprelora", "train.max_steps": 2, "train.checkpoint_every": 0,
                 "train.gradient_accumulation_steps": 2, "train.max_grad_norm": 1e-3}  # fmt: skip
    result = train_loop(small_train_config(tmp_path, **overrides))
    assert result.steps == 2 and len(seen) == 2
    assert all(mode == MATRIX and value > 0 for mode, value in seen)
