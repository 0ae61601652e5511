"""Building a training run from its config: base model, ED-LoRA layers, data, optimizers.

Everything here happens once, before the first step (nanoGPT's model-init and optimizer
blocks). :class:`Setup` then answers the few questions the loop asks every step: the learning
rate (:meth:`Setup.set_lr`), the micro-batch (:meth:`Setup.micro_batch`), the trainable tensors
(:meth:`Setup.trainable`, :meth:`Setup.check_groups`).

Every random draw of step ``t`` comes from generators seeded with ``(seed, t, ...)``
(:func:`seeded`), so a run stopped and resumed from a checkpoint repeats the straight run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from mixofshow.concepts.edlora import EDLoRA, LoRAConfig
from mixofshow.data import ConceptDataset, collate, load_concept_list
from mixofshow.data.buckets import batches_per_epoch, bucket_sizes, epoch_batches
from mixofshow.models.loading import load_pipeline
from mixofshow.optim import get_spec
from mixofshow.optim.full_grad import FullGradients, full_gradients_for
from mixofshow.optim.groups import lora_param_groups
from mixofshow.optim.registry import OptimizerSpec, build_optimizer
from mixofshow.train.config import TrainConfig
from mixofshow.train.distributed import batch_share
from mixofshow.train.losses import lr_factor
from mixofshow.utils.config import ConfigError

__all__ = ["Setup", "build_run", "make_accelerator", "seeded"]

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def seeded(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``: one independent stream per purpose and step."""
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def make_accelerator(config: TrainConfig) -> Accelerator:
    t = config.train
    cpu = t.device == "cpu" or (t.device is None and not torch.cuda.is_available())
    logs = Path(config.output_dir) / "logs"
    return Accelerator(mixed_precision=t.mixed_precision, cpu=cpu, log_with="tensorboard", project_dir=str(logs))


@dataclass
class Setup:
    """Everything built from a config, on the accelerator's device."""

    config: TrainConfig
    accelerator: Accelerator
    spec: OptimizerSpec
    pipe: Any  # the StableDiffusionPipeline, modified in place by ``model``
    model: EDLoRA
    noise_scheduler: DDPMScheduler
    dataset: ConceptDataset
    optimizer: torch.optim.Optimizer  # the LoRA optimizer of the registry
    emb_optimizer: torch.optim.Optimizer  # AdamW on the concept-token rows
    base_lrs: list[list[float]]  # per optimizer, per group: the configured lr (before the schedule)
    full_grads: FullGradients | None = None  # G = dL/dW of the LoRA layers, when the optimizer reads it

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable tensor by name: what a checkpoint stores."""
        params = {"embeddings.new": self.model.embedding_parameter()}
        for name, layer in self.model.all_layers().items():
            for pname, p in layer.named_parameters(recurse=False):
                params[f"{name}.{pname}"] = p
        return params

    def check_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable tensors by the name an error reports: LoRA group (component), embeddings."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            groups.setdefault(str(group.get("name", f"group {i}")), []).extend(group["params"])
        groups["embeddings"] = [self.model.embedding_parameter()]
        return groups

    def set_lr(self, step: int) -> float:
        """Set every group's lr for ``step`` (0-based); returns the UNet LoRA lr (for logs)."""
        t = self.config.train
        factor = lr_factor(step, t.max_steps, t.warmup_steps, t.lr_schedule)
        for opt, base in zip((self.optimizer, self.emb_optimizer), self.base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor
        return self.config.optimizer.lr_unet * factor

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """Micro-batch ``micro`` of ``step``: sample ``k`` is item ``perm(k // n)[k % n]`` (epochs);
        with buckets, the global batch is batch ``b`` of its epoch's bucketed plan."""
        t = self.config.train
        n = len(self.dataset)
        # the global batch (batch_size x processes) comes from one seeded stream; this process
        # takes its share of it (mixofshow/train/distributed.py)
        acc = self.accelerator
        global_batch = t.batch_size * acc.num_processes
        b = step * t.gradient_accumulation_steps + micro  # global batch counter
        bucketed = None
        if self.dataset.buckets:  # one bucket per global batch; the epoch's plan is seeded by the epoch
            bucket_of = self.dataset.bucket_of()
            epoch, at = divmod(b, batches_per_epoch(bucket_of, global_batch))
            bucketed = epoch_batches(bucket_of, global_batch, seeded(self.config.seed, 5, epoch))[at]
        indices, generators, noise = [], [], []
        for j in batch_share(t.batch_size, acc.process_index):
            k = b * global_batch + j  # sample counter
            if bucketed is not None:
                indices.append(bucketed[j])
            else:
                perm = torch.randperm(n, generator=seeded(self.config.seed, 1, k // n))
                indices.append(int(perm[k % n]))
            generators.append(seeded(self.config.seed, 2, k))
            noise.append(seeded(self.config.seed, 4, k))
        batch = collate([self.dataset.get(i, g) for i, g in zip(indices, generators)])
        batch["noise_generators"] = noise  # per sample: the draws do not depend on how batches are split
        return batch

    def freeze_embeddings(self) -> None:
        """Stop training the concept-token rows (Mix-of-Show freezes them at a mean norm)."""
        embedding = self.model.embedding_parameter()
        embedding.requires_grad_(False)
        embedding.grad = None


def bucket_step(pipe) -> int:
    """The pixel multiple a training size must be: the VAE's factor times the UNet's downsampling."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def build_run(config: TrainConfig, accelerator: Accelerator) -> Setup:
    """Load the base model, add the concept words and LoRA layers, build the data and optimizers."""
    spec = get_spec(config.optimizer.name)
    t, c, lc = config.train, config.concept, config.lora
    pipe = load_pipeline(config.base_model, dtype=_DTYPES.get(t.mixed_precision, torch.float32),
                         config=config.base_model_config)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    # On the device first: the LoRA factors are created beside their base weights, and the
    # attention processors are chosen for the device (xformers is only used on CUDA).
    pipe.to(accelerator.device)
    model = EDLoRA(
        pipe,
        c.words,
        init={w: c.class_words.get(w) for w in c.words},
        lora=LoRAConfig(lc.rank, lc.scale, lc.rank_dropout, spec.factorization, lc.text_encoder, lc.unet),
        generator=seeded(config.seed, 0),
        init_std=c.init_std,
    )
    if t.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()
    dataset = ConceptDataset(
        load_concept_list(config.data.concept_list),
        config.data.replace_mapping,
        config.data.resolution,
        shuffle_tags=config.data.shuffle_tags,
        flip_p=config.data.flip_p,
        use_masks=config.data.use_masks,
        buckets=bucket_sizes(config.data.resolution, bucket_step(pipe)) if config.data.buckets else None,
        **({} if config.data.templates else {"templates": None}),
    )
    components = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    lrs = {"text_encoder": config.optimizer.lr_text_encoder, "unet": config.optimizer.lr_unet}
    groups = [g for g in lora_param_groups(components, lrs) if g.get("pairs") or g.get("triples")]
    if not groups:
        raise ConfigError("lora: both text_encoder and unet are off; nothing to train with the optimizer")
    # only an optimizer that reads G pays for the hook; the mode depends on the backward passes per step
    full_grads = full_gradients_for(components, spec.cls, t.gradient_accumulation_steps, accelerator.num_processes)
    optimizer = build_optimizer(spec.name, groups, full_grads=full_grads, **config.optimizer.params)
    emb_optimizer = torch.optim.AdamW(
        [model.embedding_parameter()], lr=config.optimizer.lr_embedding,
        weight_decay=config.optimizer.weight_decay_embedding,
    )
    optimizer, emb_optimizer = accelerator.prepare(optimizer, emb_optimizer)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in (optimizer, emb_optimizer)]
    return Setup(config, accelerator, spec, pipe, model, DDPMScheduler.from_config(pipe.scheduler.config),
                 dataset, optimizer, emb_optimizer, base_lrs, full_grads)
