"""Every registered optimizer drives ED-LoRA training, and resumes mid-run exactly."""

from __future__ import annotations

import pytest
import torch

from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.io import load_concept
from mixofshow.concepts.lora import lora_layers
from mixofshow.models.embedded import build_embedded_pipeline
from mixofshow.optim import SPECS
from mixofshow.train.loop import train
from test_train import final_weights, small_config


@pytest.mark.parametrize("name", sorted(SPECS))
def test_optimizer_trains_and_resumes_exactly(name, tmp_path):
    overrides = {"optimizer.name": name, "train.max_steps": 3, "train.checkpoint_every": 0}
    straight = train(small_config(tmp_path / "a", **overrides))
    stops = iter([False, False, True])
    first = train(small_config(tmp_path / "b", **overrides), should_stop=lambda: next(stops))
    assert first.stopped and first.steps == 2
    train(small_config(tmp_path / "b", **overrides), resume=True)
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key

    concept = load_concept(straight.concept_path)
    assert concept.meta.optimizer == name
    moved = [float(b_.abs().max()) for _, b_ in concept.lora.values()]
    assert all(torch.isfinite(torch.tensor(moved))) and max(moved) > 0
    model = EDLoRA.from_concept(build_embedded_pipeline(), straight.concept_path)  # always loads as B A
    if SPECS[name].factorization == "usv":
        # StelLA trains U S V^T; the file stores the equivalent (A = V^T, B = U S)
        assert all(layer.factorization == "ab" for _, layer in lora_layers(model.unet))


def test_stella_layers_stay_on_the_stiefel_manifold(tmp_path):
    from mixofshow.train.config import load_train_config  # noqa: F401  (config path shared with small_config)
    from mixofshow.train import loop

    captured = {}
    original = loop._Run.save

    def spy(self, step):
        captured["layers"] = self.model.all_layers()
        return original(self, step)

    loop._Run.save = spy
    try:
        train(small_config(tmp_path, **{"optimizer.name": "stella", "train.max_steps": 2, "train.checkpoint_every": 0}))
    finally:
        loop._Run.save = original
    for name, layer in captured["layers"].items():
        assert layer.factorization == "usv", name
        eye = torch.eye(layer.rank)
        assert torch.allclose(layer.lora_U.T @ layer.lora_U, eye, atol=1e-5), name
        assert torch.allclose(layer.lora_V.T @ layer.lora_V, eye, atol=1e-5), name
