"""The training loop: end to end on the embedded model, resume, cancellation, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixofshow.cli import main
from mixofshow.concepts.io import load_concept
from mixofshow.train.config import load_train_config
from mixofshow.train.loop import train
from mixofshow.utils.config import ConfigError
from conftest import EMBEDDED, EMBEDDED_ARGS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "example.yaml"


def _no_constants(name):
    raise AssertionError(f"metrics.json holds the non-JSON constant {name}")


def test_train_writes_concept_checkpoints_logs_and_metrics(tmp_path, small_train_config):
    seen = []
    result = train(small_train_config(tmp_path), progress=seen.append)
    run = tmp_path / "run"
    assert result.steps == 4 and not result.stopped
    concept = load_concept(result.concept_path)
    assert concept.meta.words == ["<robot1>", "<robot2>"] and concept.meta.steps == 4
    assert concept.meta.optimizer == "adamw" and concept.meta.base_model == "embedded:tiny-sd"
    assert concept.meta.class_words == {"<robot1>": None, "<robot2>": "robot"}
    assert any(b.abs().max() > 0 for _, b in concept.lora.values())  # LoRA up moved away from 0
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*"))
    assert [p.step for p in seen if p.phase == "train"] == [1, 2, 3, 4]
    assert seen[-1].phase == "done"
    # contract 1 of the training API: metrics.json, strict JSON, rewritten at the end
    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=_no_constants)
    assert metrics == result.metrics
    assert metrics["name"] == "robot" and metrics["optimizer"] == "adamw"
    assert (metrics["steps"], metrics["max_steps"], metrics["stopped"], metrics["finished"]) == (4, 4, False, True)
    assert len(metrics["losses"]) == 4 and all(isinstance(x, float) for x in metrics["losses"])
    assert metrics["final_loss"] == metrics["losses"][-1]
    assert metrics["mean_loss_last_10"] == pytest.approx(sum(metrics["losses"]) / 4)
    assert 0 < metrics["optimizer_step_seconds"] < metrics["seconds_per_step"] < metrics["seconds"]
    assert metrics["peak_memory_mb"] > 0 and metrics["concept_path"] == str(result.concept_path)


def test_only_concept_rows_and_lora_change(tmp_path, small_train_config):
    from mixofshow.concepts.edlora import EDLoRA
    from mixofshow.models.embedded import build_embedded_pipeline

    result = train(small_train_config(tmp_path, **{"train.max_steps": 2}))
    pipe = build_embedded_pipeline()
    reference = build_embedded_pipeline()
    model = EDLoRA.from_concept(pipe, result.concept_path)
    emb = model.text_encoder.get_input_embeddings()
    assert torch.equal(emb.base.weight, reference.text_encoder.get_input_embeddings().weight)
    initial_class = reference.text_encoder.get_input_embeddings().weight[model.tokenizer("robot").input_ids[1]]
    assert not torch.allclose(model.embedding_parameter()[7:], initial_class.expand(7, -1))


def test_resume_matches_straight_run(tmp_path, small_train_config, checkpoint_weights):
    straight = train(small_train_config(tmp_path / "a"))
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2  # polled before each step: stop before step 3

    first = train(small_train_config(tmp_path / "b"), should_stop=stop_after_two)
    assert first.stopped and first.steps == 2 and first.concept_path is None
    resumed = train(small_train_config(tmp_path / "b"), resume=True)
    assert resumed.steps == 4
    a, b = checkpoint_weights(tmp_path / "a" / "run"), checkpoint_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert straight.metrics["final_loss"] == pytest.approx(resumed.metrics["final_loss"], abs=1e-6)
    # metrics cover the whole run, both sessions: every step's loss, the total time
    assert resumed.metrics["losses"] == pytest.approx(straight.metrics["losses"], abs=1e-6)
    assert resumed.metrics["mean_loss_last_10"] == pytest.approx(straight.metrics["mean_loss_last_10"], abs=1e-6)
    assert resumed.metrics["seconds"] > first.metrics["seconds"] > 0
    assert resumed.metrics["finished"] and not first.metrics["finished"] and first.metrics["losses"] == \
        pytest.approx(straight.metrics["losses"][:2], abs=1e-6)


def test_cli_train_with_overrides(tmp_path, capsys):
    code = main([
        "train", str(EXAMPLE), "--optimizer", "adamw", "--max-steps", "1", "--output-dir", str(tmp_path / "cli"),
        "--set", "validation.every=-1", "--set", "train.batch_size=1", *EMBEDDED_ARGS,
    ])
    assert code == 0
    assert "concept:" in capsys.readouterr().out
    assert (tmp_path / "cli" / "robot.safetensors").is_file()


def test_config_errors_name_the_key(tmp_path, small_train_config):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {concept_list: a.json}\nconcept: {words: ['<a1>']}\ntrain: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train: unknown key 'max_stepz'"):
        load_train_config(bad)
    bad.write_text("data: {concept_list: a.json}\nconcept: {words: ['<a1>']}\nlora: {rank: four}\n")
    with pytest.raises(ConfigError, match=r"lora\.rank: expected an integer"):
        load_train_config(bad)
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        train(small_train_config(tmp_path, **{"optimizer.name": "nope"}))
    assert main(["train", str(bad)]) == 2


def test_masked_loss_ignores_outside_of_mask():
    from mixofshow.train.losses import masked_mse

    pred, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    target[..., :, 4:] = 5.0  # error only on the right half
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1.0  # subject on the left half
    assert masked_mse(pred, target, mask) == 0.0
    assert masked_mse(pred, target, None) == pytest.approx(12.5)


def test_lr_schedule():
    from mixofshow.train.losses import lr_factor

    assert [lr_factor(s, 4, 0, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, 10, 4, "constant") == 0.25 and lr_factor(5, 10, 4, "constant") == 1.0
