"""The ED-LoRA training loop.

Reads top to bottom: build (model, data, optimizers), maybe resume, then per step: lr, forward /
backward over micro-batches, clip, step, zero_grad, freeze check, log, validate, checkpoint.
Every random draw of step ``t`` comes from generators seeded with ``(seed, t)``, so a run that
is stopped and resumed from a checkpoint repeats the straight run exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from mixofshow.concepts.edlora import EDLoRA, LoRAConfig
from mixofshow.concepts.io import save_concept
from mixofshow.data import ConceptDataset, collate, load_concept_list
from mixofshow.models.loading import load_pipeline
from mixofshow.optim import get_spec
from mixofshow.optim.groups import enable_full_grad, lora_param_groups
from mixofshow.optim.registry import build_optimizer
from mixofshow.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from mixofshow.train.config import TrainConfig, check_config
from mixofshow.train.losses import attention_outside_mask, lr_factor, masked_mse, offset_noise
from mixofshow.train.validation import run_validation
from mixofshow.utils.config import ConfigError, to_dict
from mixofshow.utils.io import atomic_write_text

__all__ = ["TrainProgress", "TrainResult", "train"]

log = logging.getLogger(__name__)


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


def _seeded(seed: int, *keys: int) -> torch.Generator:
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class _Run:
    """Everything built from a config: models, data, optimizers (on the accelerator's device)."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.spec = get_spec(config.optimizer.name)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)
        pipe = load_pipeline(config.base_model, dtype=weight_dtype, config=config.base_model_config)
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            module.requires_grad_(False)
        c, lc = config.concept, config.lora
        self.model = EDLoRA(
            pipe,
            c.words,
            init={w: c.class_words.get(w) for w in c.words},
            lora=LoRAConfig(lc.rank, lc.scale, lc.rank_dropout, self.spec.factorization, lc.text_encoder, lc.unet),
            generator=_seeded(config.seed, 0),
        )
        self.pipe = pipe.to(accelerator.device)
        if config.train.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.text_encoder.gradient_checkpointing_enable()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.dataset = ConceptDataset(
            load_concept_list(config.data.concept_list),
            config.data.replace_mapping,
            config.data.resolution,
            shuffle_tags=config.data.shuffle_tags,
            flip_p=config.data.flip_p,
            use_masks=config.data.use_masks,
            **({} if config.data.templates else {"templates": None}),
        )
        components = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
        lrs = {"text_encoder": config.optimizer.lr_text_encoder, "unet": config.optimizer.lr_unet}
        groups = [g for g in lora_param_groups(components, lrs) if g.get("pairs") or g.get("triples")]
        if not groups:
            raise ConfigError("lora: both text_encoder and unet are off; nothing to train with the optimizer")
        enable_full_grad(components, self.spec.needs_full_grad)
        optimizer = build_optimizer(self.spec.name, groups, **config.optimizer.params)
        embedding = self.model.embedding_parameter()
        emb_optimizer = torch.optim.AdamW(
            [embedding], lr=config.optimizer.lr_embedding, weight_decay=config.optimizer.weight_decay_embedding
        )
        self.optimizer, self.emb_optimizer = accelerator.prepare(optimizer, emb_optimizer)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in (self.optimizer, self.emb_optimizer)]
        self.embeddings_frozen = False

    # -- trainable state -------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {"embeddings.new": self.model.embedding_parameter()}
        for name, layer in self.model.all_layers().items():
            for pname, p in layer.named_parameters(recurse=False):
                params[f"{name}.{pname}"] = p
        return params

    def set_lr(self, step: int) -> float:
        t = self.config.train
        factor = lr_factor(step, t.max_steps, t.warmup_steps, t.lr_schedule)
        for opt, base in zip((self.optimizer, self.emb_optimizer), self.base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor
        return self.config.optimizer.lr_unet * factor

    # -- one step ----------------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        t = self.config.train
        n = len(self.dataset)
        indices, generators = [], []
        for j in range(t.batch_size):
            k = (step * t.gradient_accumulation_steps + micro) * t.batch_size + j  # sample counter
            perm = torch.randperm(n, generator=_seeded(self.config.seed, 1, k // n))
            indices.append(int(perm[k % n]))
            generators.append(_seeded(self.config.seed, 2, k))
        return collate([self.dataset.get(i, g) for i, g in zip(indices, generators)])

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        device, pipe, model = self.accelerator.device, self.pipe, self.model
        vae_dtype = next(pipe.vae.parameters()).dtype
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, vae_dtype)
            dist = pipe.vae.encode(pixels).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            latents = (latents * pipe.vae.config.scaling_factor).float()
        noise = offset_noise(latents, self.config.train.noise_offset, gen)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        ids = model.encoder.tokenize(batch["prompt"])
        reg_weight = self.config.train.attention_reg_weight
        for proc in model.processors:
            proc.store_attention = reg_weight > 0
        with self.accelerator.autocast():
            context = model.encoder.encode_ids(ids)
            pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, context).sample
        mask = batch["mask"].to(device) if self.config.data.use_masks else None
        loss = masked_mse(pred, target, mask)
        if reg_weight > 0:
            loss = loss + reg_weight * self.attention_reg(ids, batch["mask"].to(device), latents.shape[-2:])
        return loss

    def attention_reg(self, ids: torch.Tensor, mask: torch.Tensor, latent_hw) -> torch.Tensor:
        num_base = self.model.text_encoder.get_input_embeddings().num_base
        per_layer = ids.view(-1, self.model.num_layers, ids.shape[-1]).to(mask.device) >= num_base
        terms = [
            attention_outside_mask(proc.last_attention, per_layer[:, proc.index], mask, tuple(latent_hw))
            for proc in self.model.processors
        ]
        for proc in self.model.processors:
            proc.last_attention = None
        return torch.stack(terms).mean()

    def maybe_freeze_embeddings(self) -> None:
        limit = self.config.concept.freeze_norm
        if limit is not None and not self.embeddings_frozen and float(self.model.concept_mean_norm()) >= limit:
            self.embeddings_frozen = True
            self.model.embedding_parameter().requires_grad_(False)
            log.info("concept embeddings reached mean norm %.3f: frozen", limit)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "emb_optimizer": self.emb_optimizer.state_dict(),
            "embeddings_frozen": self.embeddings_frozen,
            "optimizer_name": self.spec.name,
            "lr_schedule": {"name": self.config.train.lr_schedule, "max_steps": self.config.train.max_steps,
                            "warmup_steps": self.config.train.warmup_steps, "next_step": step},
            "config": to_dict(self.config),
        }
        trainable = {k: v.detach() for k, v in self.trainable().items()}
        folder = Path(self.config.output_dir) / "checkpoints"
        path = save_checkpoint(folder, step, trainable, state)
        prune_checkpoints(folder, self.config.train.keep_checkpoints)
        return path

    def restore(self, path: Path) -> int:
        ckpt = load_checkpoint(path)
        saved_name = ckpt.state.get("optimizer_name")
        if saved_name != self.spec.name:
            raise ConfigError(
                f"{path}: checkpoint was trained with optimizer {saved_name!r}, the config asks for "
                f"{self.spec.name!r}; resume with the same optimizer or start a new output_dir"
            )
        params = self.trainable()
        if set(params) != set(ckpt.trainable):
            odd = sorted(set(params) ^ set(ckpt.trainable))[0]
            raise ConfigError(f"{path}: checkpoint does not match the configured model (parameter {odd!r})")
        with torch.no_grad():
            for name, p in params.items():
                saved = ckpt.trainable[name]
                if saved.shape != p.shape:
                    raise ConfigError(f"{path}: {name!r} has shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
                p.copy_(saved)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.emb_optimizer.load_state_dict(ckpt.state["emb_optimizer"])
        self.embeddings_frozen = bool(ckpt.state["embeddings_frozen"])
        self.model.embedding_parameter().requires_grad_(not self.embeddings_frozen)
        return ckpt.step


def train(
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train one ED-LoRA concept as ``config`` says; returns where everything went.

    Args:
        progress: called after every step (and at validation / checkpoints) with a TrainProgress.
        should_stop: polled before every step; when it returns True a checkpoint is written and
            the call returns with ``stopped=True`` (resume later with ``resume=True``).
        resume: continue from the newest checkpoint in ``output_dir/checkpoints``.
    """
    check_config(config)
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = config.train
    cpu = t.device == "cpu" or (t.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, cpu=cpu, log_with="tensorboard", project_dir=str(out / "logs")
    )
    run = _Run(config, accelerator)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

    start = 0
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", out / "checkpoints")
    if ckpt is not None:
        start = run.restore(ckpt)
        log.info("resumed from %s (step %d)", ckpt, start)
    accelerator.init_trackers(config.name, config=_flat_hparams(to_dict(config)))

    def report(step, loss, lr, phase="train", path=None):
        if progress is not None:
            progress(TrainProgress(step, t.max_steps, loss, lr, time.perf_counter() - started, phase, path))

    result = TrainResult(output_dir=out, steps=start, stopped=False, last_checkpoint=ckpt)
    params = list(run.trainable().values())
    bar = tqdm(total=t.max_steps, initial=start, desc=f"train {config.name}", disable=not accelerator.is_main_process)
    losses: list[float] = []
    unet, text_encoder = run.pipe.unet, run.pipe.text_encoder
    unet.train(), text_encoder.train()
    for step in range(start, t.max_steps):
        if should_stop is not None and should_stop():
            result.last_checkpoint, result.stopped = run.save(step), True
            report(step, losses[-1] if losses else None, run.set_lr(step), "stopped", str(result.last_checkpoint))
            break
        lr = run.set_lr(step)
        torch.manual_seed(_seeded(config.seed, 3, step).initial_seed())  # rank dropout draws
        total = 0.0
        for micro in range(t.gradient_accumulation_steps):
            batch = run.micro_batch(step, micro)
            loss = run.loss(batch, _seeded(config.seed, 4, step, micro)) / t.gradient_accumulation_steps
            accelerator.backward(loss)
            total += loss.detach()
        if t.max_grad_norm is not None:
            accelerator.clip_grad_norm_([p for p in params if p.grad is not None], t.max_grad_norm)
        run.optimizer.step()
        if not run.embeddings_frozen:
            run.emb_optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.emb_optimizer.zero_grad(set_to_none=True)
        run.maybe_freeze_embeddings()
        loss_value = float(total)  # one host sync per step, for logging
        losses.append(loss_value)
        done = step + 1
        result.steps = done
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if t.log_every and done % t.log_every == 0:
            accelerator.log({"loss": loss_value, "lr": lr, "embedding_norm": float(run.model.concept_mean_norm())}, step=done)
        report(done, loss_value, lr)
        v = config.validation
        if v.every > 0 and done % v.every == 0 and done < t.max_steps:
            folder = run_validation(run.model, config, done, accelerator.device)
            report(done, loss_value, lr, "validate", str(folder))
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.max_steps:
            result.last_checkpoint = run.save(done)
            report(done, loss_value, lr, "checkpoint", str(result.last_checkpoint))
    bar.close()

    if not result.stopped:
        result.last_checkpoint = run.save(result.steps)
        result.concept_path = out / f"{config.name}.safetensors"
        meta = run.model.meta(
            class_words={w: config.concept.class_words.get(w) for w in config.concept.words},
            optimizer=run.spec.name,
            steps=result.steps,
            replace_mapping=dict(config.data.replace_mapping),
            extra={"seed": config.seed, "rank_dropout": config.lora.rank_dropout,
                   "optimizer_params": config.optimizer.params},
        )
        save_concept(result.concept_path, run.model.to_concept_file(meta))
        if config.validation.every >= 0:
            run_validation(run.model, config, result.steps, accelerator.device)
        report(result.steps, losses[-1] if losses else None, 0.0, "done", str(result.concept_path))
    result.metrics = {
        "name": config.name,
        "optimizer": run.spec.name,
        "steps": result.steps,
        "stopped": result.stopped,
        "seconds": round(time.perf_counter() - started, 3),
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "embeddings_frozen": run.embeddings_frozen,
        "concept_path": str(result.concept_path) if result.concept_path else None,
    }
    atomic_write_text(out / "metrics.json", json.dumps(result.metrics, indent=2))
    accelerator.end_training()
    return result


def _flat_hparams(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
