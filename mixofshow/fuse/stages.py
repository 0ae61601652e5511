"""Gradient fusion, stage by stage, on one base pipeline modified in place.

The stages follow Mix-of-Show's ``gradient_fusion.py``:

1. tokens -- every concept's layer-wise tokens go into the one tokenizer and embedding table;
2. text encoder -- inputs of each adapted text-encoder layer while concept i's text encoder
   (its LoRA merged with ``text_encoder_alpha``) encodes "photo of a {c}" and "{c}" (all L
   layer-wise versions, every position up to the end token);
3. UNet cross-attention K/V -- inputs are the *fused* text encoder's outputs at concept i's
   tokens and the end token, per cross-attention layer l from the l-th layer-wise prompt;
4. spatial layers (attn1 q/k/v/out, attn2 q/out, anything else adapted in the UNet) -- inputs
   recorded at every step while the model with the fused text encoder and K/V and concept i's
   spatial LoRA (``unet_alpha``) samples "photo of a {c}" for ``spatial_steps`` steps (batch 1,
   no guidance, seeded noise, as the original).

"Concept i's model" never exists as a copy: before concept i runs, the adapted ``nn.Linear``
weights of the stage are set to ``W0 + a_i dW_i`` in place, and forward hooks add the inputs to
the layer's float64 Gram statistics (:class:`~mixofshow.fuse.gram.GramStats`; layers reading
the same tensor share one Gram, see :func:`shared_inputs`). After the last concept, each layer is
solved and the fused weight is set, so the next stage runs on it. Only layers some concept
adapted are touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mixofshow.concepts.attention import cross_attention_layers, install_layerwise_attention
from mixofshow.concepts.lora import LoRALinear
from mixofshow.concepts.tokens import LayerwiseTextEncoder, add_concept_words
from mixofshow.fuse.config import FuseConfig, config_summary
from mixofshow.fuse.gram import Delta, GramStats, objective, solve_closed_form, solve_lbfgs, weight_fusion
from mixofshow.fuse.io import FusedFile, FusedMeta
from mixofshow.fuse.sources import FuseSource
from mixofshow.models.identity import base_model_name, same_base_model

__all__ = ["STAGES", "TEMPLATE", "Fusion", "GramRecorder", "linear_module", "first_end_mask", "shared_inputs"]

log = logging.getLogger(__name__)

STAGES = ("text_encoder", "cross_kv", "spatial")
TEMPLATE = "photo of a {}"  # the original's TEMPLATE_SIMPLE


def linear_module(pipe, key: str) -> nn.Linear:
    """The ``nn.Linear`` named ``"text_encoder.<module>"`` / ``"unet.<module>"`` (inside a LoRA layer too)."""
    component, _, name = key.partition(".")
    try:
        module = getattr(pipe, component).get_submodule(name)
    except AttributeError:
        raise ValueError(f"Layer {key!r} does not exist in the base model {base_model_name(pipe)!r}") from None
    if isinstance(module, LoRALinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise ValueError(f"Layer {key!r} is a {type(module).__name__}; fusion handles nn.Linear layers")
    return module


def first_end_mask(ids: torch.Tensor, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions up to and including the first end token, the first end token) as (B, T) masks."""
    is_end = ids == end_id
    first = torch.where(is_end.any(1), is_end.int().argmax(1), ids.shape[1] - 1)
    pos = torch.arange(ids.shape[1])[None]
    return pos <= first[:, None], pos == first[:, None]


def shared_inputs(pipe, keys: Sequence[str]) -> list[list[str]]:
    """``keys`` grouped by the input tensor their layers read in one forward call.

    q, k and v of a self-attention read the same hidden states (CLIP's ``q_proj``/``k_proj``/
    ``v_proj``, the UNet's attn1 ``to_q``/``to_k``/``to_v``), k and v of a cross-attention the same
    text states; their Gram statistics are built once (:class:`GramStats` ``share``). Every other
    layer is a group of its own. The grouping is checked while recording (a shared layer given
    another tensor is an error).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        component, _, name = key.partition(".")
        parent_name, _, leaf = name.rpartition(".")
        parent = getattr(pipe, component).get_submodule(parent_name) if parent_name else None
        cross = getattr(parent, "is_cross_attention", None)  # diffusers' Attention has it, CLIP's not
        if leaf in ("q_proj", "k_proj", "v_proj"):
            role = "qkv"  # CLIP self-attention
        elif cross is not None and leaf in (("to_k", "to_v") if cross else ("to_q", "to_k", "to_v")):
            role = "kv" if cross else "qkv"
        else:
            role = leaf
        groups.setdefault((f"{component}.{parent_name}", role), []).append(key)
    return list(groups.values())


def shared_stats(
    keys: Sequence[str], groups: Sequence[Sequence[str]], bases: dict[str, torch.Tensor]
) -> dict[str, GramStats]:
    """:class:`GramStats` of ``keys``, those of one group sharing their input statistics."""
    stats: dict[str, GramStats] = {}
    for group in groups:
        members = [k for k in group if k in keys]
        for key in members:
            stats[key] = GramStats(bases[key], share=stats[members[0]] if key != members[0] else None)
    return stats


class GramRecorder:
    """Forward hooks adding every call's inputs to its layer's :class:`GramStats`; nothing else is kept.

    ``deltas[key]`` is the current concept's change of the layer (``W_i - W0``, see
    :meth:`FuseSource.change`) and ``concept`` its index; ``row_mask`` (B, T), when set, selects
    the input rows that count (e.g. no padding after the end token). Layers of one ``groups``
    entry read the same input and share their Gram statistics.
    """

    def __init__(
        self, modules: dict[str, nn.Module], bases: dict[str, torch.Tensor], groups: Sequence[Sequence[str]]
    ) -> None:
        self.modules = modules
        self.stats = shared_stats(list(modules), groups, bases)
        self.deltas: dict[str, Delta] = {}
        self.concept: int = 0
        self.row_mask: torch.Tensor | None = None
        self._handles: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (raw input, rows kept)

    def __enter__(self) -> "GramRecorder":
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            raw = args[0]
            if self._last is not None and self._last[0] is raw:
                x = self._last[1]  # the same tensor object for layers sharing this input
            else:
                x = raw.detach()
                if self.row_mask is not None:
                    x = x[self.row_mask.to(x.device)]
                self._last = (raw, x)
            self.stats[key].update(x, self.deltas[key], concept=self.concept)

        return hook


class Fusion:
    """Fuse ``sources`` into ``pipe`` (a base ``StableDiffusionPipeline``, changed in place).

    ``run()`` does all stages and returns the :class:`~mixofshow.fuse.io.FusedFile`; the stages
    are also callable one by one (``fuse_tokens``, ``record``, ``solve``, ``apply``), which the
    tests use to compare methods on each concept's own inputs.
    """

    def __init__(self, pipe, sources: Sequence[FuseSource], config: FuseConfig, progress: bool = True,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        """``on_progress(stage, done, total)``: called as layers are recorded and solved (for the app)."""
        self.pipe = pipe
        self.sources = list(sources)
        self.config = config
        self.progress = progress
        self.on_progress = on_progress
        self._done = 0
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.cross_layers = [name for name, _ in cross_attention_layers(pipe.unet)]
        self.num_layers = len(self.cross_layers)
        self.text_dim = pipe.text_encoder.config.hidden_size
        self._check_model()
        # layers some concept changes (a LoRA whose factors or alpha are zero changes nothing)
        keys = sorted({key for src in self.sources for key in src.concept.lora if src.changes(key)})
        kv = {f"unet.{name}.{proj}" for name in self.cross_layers for proj in ("to_k", "to_v")}
        self.keys = {
            "text_encoder": [k for k in keys if k.startswith("text_encoder.")],
            "cross_kv": [k for k in keys if k in kv],
            "spatial": [k for k in keys if k.startswith("unet.") and k not in kv],
        }
        self.modules = {key: linear_module(pipe, key) for key in keys}
        for src in self.sources:
            for key, (a, b) in src.concept.lora.items():
                if key in self.modules and (b.shape[0], a.shape[1]) != tuple(self.modules[key].weight.shape):
                    raise ValueError(
                        f"{src.path}: LoRA layer {key!r} is {(b.shape[0], a.shape[1])}, the base model's "
                        f"is {tuple(self.modules[key].weight.shape)}; was it trained on another model?"
                    )
        with torch.no_grad():
            self.base = {key: m.weight.detach().float().clone() for key, m in self.modules.items()}
        self.fused: dict[str, torch.Tensor] = {}
        self.token_ids: dict[str, list[int]] = {}
        self.encoder: LayerwiseTextEncoder | None = None
        self.objectives: dict[str, dict[str, float]] = {}
        self._bar = None

    def _check_model(self) -> None:
        name = base_model_name(self.pipe)
        for src in self.sources:
            meta = src.concept.meta
            if meta.num_layers != self.num_layers or meta.text_dim != self.text_dim:
                raise ValueError(
                    f"{src.path}: made for {meta.base_model!r} ({meta.num_layers} cross-attention layers, "
                    f"text width {meta.text_dim}); the base model {name!r} has {self.num_layers} and "
                    f"{self.text_dim}"
                )
            if not same_base_model(meta.base_model, name):
                log.warning("%s was trained on %r; fusing on %r (shapes fit)", src.path, meta.base_model, name)

    # -- 1. tokens --------------------------------------------------------------------------
    def fuse_tokens(self) -> None:
        """Add every concept's tokens (its trained embeddings) and the layer-wise processors."""
        words: list[str] = []
        for src in self._iter(self.sources, "fuse: tokens"):
            self.token_ids.update(
                add_concept_words(
                    self.pipe.tokenizer, self.pipe.text_encoder, src.words, self.num_layers,
                    init=dict(src.concept.embeddings),
                )
            )
            words += src.words
        install_layerwise_attention(self.pipe.unet)
        self.encoder = LayerwiseTextEncoder(self.pipe.tokenizer, self.pipe.text_encoder, self.num_layers, words)

    # -- 2.-4. recording --------------------------------------------------------------------
    @torch.no_grad()
    def record(self, stage: str, indices: Iterable[int] | None = None) -> dict[str, GramStats]:
        """Gram statistics of ``stage``'s layers over concepts ``indices`` (default: all)."""
        if self.encoder is None:
            raise RuntimeError("call fuse_tokens() before recording")
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}")
        keys = self.keys[stage]
        indices = range(len(self.sources)) if indices is None else list(indices)
        if stage == "cross_kv":
            return self._record_kv(keys, indices)
        modules = {key: self.modules[key] for key in keys}
        current = {key: m.weight.detach().clone() for key, m in modules.items()}
        try:
            with GramRecorder(modules, self.base, shared_inputs(self.pipe, keys)) as rec:
                for i in indices:
                    src = self.sources[i]
                    rec.deltas = {key: src.change(key) for key in keys}
                    rec.concept = i
                    for key, module in modules.items():
                        module.weight.copy_(src.target(key, self.base[key]).to(module.weight.dtype))
                    if stage == "text_encoder":
                        self._run_text(src, rec)
                    else:
                        self._run_spatial(src)
                    self._tick()
        finally:
            for key, module in modules.items():
                module.weight.copy_(current[key])
        return {key: stats.finalize() for key, stats in rec.stats.items()}

    def _prompts(self, src: FuseSource) -> list[str]:
        return [TEMPLATE.format(src.prompt), src.prompt]

    def _run_text(self, src: FuseSource, rec: GramRecorder) -> None:
        ids = self.encoder.tokenize(self._prompts(src))  # (2 L, 77), every layer-wise version
        rec.row_mask, _ = first_end_mask(ids, self.pipe.tokenizer.eos_token_id)
        try:
            self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))
        finally:
            rec.row_mask = None

    def _record_kv(self, keys: list[str], indices: Sequence[int]) -> dict[str, GramStats]:
        stats = shared_stats(keys, shared_inputs(self.pipe, keys), self.base)
        num_base = self.pipe.text_encoder.get_input_embeddings().num_base
        for i in indices:
            src = self.sources[i]
            deltas = {key: src.change(key) for key in keys}
            prompts = self._prompts(src)
            ids = self.encoder.tokenize(prompts)  # prompt-major: row b * L + l
            hidden = self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]
            _, end = first_end_mask(ids, self.pipe.tokenizer.eos_token_id)
            select = (ids >= num_base) | end
            for layer, name in enumerate(self.cross_layers):
                rows = [b * self.num_layers + layer for b in range(len(prompts))]
                x = torch.cat([hidden[r][select[r].to(hidden.device)] for r in rows])
                for proj in ("to_k", "to_v"):
                    key = f"unet.{name}.{proj}"
                    if key in stats:
                        stats[key].update(x, deltas[key], concept=i)
            self._tick()
        return {key: s.finalize() for key, s in stats.items()}

    def _run_spatial(self, src: FuseSource) -> None:
        pipe, cfg = self.pipe, self.config
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(cfg.spatial_steps, device=self.device)
        context = self.encoder.encode([TEMPLATE.format(src.prompt)]).to(self.device, self.dtype)
        size = pipe.unet.config.sample_size if cfg.resolution is None else cfg.resolution // pipe.vae_scale_factor
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        shape = (1, pipe.unet.config.in_channels, size, size)
        latents = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=context).sample
            latents = scheduler.step(noise, t, latents).prev_sample

    # -- solving ----------------------------------------------------------------------------
    @torch.no_grad()
    def solve(self, stage: str, stats: dict[str, GramStats] | None, method: str | None = None) -> dict[str, torch.Tensor]:
        """Fused weights (float64) of ``stage``'s layers by ``method`` (default: the config's)."""
        method = method or self.config.method
        out = {}
        for key in self.keys[stage]:
            w0 = self.base[key]
            if method == "weight":
                deltas = [src.delta(key) for src in self.sources]
                out[key] = weight_fusion(w0, deltas, [src.alpha(key) for src in self.sources])
            elif method == "closed-form":
                out[key] = solve_closed_form(stats[key], self.config.ridge)
            elif method == "lbfgs":
                iters = self.config.lbfgs_unet_iters if stage == "spatial" else self.config.lbfgs_text_iters
                out[key] = solve_lbfgs(stats[key], iters)
            else:
                raise ValueError(f"Unknown fusion method {method!r}; expected closed-form, lbfgs or weight")
            self._tick()
        return out

    @torch.no_grad()
    def apply(self, weights: dict[str, torch.Tensor]) -> None:
        """Set fused weights into the pipeline (and remember them for the fused file)."""
        for key, weight in weights.items():
            module = self.modules[key]
            module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))
            self.fused[key] = weight.float().cpu()

    # -- everything -------------------------------------------------------------------------
    def run(self) -> FusedFile:
        self.fuse_tokens()
        method = self.config.method
        totals = {stage: len(self.keys[stage]) + (0 if method == "weight" else len(self.sources))
                  for stage in STAGES if self.keys[stage]}
        self._total = sum(totals.values())
        for stage in STAGES:
            keys = self.keys[stage]
            if not keys:
                log.info("%s: no concept adapted these layers; skipped", stage)
                continue
            self._stage = stage
            self._report()
            with tqdm(total=totals[stage], desc=f"fuse: {stage}", disable=not self.progress, leave=False) as self._bar:
                stats = None if method == "weight" else self.record(stage)
                weights = self.solve(stage, stats)
            self._bar = None
            if stats is not None:
                base = sum(objective(self.base[k], stats[k]) for k in keys)
                fused = sum(objective(weights[k], stats[k]) for k in keys)
                self.objectives[stage] = {"base": base, "fused": fused}
                log.info("%s: %d layers fused by %s; objective %.3e (base weights: %.3e)",
                         stage, len(keys), method, fused, base)
            self.apply(weights)
            del stats
        return self.result()

    def result(self) -> FusedFile:
        deltas = {key: self.fused[key] - self.base[key].cpu() for key in self.fused}
        embeddings = {w: e.float().cpu() for src in self.sources for w, e in src.concept.embeddings.items()
                      if w in src.words}
        meta = FusedMeta(
            base_model=self.sources[0].concept.meta.base_model,
            num_layers=self.num_layers,
            text_dim=self.text_dim,
            words=[w for src in self.sources for w in src.words],
            concepts=[src.describe() for src in self.sources],
            method=self.config.method,
            settings=config_summary(self.config),
            objectives=self.objectives,
        )
        return FusedFile(meta=meta, embeddings=embeddings, deltas=deltas)

    def _iter(self, items, desc):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False)

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._done += 1
            self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self._stage, self._done, self._total)
