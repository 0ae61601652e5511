"""The ED-LoRA training loop.

Reads top to bottom, as nanoGPT's ``train.py``: claim the run folder (``folder.py``), build the
run (``build.py``), maybe resume (``state.py``), then per step: the caller's requests (stop,
checkpoint, validate), the learning rate, forward/backward over the micro-batches
(``objective.py``), one fused finiteness check that is also the step's only host sync
(``finite.py``), clip, step, zero_grad, log, validate, checkpoint. At the end: the final
checkpoint, the concept file, validation samples and ``metrics.json``.

Every random draw of step ``t`` comes from generators seeded with ``(seed, t)``, so a run that
is stopped and resumed from a checkpoint repeats the straight run exactly. Under ``accelerate
launch`` the processes train data-parallel (``distributed.py``): each takes its share of every
batch, gradients are averaged after backward, requests are agreed, and only the main process
writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from mixofshow.concepts.io import save_concept
from mixofshow.optim.full_grad import clip_grad_norm_, finish_backward_
from mixofshow.train.build import Setup, build_run, make_accelerator, seeded
from mixofshow.train.checkpoint import checkpoint_path
from mixofshow.train.config import TrainConfig, check_config
from mixofshow.train.distributed import any_process, average_gradients, check_strategy, reduce_mean
from mixofshow.train.finite import NonFiniteError, measure_step
from mixofshow.train.folder import RunFolder, RunLock, claim_run_folder, clear_run, flatten_config
from mixofshow.train.objective import LossOptions, edlora_loss
from mixofshow.train.state import (
    OptimizerClock, RunState, build_metrics, recorded_seconds, restore_run, save_run, write_metrics,
)
from mixofshow.train.validation import run_validation
from mixofshow.utils.config import ConfigError, to_dict
from mixofshow.utils.io import atomic_write_text

__all__ = ["REQUESTS", "TrainProgress", "TrainResult", "train"]

log = logging.getLogger(__name__)

REQUESTS = ("stop", "checkpoint", "validate")  # what ``commands`` may ask for before a step


@dataclass
class TrainProgress:
    step: int  # optimizer steps done
    max_steps: int
    loss: float | None
    lr: float  # current UNet LoRA learning rate
    elapsed: float  # seconds since this call started
    phase: str = "train"  # "train", "validate", "checkpoint", "done", "stopped"
    path: str | None = None  # the checkpoint, sample folder or concept file just written


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    stopped: bool
    concept_path: Path | None = None
    last_checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # all train.max_steps done and the concept file written
    unchanged: bool = False  # resume of a run that had already finished: nothing was done


def train(
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    commands: Callable[[], Iterable[str]] | None = None,
) -> TrainResult:
    """Train one ED-LoRA concept as ``config`` says; returns where everything went.

    Args:
        progress: called after every step (and at validation / checkpoints) with a TrainProgress.
        should_stop: polled before every step; True is the request ``"stop"``.
        resume: continue the run in ``output_dir`` from its newest checkpoint; the config must
            match the saved one (``configs/README.md``, "Run folders and resuming").
        overwrite: replace the run in ``output_dir`` (its files are removed once this run is built).
        commands: polled before every step; returns requests: ``"stop"`` (write a checkpoint and
            return with ``stopped=True``), ``"checkpoint"`` (write one now and go on),
            ``"validate"`` (write validation samples now and go on).
    Raises:
        ConfigError: a bad config, or a folder holding another run (without resume / overwrite).
        NonFiniteError: a NaN or inf in the loss, gradients or weights (``train.nan_policy``).
    """
    check_config(config)
    _check_nan_keys(config)
    check_strategy(config.optimizer.name)  # DDP only: FSDP / DeepSpeed refused with the reason
    accelerator = make_accelerator(config)
    # the main process owns the folder while it trains: a second run into it is refused
    lock = RunLock(config.output_dir).acquire() if accelerator.is_main_process else None
    try:
        return _train_locked(config, accelerator, progress, should_stop, resume, overwrite, commands)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: TrainConfig, accelerator, progress, should_stop, resume: bool, overwrite: bool,
                  commands) -> TrainResult:
    folder = claim_run_folder(config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()  # every process has read the folder before the main one changes it
    if folder.finished:
        return _already_finished(folder, config)
    setup = build_run(config, accelerator)
    out = folder.path
    if accelerator.is_main_process:  # the only process that writes
        clear_run(folder)  # --overwrite: the old run goes only now that the new one is built
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()
    state = restore_run(setup, folder.checkpoint) if folder.checkpoint else RunState()
    if folder.checkpoint:
        state.seconds = max(state.seconds, recorded_seconds(out, state.step))
        log.info("resumed from %s (step %d)", folder.checkpoint, state.step)
    state.start_session()
    accelerator.init_trackers(config.name, config=_hparams(to_dict(config)))
    try:
        return _run(setup, state, folder, progress, should_stop, commands)
    finally:
        for tracker in accelerator.trackers:  # not end_training(): it would end the process group,
            tracker.finish()  # which later train() calls in a launched process still need


def _run(setup: Setup, state: RunState, folder: RunFolder, progress, should_stop, commands) -> TrainResult:
    config, accelerator, model = setup.config, setup.accelerator, setup.model
    t, out = config.train, folder.path
    started = time.perf_counter()
    result = TrainResult(output_dir=out, steps=state.step, stopped=False, last_checkpoint=folder.checkpoint)
    options = LossOptions(accelerator.device, config.data.use_masks, t.noise_offset, t.attention_reg_weight,
                          t.min_snr_gamma)
    groups = setup.check_groups()
    params = [p for group in groups.values() for p in group]
    check_grads = accelerator.scaler is None  # fp16: gradient overflows are the grad scaler's to skip
    clock = OptimizerClock(accelerator.device)
    lr = setup.set_lr(state.step)

    def report(phase: str, path: Path | None = None) -> None:
        if progress is not None:
            loss = next((x for x in reversed(state.losses) if x is not None), None)
            progress(TrainProgress(state.step, t.max_steps, loss, lr, time.perf_counter() - started, phase,
                                   None if path is None else str(path)))

    main = accelerator.is_main_process  # the only process that writes (and validates)

    def validate(step: int) -> Path | None:
        path = run_validation(model, config, step, accelerator.device, progress=main) if main else None
        accelerator.wait_for_everyone()
        return path

    def checkpoint() -> Path:
        clock.collect(state, wait=True)
        error = None
        path = checkpoint_path(out / "checkpoints", state.step)  # the main process's (shared file system)
        if main:
            try:
                path = save_run(setup, state)
            except NonFiniteError as err:  # the last update made a weight non-finite
                error = err
        if any_process(error is not None, accelerator.device):  # the same weights everywhere: all stop
            message = (f"{error or 'non-finite weights (see the main process)'}. The last finite checkpoint "
                       f"is kept ({result.last_checkpoint}); no concept file was written")
            if main:
                write_metrics(out, build_metrics(setup, state, stopped=False, concept_path=None, error=message))
            raise NonFiniteError(message, error.step if error else state.step) from None
        result.last_checkpoint = path
        if main:
            write_metrics(out, build_metrics(setup, state, stopped=False, concept_path=None))
        accelerator.wait_for_everyone()
        return path

    bar = tqdm(total=t.max_steps, initial=state.step, desc=f"train {config.name}",
               disable=not accelerator.is_main_process)
    setup.pipe.unet.train(), setup.pipe.text_encoder.train()
    try:
        for step in range(state.step, t.max_steps):
            # 1. the caller's requests, between steps
            wanted = _requests(commands, should_stop)
            if accelerator.num_processes > 1:  # agreed: what any process was asked, all do at this step
                wanted = {r for r in REQUESTS if any_process(r in wanted, accelerator.device)}
            if "validate" in wanted:
                report("validate", validate(step))
            if "checkpoint" in wanted or "stop" in wanted:
                report("checkpoint", checkpoint())
            if "stop" in wanted:
                result.stopped = True
                report("stopped", result.last_checkpoint)
                break
            # 2. learning rate; rank dropout draws from the global RNG, seeded per step
            tick = time.perf_counter()
            lr = setup.set_lr(step)
            ranks = (accelerator.process_index,) if accelerator.num_processes > 1 else ()  # own masks per process
            torch.manual_seed(seeded(config.seed, 3, step, *ranks).initial_seed())
            # 3. forward / backward over the micro-batches (gradients accumulate)
            loss, terms = _forward_backward(setup, step, options)
            if accelerator.num_processes > 1:
                # DDP: every process steps on the global batch's factor and embedding gradients
                # (G: in finish_backward_ below) and reports the global batch's loss
                average_gradients(params)
                names = sorted(terms)
                means = reduce_mean(torch.stack([loss, *(torch.as_tensor(terms[n]) for n in names)]))
                loss, terms = means[0], dict(zip(names, means[1:]))
            # 4. one check of loss terms, gradients and weights: the step's only host sync
            health = measure_step(loss, terms, groups, check_grads, {"norm": model.concept_mean_norm()})
            clock.collect(state)
            problem = health.problem()
            if problem is not None:
                _skip_or_stop(setup, state, result, step, problem, weights=health.weights_problem() is not None)
            else:
                # 5. freeze the embeddings once their mean norm reaches concept.freeze_norm (Mix-of-Show)
                limit = config.concept.freeze_norm
                if limit is not None and not state.embeddings_frozen and health.extra["norm"] >= limit:
                    state.embeddings_frozen = True
                    setup.freeze_embeddings()
                    log.info("concept embeddings reached mean norm %.3f: frozen", limit)
                # 6. clip, step, zero_grad
                finish_backward_(accelerator, setup.full_grads)  # all-reduce G; undo the fp16 loss scale (grads and G)
                if t.max_grad_norm is not None:
                    clip_grad_norm_(params, setup.full_grads, t.max_grad_norm)  # the norm includes G
                with clock.time(state):
                    setup.optimizer.step()
                if not state.embeddings_frozen:
                    setup.emb_optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
            setup.emb_optimizer.zero_grad(set_to_none=True)
            # 7. bookkeeping, logs, validation, checkpoints
            state.step = done = step + 1
            state.losses.append(None if problem else health.loss)
            state.timed_steps += 1
            state.step_seconds += time.perf_counter() - tick
            bar.update(1)
            if problem is None:
                bar.set_postfix(loss=f"{health.loss:.4f}", lr=f"{lr:.2e}")
                if t.log_every and done % t.log_every == 0:
                    accelerator.log({"loss": health.loss, "lr": lr, "embedding_norm": health.extra["norm"]}, step=done)
            report("train")
            if config.validation.every > 0 and done % config.validation.every == 0 and done < t.max_steps:
                report("validate", validate(done))
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.max_steps:
                report("checkpoint", checkpoint())
    finally:
        bar.close()

    if not result.stopped:
        checkpoint()
        result.concept_path = _save_concept(setup, state) if main else out / f"{config.name}.safetensors"
        if config.validation.every >= 0:
            validate(state.step)
        accelerator.wait_for_everyone()
        report("done", result.concept_path)
    state.update(accelerator.device)
    result.steps = state.step
    result.metrics = build_metrics(setup, state, stopped=result.stopped, concept_path=result.concept_path)
    result.finished = bool(result.metrics["finished"])
    if main:
        write_metrics(out, result.metrics)
    return result


def _forward_backward(setup: Setup, step: int, options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward of every micro-batch of ``step``; returns the loss and its terms averaged over them."""
    config, accelerator = setup.config, setup.accelerator
    n = config.train.gradient_accumulation_steps
    loss_sum, term_sums = torch.zeros((), device=accelerator.device), {}
    for micro in range(n):
        batch = setup.micro_batch(step, micro)
        gens = batch["noise_generators"]  # one per image (build.py): any split of the batch draws the same
        loss, terms = edlora_loss(setup.model, setup.noise_scheduler, batch, gens, options, accelerator.autocast())
        accelerator.backward(loss / n)
        loss_sum = loss_sum + loss.detach() / n
        for name, term in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + term.detach() / n
    return loss_sum, term_sums


def _requests(commands, should_stop) -> set[str]:
    wanted = set()
    if commands is not None:
        for request in commands() or ():
            if request not in REQUESTS:
                raise ValueError(f"Unknown training request {request!r}; expected one of {list(REQUESTS)}")
            wanted.add(request)
    if should_stop is not None and should_stop():
        wanted.add("stop")
    return wanted


def _skip_or_stop(setup: Setup, state: RunState, result: TrainResult, step: int, problem: str, weights: bool) -> None:
    """``train.nan_policy``: skip this step's update (return) or stop the run (raise)."""
    t = setup.config.train
    where = f"step {step + 1}: {problem}"
    if not weights and t.nan_policy == "skip-step" and state.skipped_steps < t.max_skipped_steps:
        state.skipped_steps += 1
        log.warning("%s; update skipped (train.nan_policy: skip-step, %d of at most %d)",
                    where, state.skipped_steps, t.max_skipped_steps)
        return
    if weights:
        why = "non-finite weights cannot be skipped"
    elif t.nan_policy == "skip-step":
        why = f"{state.skipped_steps} steps skipped already (train.max_skipped_steps: {t.max_skipped_steps})"
    else:
        why = "train.nan_policy: stop"
    kept = result.last_checkpoint or "none was written yet"
    message = (
        f"{where}; training stopped ({why}). The last finite checkpoint is kept ({kept}); no concept "
        "file was written. Lower the learning rate (optimizer.lr_*), or set train.nan_policy: "
        "skip-step to skip single bad steps"
    )
    state.update(setup.accelerator.device)
    if setup.accelerator.is_main_process:
        write_metrics(Path(setup.config.output_dir),
                      build_metrics(setup, state, stopped=False, concept_path=None, error=message))
    raise NonFiniteError(message, step + 1)


def _save_concept(setup: Setup, state: RunState) -> Path:
    config = setup.config
    path = Path(config.output_dir) / f"{config.name}.safetensors"
    meta = setup.model.meta(
        class_words={w: config.concept.class_words.get(w) for w in config.concept.words},
        optimizer=setup.spec.name,
        steps=state.step,
        replace_mapping=dict(config.data.replace_mapping),
        extra={"seed": config.seed, "rank_dropout": config.lora.rank_dropout,
               "optimizer_params": config.optimizer.params},
    )
    save_concept(path, setup.model.to_concept_file(meta))
    return path


def _already_finished(folder: RunFolder, config: TrainConfig) -> TrainResult:
    metrics = json.loads((folder.path / "metrics.json").read_text())
    log.warning("--resume: the run in %s already finished (%d of %d steps); nothing to do (raise "
                "train.max_steps to extend it)", folder.path, folder.saved_step, config.train.max_steps)
    concept = metrics.get("concept_path")
    return TrainResult(output_dir=folder.path, steps=folder.saved_step, stopped=False,
                       concept_path=Path(concept) if concept else None, last_checkpoint=folder.checkpoint,
                       metrics=metrics, finished=True, unchanged=True)


def _check_nan_keys(config: TrainConfig) -> None:
    value = config.train.max_skipped_steps
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.max_skipped_steps: expected an integer >= 0, got {value!r}")


def _hparams(tree: dict) -> dict[str, Any]:
    """The config as tensorboard hyper-parameters (scalars; anything else as its string)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten_config(tree).items()}
