"""Run training jobs in every process of an ``accelerate launch`` (tests/test_train_ddp.py).

    accelerate launch --multi_gpu --num_processes 2 -m tests.ddp_worker JOBS.json

``JOBS.json``: a list of ``{"overrides": {...}, "stop_after": N or null, "resume": bool}``; each
job trains ``configs/example.yaml`` with the overrides (stopping before step N+1 when asked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mixofshow.train.config import load_train_config
from mixofshow.train.loop import train

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"


def main(path: str) -> None:
    torch.set_num_threads(1)
    for job in json.loads(Path(path).read_text()):
        polls = {"n": 0}

        def should_stop(limit=job.get("stop_after")) -> bool:
            polls["n"] += 1
            return limit is not None and polls["n"] > limit

        train(load_train_config(EXAMPLE, job["overrides"]), should_stop=should_stop, resume=job.get("resume", False))
    if torch.distributed.is_initialized():  # an orderly teardown of gloo before the process exits
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
