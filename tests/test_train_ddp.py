"""Data-parallel training (accelerate launch, 2 CPU processes with gloo) equals one process.

2 processes with per-process batch 1 must end, after 3 steps, with the weights of 1 process with
batch 1 and 2 accumulation steps, which sums the same per-sample gradients in the same order
(float32, 1e-5), and with those of 1 process with batch 2, which sums them in another order.

That second comparison is only as sharp as float32 allows: from LoRA's zero-initialised B, most
matrix optimizers turn rounding into visible differences within 3 steps even in one process
(their preconditioners, lifts and unmagnified gradients divide by B's small singular values,
Adam-type steps normalise tiny gradient entries). So each optimizer's *floor* is measured here:
one process with batch 2, run with 1 and with 2 threads (nothing but the summation order
differs). The 2-process run must be within 1e-5 of batch 2 where the floor allows it, else within
4x the floor; and a *control*, one process with only half the batch (a wrong share of the data or
a wrong average), must be at least 3x farther than that bound, so the comparison can see the
errors it is there to catch. The sweep over every registered optimizer is slow; the default suite
keeps AdamW, scaled GD (not scale-invariant like Adam, so a wrong average shows) and one
full-gradient optimizer, and the stop/resume checks.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mixofshow.cli import main
from mixofshow.optim import SPECS
from mixofshow.train.config import load_train_config
from mixofshow.train.distributed import check_strategy, launch_command
from mixofshow.train.loop import train
from mixofshow.utils.config import ConfigError
from mixofshow.utils.io import load_safetensors
from conftest import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "example.yaml"
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(out: Path, optimizer: str, batch: int, steps: int = STEPS, **extra) -> dict:
    return {**EMBEDDED, "output_dir": str(out), "optimizer.name": optimizer, "train.batch_size": batch,
            "train.max_steps": steps, "train.checkpoint_every": 0, "validation.every": -1,
            "train.device": "cpu", "lora.rank_dropout": 0.0, **extra}


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((run / "checkpoints").iterdir())
    return load_safetensors(ckpts[-1] / "trainable.safetensors")[0]


def max_difference(a: Path, b: Path) -> tuple[float, str]:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = {key: float((wa[key] - wb[key]).abs().max()) for key in wa}
    worst = max(diff, key=diff.get)
    return diff[worst], worst


def assert_same(a: Path, b: Path, atol: float = 1e-5) -> None:
    diff, worst = max_difference(a, b)
    assert diff <= atol, f"{worst}: max |difference| {diff:.3g}"


def launch_jobs(tmp: Path, jobs: list[dict]) -> None:
    path = tmp / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    done = subprocess.run(launch_command(2, [str(path)], module="tests.ddp_worker"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def sweep(tmp: Path, optimizers: list[str], resume_check: bool) -> dict[str, dict[str, float]]:
    jobs = [{"overrides": overrides(tmp / f"ddp-{o}", o, 1)} for o in optimizers]
    if resume_check:  # straight 2-process run (4 steps) and one stopped after 2, resumed
        jobs += [{"overrides": overrides(tmp / "straight", "adamw", 1, 4)},
                 {"overrides": overrides(tmp / "resumed", "adamw", 1, 4), "stop_after": 2},
                 {"overrides": overrides(tmp / "resumed", "adamw", 1, 4), "resume": True}]
    launch_jobs(tmp, jobs)
    found = {}
    for o in optimizers:
        def run(name: str, batch: int, threads: int = 1, **extra) -> Path:
            torch.set_num_threads(threads)
            try:
                train(load_train_config(EXAMPLE, overrides(tmp / f"{name}-{o}", o, batch, **extra)))
            finally:
                torch.set_num_threads(1)
            return tmp / f"{name}-{o}"

        ddp = tmp / f"ddp-{o}"
        batch2 = run("one", 2)
        found[o] = {
            "floor": max_difference(batch2, run("threads", 2, threads=2))[0],
            "batch2": max_difference(ddp, batch2)[0],
            "accumulated": max_difference(ddp, run("acc", 1, **{"train.gradient_accumulation_steps": 2}))[0],
            "half": max_difference(ddp, run("half", 1))[0],
        }
    for o, d in found.items():
        bound = max(1e-5, 4 * d["floor"])
        # the same sums: 1e-5 (measured 0 for the factor-gradient optimizers; adams-full's G sums
        # each backward's products into one buffer, an association DDP's all-reduce does not share)
        assert d["accumulated"] <= max(1e-5, 0.1 * d["floor"]), (o, d)
        assert d["batch2"] <= bound, (o, d)
        assert d["half"] >= 3 * bound, (o, d)  # the bound resolves a wrong share of the batch
    return found


def test_two_processes_equal_one_with_double_batch_and_resume(tmp_path):
    sweep(tmp_path, ["adamw", "scaled_gd", "adams-full"], resume_check=True)
    assert_same(tmp_path / "straight", tmp_path / "resumed")
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(list((tmp_path / "resumed").glob("*.safetensors"))) == 1
    # the 2-process checkpoint resumed by 1 process with the same global batch (2) goes on exactly
    stopped = tmp_path / "stopped"
    train(load_train_config(EXAMPLE, overrides(stopped, "adamw", 2, 4)), should_stop=iter([0, 0, 1]).__next__)
    train(load_train_config(EXAMPLE, overrides(stopped, "adamw", 2, 4)), resume=True)
    assert_same(tmp_path / "straight", stopped)


@pytest.mark.slow
def test_every_optimizer_two_processes_equal_one(tmp_path):
    found = sweep(tmp_path, sorted(SPECS), resume_check=False)
    for o, d in found.items():  # the figures the README quotes (pytest -s shows them)
        print(f"{o}: " + ", ".join(f"{k} {v:.2g}" for k, v in d.items()))


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true"}, r"FSDP flattens parameters"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, r"DeepSpeed ZeRO-3 flattens"),
])
def test_sharded_strategies_are_refused_with_the_reason(tmp_path, monkeypatch, capsys, env, match):
    with pytest.raises(ConfigError, match=r"optimizer 'lracs' needs each LoRA factor as a matrix"):
        check_strategy("lracs", env)
    with pytest.raises(ConfigError, match=match):
        check_strategy("stella", env)
    with pytest.raises(ConfigError, match="DDP is the right strategy"):
        check_strategy("adamw", env)
    check_strategy("lracs", {})  # single process / DDP: fine
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["train", str(EXAMPLE), "--optimizer", "scaled_gd", "--output-dir", str(tmp_path / "x")])
    assert code == 2 and "needs each LoRA factor as a matrix" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_num_processes_launches_accelerate_with_this_commands_arguments(monkeypatch):
    from mixofshow.train import distributed

    seen = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", str(EXAMPLE), "--num-processes", "3", "--max-steps", "5", "--resume",
                 "--set", "lora.rank=8", "--set", "train.batch_size=1"]) == 0
    (cmd,) = seen
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mixofshow", "train",
                       str(EXAMPLE), "--max-steps", "5", "--resume", "--set", "lora.rank=8",
                       "--set", "train.batch_size=1"]
    assert main(["train", str(EXAMPLE), "--num-processes", "0"]) == 2
