"""Multi-process (data-parallel) training: strategy check, batch shares, gradient averaging, launch.

``accelerate launch -m mixofshow train CONFIG`` (or ``mixofshow train CONFIG --num-processes N``)
starts N copies of the training loop. They hold the same model and optimizer state (every
process builds it from the same seed and restores the same checkpoint), and train as DDP does
(README.md, "Multi-GPU and multi-node"):

- every step, the global batch of ``train.batch_size x N`` samples is drawn from the one seeded
  stream; process ``r`` takes samples ``r*b .. r*b+b-1`` (:func:`batch_share`), and each
  sample's augmentation, VAE sample, noise and timestep come from generators keyed by its place
  in the stream, so N processes with batch b see exactly what one process with batch ``N*b``
  (or batch b and N accumulation steps) sees;
- after backward, every gradient is averaged over the processes: the LoRA factors' and the
  embeddings' (:func:`average_gradients`), and the full weight gradient ``G`` of the optimizers
  that read it, as G itself, since the row/column statistics of a sum are not sums of
  statistics (``FullGradients.all_reduce_`` in :func:`mixofshow.optim.full_grad.finish_backward_`);
  the loss is a mean over images, so the average of the processes' gradients is the gradient of
  the global batch, and every process then takes the same optimizer step;
- only the main process writes (checkpoints, logs, samples, the concept file, metrics).

Sharded strategies are refused (:func:`check_strategy`): the LoRA parameters and their optimizer
state are megabytes, so there is nothing worth sharding, and FSDP and DeepSpeed flatten
parameters into shards, which breaks every optimizer that needs a factor's matrix shape.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from mixofshow.utils.config import ConfigError

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "average_gradients",
    "any_process",
    "end_process_group",
    "reduce_mean",
    "batch_share",
    "check_strategy",
    "launch_command",
    "launch",
    "in_launched_process",
]

# optimizers whose update treats every parameter entry on its own (no factor matrix shape);
# every other registered optimizer reads A (r x n) and B (m x r) as matrices
ELEMENTWISE_OPTIMIZERS = frozenset({"adamw", "loraplus"})
_BUCKET_ELEMENTS = 1 << 24  # 64 MB of float32 per all-reduce, as DDP's buckets


def _env_flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").strip().lower() in {"1", "true", "yes", "on"}


def check_strategy(optimizer: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse FSDP and DeepSpeed setups (``accelerate launch --use_fsdp / --use_deepspeed`` or an
    accelerate config asking for them), with the reason; DDP and single-process pass."""
    env = os.environ if env is None else env
    if _env_flag(env, "ACCELERATE_USE_FSDP"):
        strategy = "FSDP"
    elif _env_flag(env, "ACCELERATE_USE_DEEPSPEED"):
        strategy = f"DeepSpeed ZeRO-{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    else:
        return
    if optimizer in ELEMENTWISE_OPTIMIZERS:
        why = "mixofshow trains LoRA data-parallel only"
    else:
        why = (f"optimizer {optimizer!r} needs each LoRA factor as a matrix (A: r x n, B: m x r), and "
               f"{strategy} flattens parameters and shards them across processes, so no process holds a factor whole")
    raise ConfigError(
        f"accelerate is set up for {strategy}: {why}. The LoRA parameters and their optimizer state are a few "
        "MB, so there is nothing worth sharding: DDP is the right strategy. Launch with "
        "`accelerate launch --multi_gpu --num_processes N -m mixofshow train CONFIG` or "
        "`mixofshow train CONFIG --num-processes N` (and no FSDP/DeepSpeed in the accelerate config)."
    )


def batch_share(batch_size: int, rank: int) -> range:
    """The positions in the global batch (``batch_size`` per process) that process ``rank`` takes."""
    return range(rank * batch_size, (rank + 1) * batch_size)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (a stop request must stop all at one step)."""
    if _world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over all processes (itself in a single process)."""
    world = _world()
    if world == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / world


def end_process_group() -> None:
    """End the process group of a launched run (the training loop leaves it up for later runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` of ``params`` over all processes (the LoRA factors' and the embeddings').

    The full gradients G have their own all-reduce with the same averaging
    (:func:`mixofshow.optim.full_grad.finish_backward_`). Which gradients exist is agreed first
    (one tiny all-reduce): one present on some process only counts as zero elsewhere, and one
    present nowhere stays None (its optimizer skips it, as in a single process). Then the
    gradients go through all-reduces of up to 64 MB each. Does nothing in a single process.
    """
    world = _world()
    if world == 1 or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    tensors = []
    for p, here in zip(params, present.tolist()):
        if here:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tensors.append(p.grad)
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1).float() for t in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _buckets(tensors: Iterable[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > _BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def in_launched_process(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by ``accelerate launch`` / ``torchrun`` with several processes."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1") or 1) > 1


def launch_command(num_processes: int, module_args: Sequence[str], module: str = "mixofshow") -> list[str]:
    """``accelerate launch`` running ``python -m <module> <module_args>`` in ``num_processes``
    processes on this machine (GPUs when there are, else CPU processes with gloo)."""
    if num_processes < 2:
        raise ValueError(f"--num-processes: expected an integer >= 2, got {num_processes}")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no",  # the config's train.mixed_precision decides (passed to Accelerator)
        "--dynamo_backend", "no",
        "-m", module, *module_args,
    ]


def launch(num_processes: int, module_args: Sequence[str], module: str = "mixofshow") -> int:
    """Run :func:`launch_command` and wait; returns its exit status."""
    return subprocess.call(launch_command(num_processes, module_args, module))
