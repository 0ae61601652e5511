"""NaN safety: training stops (or skips a step) on non-finite values, and nothing reads a spoiled file."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from mixofshow.cli import main
from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.io import load_concept, save_concept
from mixofshow.train import loop
from mixofshow.train.finite import NonFiniteError, measure_step
from mixofshow.train.state import write_metrics
from mixofshow.utils.finite import first_non_finite
from mixofshow.utils.io import FileFormatError, load_safetensors, save_safetensors


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _poison(monkeypatch, bad_steps):
    """Make the loss (and so every gradient) NaN at the given 0-based steps."""
    real, calls = loop.edlora_loss, {"n": 0}

    def loss(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        step, calls["n"] = calls["n"], calls["n"] + 1
        if step in bad_steps:
            nan = torch.tensor(float("nan"))
            return total * nan, {**terms, "mse": terms["mse"] * nan}
        return total, terms

    monkeypatch.setattr(loop, "edlora_loss", loss)


def test_huge_learning_rate_stops_with_exit_2_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    from conftest import EXAMPLE_TRAIN_CONFIG

    run = tmp_path / "run"
    code = main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), "--max-steps", "6",
                 "--set", "optimizer.lr_unet=1.0e+30", "--set", "optimizer.lr_text_encoder=1.0e+30",
                 "--set", "train.checkpoint_every=1", "--set", "validation.every=-1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"error: step \d+: (loss term 'mse' is (nan|inf)|the gradient of parameter group '\w+' holds NaN)", err), err
    assert "no concept file was written" in err and "Traceback" not in err
    assert not (run / "robot.safetensors").exists()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints, "the steps before the failure were checkpointed"
    for ckpt in checkpoints:
        tensors, _ = load_safetensors(ckpt / "trainable.safetensors")
        assert first_non_finite(tensors) is None, ckpt
    metrics = _strict_json(run / "metrics.json")
    assert metrics["error"] in err and not metrics["finished"] and metrics["concept_path"] is None
    assert all(x is None or math.isfinite(x) for x in metrics["losses"])


def test_stop_policy_names_the_step_and_loss_term(tmp_path, small_train_config, monkeypatch):
    _poison(monkeypatch, {2})
    with pytest.raises(NonFiniteError, match=r"step 3: loss term 'mse' is nan; training stopped "
                                             r"\(train.nan_policy: stop\).*step_000002") as err:
        train_config = small_train_config(tmp_path)
        loop.train(train_config)
    assert err.value.step == 3
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (run / "robot.safetensors").exists()
    metrics = _strict_json(run / "metrics.json")
    assert metrics["steps"] == 2 and len(metrics["losses"]) == 2 and "step 3" in metrics["error"]


def test_skip_step_policy_rides_through_a_bad_step(tmp_path, small_train_config, monkeypatch, checkpoint_weights):
    _poison(monkeypatch, {1})
    config = small_train_config(tmp_path, **{"train.nan_policy": "skip-step", "train.max_skipped_steps": 1,
                                             "train.checkpoint_every": 1, "train.keep_checkpoints": 4})
    seen = []
    result = loop.train(config, progress=lambda p: seen.append(p.phase == "checkpoint" and checkpoint_weights(tmp_path / "run")))
    assert result.finished and result.steps == 4
    losses = result.metrics["losses"]
    assert losses[1] is None and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
    assert result.metrics["skipped_steps"] == 1
    after_1, after_2 = [w for w in seen if w][:2]  # the checkpoints of steps 1 and 2
    for key in after_1:  # the skipped step changed no weight
        assert torch.equal(after_1[key], after_2[key]), key
    assert first_non_finite(load_concept(result.concept_path).embeddings) is None


def test_skip_step_policy_is_bounded(tmp_path, small_train_config, monkeypatch):
    _poison(monkeypatch, {1, 2})
    config = small_train_config(tmp_path, **{"train.nan_policy": "skip-step", "train.max_skipped_steps": 1})
    with pytest.raises(NonFiniteError, match=r"step 3: .*1 steps skipped already \(train.max_skipped_steps: 1\)"):
        loop.train(config)
    assert not (tmp_path / "run" / "robot.safetensors").exists()


def test_the_check_names_the_parameter_group_with_a_non_finite_gradient():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("inf")])
    groups = {"text_encoder": [a], "unet": [b]}
    health = measure_step(torch.tensor(0.5), {"mse": torch.tensor(0.5)}, groups)
    assert health.problem() == "the gradient of parameter group 'unet' holds NaN or inf"
    assert measure_step(torch.tensor(0.5), {}, groups, check_grads=False).problem() is None  # fp16: the scaler's
    with torch.no_grad():
        a[0] = float("nan")
    assert measure_step(torch.tensor(0.5), {}, groups).problem() == "the weights of parameter group 'text_encoder' hold NaN or inf"
    big = torch.nn.Parameter(torch.full((4,), 1e30))  # finite, although its norm overflows float32
    big.grad = torch.full((4,), 1e30)
    assert measure_step(torch.tensor(0.5), {}, {"unet": [big]}).problem() is None


def test_metrics_json_is_strict_json(tmp_path):
    write_metrics(tmp_path, {"final_loss": float("nan"), "losses": [1.0, float("inf"), None]})
    assert _strict_json(tmp_path / "metrics.json") == {"final_loss": None, "losses": [1.0, None, None]}


# -- files holding NaN are refused by every consumer -------------------------------------------
@pytest.fixture
def nan_concept(tmp_path, embedded_pipeline_factory):
    model = EDLoRA(embedded_pipeline_factory(), ["<toy1>"])
    concept = model.to_concept_file(model.meta())
    key = sorted(concept.lora)[0]
    a, b = concept.lora[key]
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"not written: tensor '{key}.lora_up' holds non-finite values \(1 NaN"):
        save_concept(tmp_path / "refused.safetensors", concept)  # the writer refuses too
    assert not (tmp_path / "refused.safetensors").exists()
    tensors = {f"embeddings.{w}": e for w, e in concept.embeddings.items()}
    for name, (a_, b_) in concept.lora.items():
        tensors[f"{name}.lora_down"], tensors[f"{name}.lora_up"] = a_, b_
    path = tmp_path / "spoiled.safetensors"
    save_safetensors(path, tensors, concept.meta.to_strings())
    return path, f"{key}.lora_up"


def test_load_concept_refuses_non_finite_tensors(nan_concept):
    path, tensor = nan_concept
    with pytest.raises(FileFormatError, match=re.escape(f"{path}: tensor '{tensor}' holds non-finite values")):
        load_concept(path)


def test_sample_fuse_and_export_refuse_a_nan_concept(nan_concept, tmp_path, capsys):
    path, tensor = nan_concept
    fuse_config = tmp_path / "fuse.yaml"
    fuse_config.write_text(yaml.safe_dump({"concepts": [{"file": str(path)}], "base_model": "embedded",
                                           "output": str(tmp_path / "fused.safetensors")}))
    commands = {
        "export": ["export", str(path), "--format", "diffusers", "--output", str(tmp_path / "x.safetensors")],
        "fuse": ["fuse", str(fuse_config)],
        "sample": ["sample", "--concept", str(path), "--prompt", "<toy1>", "--steps", "1",
                   "--output-dir", str(tmp_path / "samples")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert f"{path}: tensor '{tensor}' holds non-finite values" in err, (name, err)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "fused.safetensors").exists()
    assert not (tmp_path / "samples").exists()


def test_load_fused_refuses_non_finite_tensors(tmp_path):
    from mixofshow.fuse.io import FusedFile, FusedMeta, load_fused

    meta = FusedMeta(base_model="embedded", num_layers=1, text_dim=2, words=["<a1>"])
    fused = FusedFile(meta, {"<a1>": torch.zeros(1, 2)}, {"unet.x.to_q": torch.tensor([[float("inf"), 0.0]])})
    tensors = {"embeddings.<a1>": torch.zeros(1, 2), "unet.x.to_q.delta": fused.deltas["unet.x.to_q"]}
    save_safetensors(tmp_path / "f.safetensors", tensors, meta.to_strings())
    with pytest.raises(FileFormatError, match=r"tensor 'unet.x.to_q.delta' holds non-finite values \(0 NaN, 1 inf"):
        load_fused(tmp_path / "f.safetensors")


def test_a_weight_made_non_finite_by_the_last_update_is_never_saved(tmp_path, small_train_config, monkeypatch):
    real_build = loop.build_run

    def build(config, accelerator):  # the embedding update of step 2 writes an inf
        setup = real_build(config, accelerator)
        real_step, calls = setup.emb_optimizer.step, []

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    setup.model.embedding_parameter().view(-1)[0] = float("inf")
            return out

        setup.emb_optimizer.step = step
        return setup

    monkeypatch.setattr(loop, "build_run", build)
    with pytest.raises(NonFiniteError, match=r"step 2: tensor 'embeddings.new' is not finite; no checkpoint written"):
        loop.train(small_train_config(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 1}))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert not (run / "robot.safetensors").exists()
    assert "step_000001" in _strict_json(run / "metrics.json")["error"]


def test_max_skipped_steps_must_not_be_negative(tmp_path, small_train_config):
    from mixofshow.utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.max_skipped_steps: expected an integer >= 0, got -1"):
        loop.train(small_train_config(tmp_path, **{"train.max_skipped_steps": -1}))
    assert not (tmp_path / "run").exists()
