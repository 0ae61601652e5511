"""Run folders belong to one run: refusal, --overwrite, resume checks; requests between steps."""

from __future__ import annotations

import json

import pytest
import torch

from mixofshow.cli import main
from mixofshow.train.config import TrainConfig
from mixofshow.train.folder import RunLock, config_differences
from mixofshow.train.loop import train
from mixofshow.utils.config import ConfigError, to_dict

EXAMPLE_ARGS = ["--max-steps", "2", "--set", "validation.every=-1", "--set", "train.checkpoint_every=1"]


def _files(run):
    """Every file of a run folder with its bytes and modification time (not the lock's holder note)."""
    return {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != RunLock.NAME}


def test_a_new_run_into_a_used_folder_is_refused_and_changes_nothing(tmp_path, small_train_config, capsys):
    config = small_train_config(tmp_path, **{"train.max_steps": 2})
    train(config)
    run = tmp_path / "run"
    before = _files(run)
    with pytest.raises(ConfigError, match=r"already holds a run \(config\.yaml, metrics\.json, checkpoints.*--resume.*--overwrite"):
        train(config)
    from conftest import EXAMPLE_TRAIN_CONFIG

    assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), *EXAMPLE_ARGS]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _files(run) == before


def test_overwrite_replaces_the_old_run_and_only_its_files(tmp_path, small_train_config):
    (tmp_path / "run" / "logs").mkdir(parents=True)  # no run state: not a reason to refuse
    (tmp_path / "run" / "config.yaml").write_text("name: mine\n")
    train(small_train_config(tmp_path, **{"train.max_steps": 4, "name": "old", "train.checkpoint_every": 1,
                                          "train.keep_checkpoints": 4}))
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    result = train(small_train_config(tmp_path, **{"train.max_steps": 2}), overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]  # none of the old run's
    assert not (run / "old.safetensors").exists() and result.concept_path == run / "robot.safetensors"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="exclude each other"):
        train(small_train_config(tmp_path), overwrite=True, resume=True)


def test_overwrite_keeps_the_old_run_when_the_new_config_fails_to_build(tmp_path, small_train_config):
    train(small_train_config(tmp_path, **{"train.max_steps": 1}))
    before = _files(tmp_path / "run")
    with pytest.raises(ValueError, match="nope"):
        train(small_train_config(tmp_path, **{"optimizer.name": "nope"}), overwrite=True)
    assert _files(tmp_path / "run") == before


def test_resume_names_every_key_that_differs(tmp_path, small_train_config):
    stops = iter([False, True])
    train(small_train_config(tmp_path), should_stop=lambda: next(stops))
    changed = small_train_config(tmp_path, **{"lora.rank": 8, "optimizer.lr_unet": 0.001, "train.max_steps": 6})
    with pytest.raises(ConfigError) as err:
        train(changed, resume=True)
    message = str(err.value)
    assert "lora.rank: saved 4, now 8" in message and "optimizer.lr_unet: saved 0.0001, now 0.001" in message
    assert "max_steps" not in message.split("a resume may change only")[0]  # allowed to change
    assert "checkpoints/step_000001" in message


def test_config_differences_ignore_what_a_resume_may_change(small_train_config, tmp_path):
    saved = to_dict(small_train_config(tmp_path))
    same = to_dict(small_train_config(tmp_path, **{"train.max_steps": 9, "validation.every": 3,
                                                   "train.checkpoint_every": 7, "train.nan_policy": "skip-step"}))
    assert config_differences(saved, same) == []
    other = to_dict(small_train_config(tmp_path, **{"optimizer.params": {"betas": [0.8, 0.9]}, "seed": 3}))
    assert config_differences(saved, other) == [
        "optimizer.params: saved {}, now {'betas': [0.8, 0.9]}",
        "seed: saved 0, now 3",
    ]
    del saved["concept"]["init_std"]  # a key the saving version did not have is not compared
    assert config_differences(saved, to_dict(small_train_config(tmp_path, **{"concept.init_std": 0.1}))) == []


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, small_train_config, capsys):
    from conftest import EXAMPLE_TRAIN_CONFIG

    run = tmp_path / "run"
    assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), *EXAMPLE_ARGS]) == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(run), *EXAMPLE_ARGS, "--resume"]) == 0
    assert "already finished (2 of 2 steps); nothing changed" in capsys.readouterr().out
    assert _files(run) == before
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["finished"] and metrics["final_loss"] is not None


def test_resume_extends_a_finished_run_and_metrics_accumulate(tmp_path, small_train_config):
    first = train(small_train_config(tmp_path, **{"train.max_steps": 2, "train.lr_schedule": "constant"}))
    more = train(small_train_config(tmp_path, **{"train.max_steps": 3, "train.lr_schedule": "constant"}), resume=True)
    straight = train(small_train_config(tmp_path / "b", **{"train.max_steps": 3, "train.lr_schedule": "constant"}))
    assert more.steps == 3 and more.finished and not more.unchanged
    assert more.metrics["losses"][:2] == first.metrics["losses"]
    assert more.metrics["losses"] == pytest.approx(straight.metrics["losses"], abs=1e-6)
    assert more.metrics["seconds"] > first.metrics["seconds"]


def test_resume_cannot_go_back_below_the_steps_done(tmp_path, small_train_config):
    train(small_train_config(tmp_path, **{"train.max_steps": 2}))
    with pytest.raises(ConfigError, match=r"train\.max_steps: .* done 2 steps.* got 1"):
        train(small_train_config(tmp_path, **{"train.max_steps": 1}), resume=True)


def test_requests_checkpoint_validate_and_stop_between_steps(tmp_path, small_train_config):
    asked = iter([[], ["checkpoint"], ["validate"], ["stop"]])
    seen = []
    config = small_train_config(tmp_path, **{"train.checkpoint_every": 0, "validation.prompts": ["<robot1> <robot2>"],
                                             "validation.lora_scales": [1.0], "validation.num_images": 1,
                                             "validation.steps": 1, "train.keep_checkpoints": 5})
    result = train(config, progress=seen.append, commands=lambda: next(asked))
    run = tmp_path / "run"
    assert result.stopped and result.steps == 3 and result.concept_path is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000003"]
    assert list((run / "samples" / "step_000002").rglob("*.png"))
    assert [p.phase for p in seen if p.phase != "train"] == ["checkpoint", "validate", "checkpoint", "stopped"]
    with pytest.raises(ValueError, match=r"Unknown training request 'pause'"):
        train(small_train_config(tmp_path / "b"), commands=lambda: ["pause"])


def test_concept_init_std_sets_the_random_initialisation(tmp_path, small_train_config):
    from mixofshow.train.build import build_run, make_accelerator

    config: TrainConfig = small_train_config(tmp_path, **{"concept.init_std": 0.5})
    setup = build_run(config, make_accelerator(config))
    rows = setup.model.embedding_parameter().detach()
    random_word = setup.model.token_ids["<robot1>"]  # no class word: drawn from N(0, init_std^2)
    start = setup.model.text_encoder.get_input_embeddings().num_base
    std = rows[[i - start for i in random_word]].std()
    assert 0.4 < float(std) < 0.6


def test_attention_processors_are_chosen_after_the_model_is_on_its_device(tmp_path, small_train_config, monkeypatch):
    """The xformers branch of default_attention_processor is only reachable when the UNet is
    already on CUDA at installation: the build must move the pipeline first."""
    import mixofshow.concepts.attention as attention
    from mixofshow.train import build

    moved, seen = [], []
    real_load, real_default = build.load_pipeline, attention.default_attention_processor

    def load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        real_to = pipe.to
        pipe.to = lambda *a, **k: (moved.append(a or k), real_to(*a, **k))[1]
        return pipe

    monkeypatch.setattr(build, "load_pipeline", load)
    monkeypatch.setattr(attention, "default_attention_processor",
                        lambda device=None: (seen.append(bool(moved)), real_default(device))[1])
    config = small_train_config(tmp_path)
    build.build_run(config, build.make_accelerator(config))
    assert seen and all(seen)  # every processor was chosen after pipe.to(device)
    assert torch.device(moved[0][0]).type == build.make_accelerator(config).device.type


def test_a_saved_optimizer_state_that_does_not_fit_is_a_clear_error(tmp_path, small_train_config):
    from mixofshow.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    stops = iter([False, True])
    train(small_train_config(tmp_path), should_stop=lambda: next(stops))
    path = latest_checkpoint(tmp_path / "run" / "checkpoints")
    ckpt = load_checkpoint(path, restore_rng=False)
    ckpt.state["optimizer"]["param_groups"] = ckpt.state["optimizer"]["param_groups"][:1]  # stale: a group short
    save_checkpoint(path.parent, ckpt.step, ckpt.trainable, {k: v for k, v in ckpt.state.items() if k != "rng"})
    with pytest.raises(ConfigError, match=r"step_000001: the saved optimizer state does not fit this run"):
        train(small_train_config(tmp_path), resume=True)


def test_a_folder_in_use_by_a_training_run_is_refused(tmp_path, small_train_config, capsys):
    """Two runs started into the same (new) folder: the second is refused naming the holder."""
    config = small_train_config(tmp_path, **{"train.max_steps": 2})
    with RunLock(tmp_path / "run"):  # what a training process holds while it runs
        with pytest.raises(ConfigError, match=r"in use by a run that is still training \(pid \d+ on .*another --output-dir"):
            train(config)
        with pytest.raises(ConfigError, match="in use"):
            train(config, overwrite=True)
        from conftest import EXAMPLE_TRAIN_CONFIG

        assert main(["train", EXAMPLE_TRAIN_CONFIG, "--output-dir", str(tmp_path / "run"), *EXAMPLE_ARGS]) == 2
        assert "in use by a run that is still training" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert train(config).finished  # released: the folder is free again
