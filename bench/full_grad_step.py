"""Whole training step of the full-gradient optimizers, relative to AdamW's.

``adams-full``, ``lracs`` and ``adaprelora`` read the full weight gradient ``G = dy^T x`` that the
LoRA layers' backward hook computes (``mixofshow/optim/full_grad.py``); their optimizer step alone
(``bench/optimizers.py``) is not what a user waits for. This times forward + backward (with the
hook) + ``finish_backward_`` + optimizer step + ``zero_grad`` on

- ``embedded``: the embedded tiny SD model (``mixofshow.models.embedded``) as ED-LoRA trains it
  (layer-wise text encoding, LoRA rank 4 on the text encoder's and the UNet's attention
  projections, 16 x 16 latents, batch 1; random latents and noise instead of the VAE);
- ``sd15-block``: one SD 1.5 transformer block (diffusers ``Transformer2DModel``: 320 channels,
  8 heads, 64 x 64 = 4096 tokens, a 77 x 768 context), random weights, LoRA rank 4 on the
  to_q/k/v/out of attn1 and attn2.

``step_ratio`` = step time / AdamW's step time on an identical copy of the model, the median over
rounds of the two timed back to back (``bench/optimizers.py: step_ratio``); ``adamw+hook`` is
AdamW with the hook computing G (mode ``"matrix"``) that nobody reads: the hook's own cost.

    python bench/full_grad_step.py [--models embedded sd15-block] [--repeats 7] [--budget 60]
                                   [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizers import median_time, step_ratio  # noqa: E402  (bench/optimizers.py, the same pairing)

from mixofshow.concepts.lora import inject_lora, lora_layers, unet_lora_targets  # noqa: E402
from mixofshow.optim import build_optimizer, get_spec  # noqa: E402
from mixofshow.optim.full_grad import MATRIX, FullGradients, finish_backward_, full_gradients_for  # noqa: E402
from mixofshow.optim.groups import lora_param_groups  # noqa: E402
from mixofshow.utils.memory import tune_cpu_allocator  # noqa: E402

OPTIMIZERS = ("adamw+hook", "adams-full", "lracs", "adaprelora")
LRS = {"text_encoder": 1e-5, "unet": 1e-4}
ONE_PROCESS = types.SimpleNamespace(num_processes=1, scaler=None)  # what finish_backward_ reads


def embedded_model(device: str) -> tuple[dict[str, torch.nn.Module], Callable[[], torch.Tensor]]:
    """The embedded model under ED-LoRA and a closure computing one training loss."""
    from mixofshow.concepts.edlora import EDLoRA, LoRAConfig
    from mixofshow.models.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline()
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    model = EDLoRA(pipe, ["<cat1>"], init={"<cat1>": "cat"}, lora=LoRAConfig(rank=4), generator=gen)
    model.embedding_parameter().requires_grad_(False)  # the LoRA optimizer's share only
    pipe.to(device)
    unet = pipe.unet
    ids = model.encoder.tokenize(["a photo of <cat1> on a sofa"])
    latents = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen).to(device)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timestep = torch.tensor([500], device=device)

    def loss() -> torch.Tensor:
        context = model.encoder.encode_ids(ids)
        return (unet(latents + noise, timestep, context).sample - noise).square().mean()

    return {"text_encoder": pipe.text_encoder, "unet": unet}, loss


def sd15_block(device: str) -> tuple[dict[str, torch.nn.Module], Callable[[], torch.Tensor]]:
    """One SD 1.5 down-block-1 transformer (320 channels, 64 x 64 tokens) with LoRA, and its loss."""
    from diffusers import Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = Transformer2DModel(
            num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1,
            cross_attention_dim=768, norm_num_groups=32, use_linear_projection=False,
        )  # fmt: skip
    block.requires_grad_(False)
    inject_lora(block, unet_lora_targets(block), rank=4, scale=1.0, generator=torch.Generator().manual_seed(1))
    for _, layer in lora_layers(block):  # B = 0 at init makes G_A zero; a trained B is not
        with torch.no_grad():
            layer.lora_up.normal_(0.0, 0.02)
    block.to(device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 320, 64, 64, generator=gen).to(device)
    context = torch.randn(1, 77, 768, generator=gen).to(device)
    target = torch.randn(1, 320, 64, 64, generator=gen).to(device)

    def loss() -> torch.Tensor:
        return (block(x, encoder_hidden_states=context).sample - target).square().mean()

    return {"unet": block}, loss


MODELS = {"embedded": embedded_model, "sd15-block": sd15_block}


def make_step(name: str, build: Callable, device: str) -> Callable[[], None]:
    """A closure running one whole training step of optimizer ``name`` on a fresh copy of the model."""
    components, loss_fn = build(device)
    spec = get_spec("adamw" if name == "adamw+hook" else name)
    groups = lora_param_groups(components, {k: LRS[k] for k in components})
    if name == "adamw+hook":
        layers = [layer for m in components.values() for _, layer in lora_layers(m)]
        full_grads = FullGradients.for_layers(layers, MATRIX)
    else:
        full_grads = full_gradients_for(components, spec.cls)  # one backward, one process
    opt = build_optimizer(spec.name, groups, full_grads=full_grads)

    def step() -> None:
        loss_fn().backward()
        finish_backward_(ONE_PROCESS, full_grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if full_grads is not None:
            full_grads.zero_()  # adamw+hook: its optimizer does not own it
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per optimizer")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per optimizer, then >= 3 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    for model in args.models:
        build = MODELS[model]
        ref = make_step("adamw", build, args.device)
        seconds = median_time(ref, 3)
        print(f"# {model}: AdamW whole step {seconds * 1e3:.1f} ms (median of 3)", flush=True)
        for name in args.optimizers:
            ratio = step_ratio(make_step(name, build, args.device), ref, args.repeats, args.budget)
            print(f"{model} {name} step_ratio={ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
