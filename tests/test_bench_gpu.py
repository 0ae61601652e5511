"""``bench/gpu.py --tiny`` runs end to end on the CPU (so the GPU benchmark cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.usefixtures("one_thread")


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def run_tiny(monkeypatch, capsys, *argv: str) -> dict[str, list[dict[str, str]]]:
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    gpu.main(["--tiny", *argv])
    sections: dict[str, list[dict[str, str]]] = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith("#"):
            sections.setdefault(line.split()[0], []).append(_fields(line))
    return sections


def check(out: dict, precisions: list[str], optimizers: list[str], checkpointing: int, batches: int) -> None:
    train = out["train"]
    assert {(t["precision"], t["optimizer"]) for t in train} == {(p, o) for p in precisions for o in optimizers}
    assert len(train) == len(precisions) * len(optimizers) * checkpointing * batches
    assert all(float(t["step_s"]) > 0 for t in train)
    assert {t["ratio_to_adamw"] for t in train if t["optimizer"] == "adamw"} == {"1.000"}
    versus = out["edlora_vs_plain"]
    assert len(versus) == len(precisions) * checkpointing * batches
    assert all(1.0 < float(v["flop_bound"]) < 1.5 and v["within_10pct"] in ("yes", "no") for v in versus)
    assert len(out["sample"]) == len(precisions) * batches
    assert all(float(s["images_per_s"]) > 0 for s in out["sample"])
    assert len(out["fusion"]) == 1 and float(out["fusion"][0]["closed_form_s"]) > 0


def test_gpu_bench_tiny_prints_every_section(monkeypatch, capsys):
    out = run_tiny(monkeypatch, capsys, "--precisions", "bf16", "--checkpointing", "on", "--optimizers", "lracs",
                   "--batch-sizes", "1", "--steps", "1", "--warmup", "0", "--sample-steps", "2", "--concepts", "2")
    check(out, ["bf16"], ["adamw", "lracs"], checkpointing=1, batches=1)


@pytest.mark.slow
def test_gpu_bench_tiny_defaults_every_optimizer_and_precision(monkeypatch, capsys):
    from mixofshow.optim import SPECS

    out = run_tiny(monkeypatch, capsys, "--sample-steps", "3", "--concepts", "2")
    check(out, ["fp16", "bf16"], sorted(SPECS), checkpointing=2, batches=2)


def test_sd15_flop_bound_from_the_shipped_architecture(monkeypatch):
    """On the meta device (no memory, no time): SD 1.5's real shapes, 16 cross-attention layers."""
    monkeypatch.syspath_prepend(str(BENCH))
    from trainstep import Trainer, flop_ratio

    from mixofshow.models.embedded import build_preset_pipeline

    trainer = Trainer(build_preset_pipeline("sd15", "meta"))
    assert trainer.model.num_layers == 16
    ed, plain, ratio = flop_ratio(trainer, 1, 512)
    assert 3.0e12 < ed < 3.5e12 and ratio == pytest.approx(ed / plain) and 1.1 < ratio < 1.2
