"""One ED-LoRA training step, as ``mixofshow train`` takes it, for the benchmarks (not a test).

Shared by ``bench/training.py`` (embedded model, CPU) and ``bench/gpu.py`` (SD 1.5 architecture):
the library's pieces (:class:`~mixofshow.concepts.edlora.EDLoRA`, the registry's optimizers, the
param-group builder, the masked loss) assembled as the training loop does: VAE encode (no
grad), noise, layer-wise prompt encoding in one batched text-encoder call, UNet, loss, backward
(fp16: through a loss scaler), LoRA optimizer and embedding AdamW steps, zero_grad. Data loading
is left out (random pixels, one fixed caption).

A *plain-LoRA* step uses the same model, LoRA and tokens but encodes the prompt once and hands
that one context to every cross-attention layer, which is what a LoRA without layer-wise
embeddings costs; ``ED-LoRA / plain`` is the price of the layer-wise tokens.
:func:`flop_ratio` counts both steps' FLOPs (``torch.utils.flop_counter``): a measured time
ratio cannot beat that count's ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

from mixofshow.concepts.attention import LayerwiseAttnProcessor
from mixofshow.concepts.edlora import EDLoRA, LoRAConfig
from mixofshow.optim import get_spec
from mixofshow.optim.full_grad import finish_backward_, full_gradients_for
from mixofshow.optim.groups import lora_param_groups
from mixofshow.optim.registry import build_optimizer
from mixofshow.train.losses import masked_mse, offset_noise

__all__ = ["Trainer", "attention_processor", "flop_ratio", "paired_times", "time_steps", "PROMPT", "WORDS"]

WORDS = ["<cat1>", "<cat2>"]
PROMPT = "a photo of <cat1> <cat2> sitting on a wooden chair, highly detailed"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def attention_processor(backend: str):
    """``"sdpa"``: PyTorch's scaled_dot_product_attention; ``"xformers"``: its memory-efficient kernel."""
    if backend == "sdpa":
        return AttnProcessor2_0()
    if backend == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        import xformers.ops  # noqa: F401  (ImportError: not installed)

        return XFormersAttnProcessor()
    raise ValueError(f"Invalid attention backend {backend!r} (expected 'sdpa' or 'xformers')")


@dataclass
class Trainer:
    """An ED-LoRA model on ``pipe`` with the LoRA optimizer ``optimizer``, ready to step."""

    pipe: object
    optimizer: str = "adamw"
    precision: str = "no"  # "no", "fp16", "bf16": frozen weights in that dtype, LoRA fp32, autocast
    checkpointing: bool = False
    attention: str = "sdpa"
    rank: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        pipe, spec = self.pipe, get_spec(self.optimizer)
        self.device = pipe.unet.device
        self.dtype = _DTYPES[self.precision]
        pipe.to(dtype=self.dtype)
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            module.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.seed)
        self.model = EDLoRA(pipe, WORDS, init={w: None for w in WORDS},
                            lora=LoRAConfig(self.rank, factorization=spec.factorization), generator=gen)
        self.model.text_encoder.get_input_embeddings().to(self.device)  # the new rows (LoRA is already there)
        # one backend everywhere: self-attention, and inside every layer-wise cross-attention
        inner = lambda: attention_processor(self.attention)  # noqa: E731
        for name, proc in pipe.unet.attn_processors.items():
            module = pipe.unet.get_submodule(name.rsplit(".processor", 1)[0])
            if isinstance(proc, LayerwiseAttnProcessor):
                proc.inner = inner()
            else:
                module.set_processor(inner())
        if self.checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.text_encoder.gradient_checkpointing_enable()
        pipe.unet.train(), pipe.text_encoder.train()
        components = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
        groups = lora_param_groups(components, {"text_encoder": 1e-5, "unet": 1e-4})
        self.full_grads = full_gradients_for(components, spec.cls)
        self.lora_optimizer = build_optimizer(spec.name, groups, full_grads=self.full_grads)
        self.emb_optimizer = torch.optim.AdamW([self.model.embedding_parameter()], lr=1e-3, weight_decay=0.01)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.text_calls: list[int] = []  # batch size of every text-encoder call (see step)
        pipe.text_encoder.register_forward_hook(lambda m, args, out: self.text_calls.append(args[0].shape[0]))

    def batch(self, batch_size: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        pixels = torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1
        return pixels.to(self.device, self.dtype), [PROMPT] * batch_size

    def forward_backward(self, pixels: torch.Tensor, prompts: list[str], plain: bool = False) -> torch.Tensor:
        pipe, model, device = self.pipe, self.model, self.device
        gen = torch.Generator().manual_seed(self.seed + 2)
        with torch.no_grad():
            dist = pipe.vae.encode(pixels).latent_dist
            eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            latents = ((dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor).float()
        noise = offset_noise(latents, 0.01, gen)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        ids = model.encoder.tokenize(prompts)  # (B * L, 77): prompt-major, one row per layer
        autocast = torch.autocast(device.type, self.dtype) if self.precision != "no" else contextlib.nullcontext()
        with autocast:
            if plain:  # one encoding (the layer-0 tokens) shared by every cross-attention layer
                one = ids.view(len(prompts), model.num_layers, -1)[:, 0]
                hidden = model.text_encoder(one.to(device))[0]
                context = hidden.repeat(1, model.num_layers, 1)
            else:
                context = model.encoder.encode_ids(ids)
            pred = pipe.unet(noisy.to(self.dtype), timesteps, context).sample
        loss = masked_mse(pred, noise, None)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.scaler and self.full_grads is not None:  # the loss scale is on G too (the loop: finish_backward_)
            self.full_grads.unscale_(1.0 / self.scaler.get_scale())
        for opt in (self.lora_optimizer, self.emb_optimizer):
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        self.lora_optimizer.zero_grad(set_to_none=True)
        self.emb_optimizer.zero_grad(set_to_none=True)

    def step(self, pixels: torch.Tensor, prompts: list[str], plain: bool = False) -> torch.Tensor:
        loss = self.forward_backward(pixels, prompts, plain)
        self.optimizer_step()
        return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t


def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int = 1) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    return statistics.median(_timed(step, device) for _ in range(steps))


def paired_times(
    step: Callable[[], object], ref: Callable[[], object], device: torch.device, rounds: int, warmup: int = 1
) -> tuple[float, float, float]:
    """(median time of ``step``, of ``ref``, median over rounds of their ratio), timed back to back.

    Timing the two in every round keeps the ratio stable while a shared machine's load drifts.
    """
    for _ in range(warmup):
        step(), ref()
    pairs = [(_timed(ref, device), _timed(step, device)) for _ in range(rounds)]
    return (statistics.median(s for _, s in pairs), statistics.median(r for r, _ in pairs),
            statistics.median(s / r for r, s in pairs))


def flop_ratio(trainer: Trainer, batch_size: int, resolution: int) -> tuple[float, float, float]:
    """(ED-LoRA FLOPs, plain-LoRA FLOPs, their ratio) of one forward + backward at this size.

    Runs on any device, ``meta`` included (no memory, no time: how the README's SD 1.5 bound is
    computed on a CPU machine). The optimizer step is left out (the same in both, and tiny).
    """
    counts = []
    for plain in (False, True):
        pixels, prompts = trainer.batch(batch_size, resolution)
        with FlopCounterMode(display=False) as counter:
            trainer.forward_backward(pixels, prompts, plain)
        trainer.lora_optimizer.zero_grad(set_to_none=True)
        trainer.emb_optimizer.zero_grad(set_to_none=True)
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1], counts[0] / counts[1]
