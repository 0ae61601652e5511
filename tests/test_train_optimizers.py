"""Registered optimizers drive ED-LoRA training and resume mid-run exactly.

By default one optimizer (AdaPReLoRA: it reads the full weight gradient, the state most easily
lost across a checkpoint) runs the resume check; the sweep over the whole registry is marked
``slow`` (``python -m pytest -m slow tests/test_train_optimizers.py``).
"""

from __future__ import annotations

import pytest
import torch

from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.io import load_concept
from mixofshow.models.embedded import build_embedded_pipeline
from mixofshow.optim import SPECS
from mixofshow.train import loop
from mixofshow.train.loop import train


def _trains_and_resumes_exactly(name, tmp_path, small_train_config, checkpoint_weights, **extra):
    overrides = {"optimizer.name": name, "train.max_steps": 3, "train.checkpoint_every": 0, **extra}
    straight = train(small_train_config(tmp_path / "a", **overrides))
    stops = iter([False, False, True])
    first = train(small_train_config(tmp_path / "b", **overrides), should_stop=lambda: next(stops))
    assert first.stopped and first.steps == 2
    train(small_train_config(tmp_path / "b", **overrides), resume=True)
    a, b = checkpoint_weights(tmp_path / "a" / "run"), checkpoint_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    concept = load_concept(straight.concept_path)
    assert concept.meta.optimizer == name
    moved = [float(b_.abs().max()) for _, b_ in concept.lora.values()]
    assert all(torch.isfinite(torch.tensor(moved))) and max(moved) > 0


def test_full_gradient_optimizer_resumes_exactly(tmp_path, small_train_config, checkpoint_weights):
    assert SPECS["adaprelora"].needs_full_grad
    _trains_and_resumes_exactly("adaprelora", tmp_path, small_train_config, checkpoint_weights)


@pytest.mark.parametrize("name", ["lora_rite", "stella"])
def test_rank_8_state_layouts_resume_exactly(name, tmp_path, small_train_config, checkpoint_weights):
    # from rank 8 StelLA keeps U, V and their moments in their own layout (batching.rows_layout);
    # LoRA-RITE's states (views of B's layout, moment frames) at a second rank. The example
    # config trains rank 4
    _trains_and_resumes_exactly(name, tmp_path, small_train_config, checkpoint_weights, **{"lora.rank": 8})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
def test_optimizer_trains_and_resumes_exactly(name, tmp_path, small_train_config, checkpoint_weights):
    _trains_and_resumes_exactly(name, tmp_path, small_train_config, checkpoint_weights)


def test_stella_stays_on_the_stiefel_manifold_and_its_file_holds_the_trained_update(
    tmp_path, small_train_config, monkeypatch
):
    captured = {}
    real_save = loop.save_run

    def spy(setup, state):
        captured["layers"] = setup.model.all_layers()
        return real_save(setup, state)

    monkeypatch.setattr(loop, "save_run", spy)
    result = train(small_train_config(tmp_path, **{"optimizer.name": "stella", "train.max_steps": 2,
                                                   "train.checkpoint_every": 0}))
    trained = captured["layers"]
    for name, layer in trained.items():
        assert layer.factorization == "usv", name
        eye = torch.eye(layer.rank)
        assert torch.allclose(layer.lora_U.T @ layer.lora_U, eye, atol=1e-5), name
        assert torch.allclose(layer.lora_V.T @ layer.lora_V, eye, atol=1e-5), name
    # The file stores StelLA's U S V^T as (A = V^T, B = U S): loaded as B A, every layer's update
    # is the trained one (and not the zero a fresh B A layer would give: S moved away from 0).
    concept = load_concept(result.concept_path)
    model = EDLoRA.from_concept(build_embedded_pipeline(), result.concept_path)
    loaded = model.all_layers()
    assert set(concept.lora) == set(trained) == set(loaded)
    moved = 0.0
    for name, layer in trained.items():
        with torch.no_grad():
            expected = layer.lora_U @ layer.lora_S @ layer.lora_V.T
            a, b = concept.lora[name]
            assert torch.allclose(b @ a, expected, atol=1e-6), name
            assert torch.allclose(loaded[name].delta_weight(), layer.delta_weight(), atol=1e-6), name
        moved = max(moved, float(expected.abs().max()))
    assert moved > 0
