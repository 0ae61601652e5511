"""Multi-concept fusion: Gram solvers, the four stages on the embedded model, the fused file, CLI, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from mixofshow.cli import main as cli_main
from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.io import load_concept, save_concept
from mixofshow.fuse.config import FuseConceptConfig, FuseConfig, load_fuse_config
from mixofshow.fuse.gram import (
    GramStats,
    LowRank,
    add_gram_,
    objective,
    ridge_lambda,
    solve_closed_form,
    solve_lbfgs,
    symmetrize_,
    weight_fusion,
)
from mixofshow.fuse.io import FUSED_FORMAT, apply_fused, load_fused, save_fused
from mixofshow.fuse.run import fuse_concepts
from mixofshow.fuse.sources import load_sources
from mixofshow.fuse.stages import STAGES, Fusion, GramRecorder, shared_inputs
from mixofshow.utils.config import ConfigError
from mixofshow.utils.io import load_safetensors

WORDS = {"cat": ["<cat1>", "<cat2>"], "dog": ["<dog1>", "<dog2>"]}
FAST = {"spatial_steps": 2, "resolution": 32}  # 16 x 16 latents, 2 recorded steps per concept


pytestmark = pytest.mark.usefixtures("one_thread")


def make_concept(path, factory, words, seed: int) -> None:
    """A stand-in for a trained concept: random LoRA factors and embeddings (no training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EDLoRA(factory(), words, init={words[1]: "cat"})
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.all_layers().values():
                layer.lora_down.copy_(torch.randn(layer.lora_down.shape, generator=gen) * 0.3)
                layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=gen) * 0.3)
            emb = model.embedding_parameter()
            emb.copy_(torch.randn(emb.shape, generator=gen) * 0.3)
    save_concept(path, model.to_concept_file(model.meta(optimizer="adamw", steps=10)))


@pytest.fixture(scope="module")
def concept_files(tmp_path_factory, embedded_pipeline_factory):
    folder = tmp_path_factory.mktemp("concepts")
    paths = {}
    for seed, (name, words) in enumerate(WORDS.items()):
        paths[name] = folder / f"{name}.safetensors"
        make_concept(paths[name], embedded_pipeline_factory, words, seed)
    return paths


@pytest.fixture(scope="module")
def fusion(concept_files, embedded_pipeline_factory):
    """The closed-form fusion of both concepts, run once; stages stay callable for the checks."""
    config = FuseConfig(concepts=[FuseConceptConfig(file=str(p)) for p in concept_files.values()], **FAST)
    fusion = Fusion(embedded_pipeline_factory(), load_sources(config.concepts), config, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = fusion.run()
    finally:
        torch.set_num_threads(threads)
    return fusion, fused


# -- solvers on random data -------------------------------------------------------------------
def _random_problem(n=24, m=10, rows=(40, 30), seed=0, rank=None):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    k = rank or n  # each concept's inputs span its own k-dimensional subspace
    xs = [torch.randn(t, k, generator=gen, dtype=torch.float64) @ torch.randn(k, n, generator=gen, dtype=torch.float64)
          for t in rows]
    ws = [w0 + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in rows]
    return w0, xs, ws


def _stats(w0, xs, ws, chunk=7, low_rank=False):
    stats = GramStats(w0)
    for x, w in zip(xs, ws):
        delta = w - w0
        if low_rank:  # the same change as factors (full rank here)
            u, s, vt = torch.linalg.svd(delta, full_matrices=False)
            delta = LowRank(u * s, vt)
        for start in range(0, x.shape[0], chunk):  # several hook calls per concept
            stats.update(x[start:start + chunk], delta)
    return stats.finalize()


def test_closed_form_equals_least_squares_of_the_stacked_system():
    w0, xs, ws = _random_problem()
    stats = _stats(w0, xs, ws)
    ridge = 1e-3
    lam = ridge_lambda(stats.gram, ridge)
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2 + lam ||W - W0||^2 as one stacked least-squares system
    lhs = torch.cat(xs + [math.sqrt(lam) * torch.eye(w0.shape[1], dtype=torch.float64)])
    rhs = torch.cat([x @ w.T for x, w in zip(xs, ws)] + [math.sqrt(lam) * w0.T])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    for low_rank in (False, True):
        stats = _stats(w0, xs, ws, low_rank=low_rank)
        got = solve_closed_form(stats, ridge)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10)
        for weight in (got, w0, ws[0]):
            direct = sum(((x @ weight.T - x @ w.T) ** 2).sum() for x, w in zip(xs, ws))
            assert objective(weight, stats) == pytest.approx(float(direct), rel=1e-9)


def test_gram_stats_chunking_and_merging_do_not_change_the_result():
    w0, xs, ws = _random_problem(seed=1)
    one = _stats(w0, xs, ws, chunk=1000)
    chunked = _stats(w0, xs, ws, chunk=3)
    merged = _stats(w0, xs[:1], ws[:1]).merged(_stats(w0, xs[1:], ws[1:], low_rank=True))
    for other in (chunked, merged):
        assert other.count == one.count == sum(x.shape[0] for x in xs)
        assert torch.allclose(other.gram, one.gram) and torch.allclose(other.cross(), one.cross())
        assert other.const == pytest.approx(one.const, rel=1e-12)


def test_layers_sharing_an_input_build_one_gram_with_their_own_targets():
    gen = torch.Generator().manual_seed(5)
    n, chunks = 12, 3
    bases = [torch.randn(m, n, generator=gen, dtype=torch.float64) for m in (7, 7, 9)]
    xs = [[torch.randn(4, n, generator=gen, dtype=torch.float64) for _ in range(chunks)] for _ in range(3)]
    # concept 1 leaves the first layer alone (None twice in a row for it), the others change
    deltas = [[LowRank(torch.randn(b.shape[0], 2, generator=gen, dtype=torch.float64),
                       torch.randn(2, n, generator=gen, dtype=torch.float64)) for b in bases] for _ in range(3)]
    deltas[0][0] = deltas[1][0] = None
    lead = GramStats(bases[0])
    shared = [lead] + [GramStats(b, share=lead) for b in bases[1:]]
    alone = [GramStats(b) for b in bases]
    for concept in range(3):
        for x in [xs[concept][0][:0]] + xs[concept]:  # an empty call first: changes nothing
            for layer in range(3):  # the hooks of q, k, v see the same tensor
                shared[layer].update(x, deltas[concept][layer], concept=concept)
                alone[layer].update(x, deltas[concept][layer], concept=concept)
    for layer, (s, a) in enumerate(zip(shared, alone)):
        s.finalize(), a.finalize()
        grams = [sum(x.T @ x for x in xs[c]) for c in range(3)]
        expected = sum(d[layer].dense() @ g for d, g in zip(deltas, grams) if d[layer] is not None)
        assert torch.allclose(s.cross(), expected, rtol=1e-10)
        assert s.gram is lead.gram and s.count == a.count == 3 * chunks * 4
        assert torch.allclose(s.gram, a.gram, rtol=1e-12) and torch.allclose(s.cross(), a.cross(), rtol=1e-12)
        assert s.const == pytest.approx(a.const, rel=1e-12)
        assert torch.allclose(solve_closed_form(s), solve_closed_form(a), rtol=1e-10)
    other = GramStats(bases[1], share=GramStats(bases[0]))
    other.update(xs[0][0], None, concept=0)
    with pytest.raises(RuntimeError, match="same input"):
        other.update(xs[0][1], None, concept=0)  # its partner never read the first tensor
    with pytest.raises(ValueError, match="concept"):
        GramStats(bases[1], share=GramStats(bases[0])).update(xs[0][0], None)


def test_recorded_statistics_do_not_depend_on_sharing(fusion):
    fusion, _ = fusion
    keys = fusion.keys["spatial"]
    modules = {key: fusion.modules[key] for key in keys}
    groups = shared_inputs(fusion.pipe, keys)
    assert any(len(g) == 3 for g in groups)  # attn1 q, k, v
    shared = fusion.record("spatial", [0])
    with GramRecorder(modules, fusion.base, [[k] for k in keys]) as rec:
        src = fusion.sources[0]
        rec.deltas = {key: src.change(key) for key in keys}
        with torch.no_grad():
            for key, module in modules.items():
                module.weight.copy_(src.target(key, fusion.base[key]))
            try:
                fusion._run_spatial(src)
            finally:
                for key, module in modules.items():
                    module.weight.copy_(fusion.fused[key])
    for key in keys:
        alone = rec.stats[key].finalize()
        assert torch.allclose(shared[key].gram, alone.gram, rtol=1e-10)
        assert torch.allclose(shared[key].cross(), alone.cross(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [40, 300, 517])
def test_symmetric_panel_gram_equals_the_plain_product(n):
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    add_gram_(gram, x[:20])
    add_gram_(gram, x[20:])
    assert torch.allclose(symmetrize_(gram), x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.equal(gram, gram.T)


def test_uncovered_directions_keep_the_base_weight_on_random_data():
    # rank 6 inputs in 24 dimensions: like text and K/V layers, the system is rank-deficient
    w0, xs, ws = _random_problem(rank=3, rows=(5, 4))
    stats = _stats(w0.float(), [x.float() for x in xs], [w.float() for w in ws])  # fp32, as the hooks see them
    fused = solve_closed_form(stats)
    values, vectors = torch.linalg.eigh(stats.gram)
    null = vectors[:, values < 1e-10 * values.max()]
    assert null.shape[1] == 24 - 6
    change = ((fused - w0) @ null).norm() / (w0 @ null).norm()
    assert change < 1e-5
    covered = vectors[:, values >= 1e-10 * values.max()]
    assert ((fused - w0) @ covered).norm() / (w0 @ covered).norm() > 1e-2  # it did move there


def test_weight_fusion_is_the_average_of_the_deltas():
    w0 = torch.zeros(2, 2)
    d1, d2 = torch.ones(2, 2), torch.full((2, 2), 3.0)
    fused = weight_fusion(w0, [d1, d2, None], [1.0, 0.5, 1.0])
    assert torch.allclose(fused, torch.full((2, 2), (1.0 + 1.5) / 3, dtype=torch.float64))


# -- the stages on the embedded model ---------------------------------------------------------
def test_only_adapted_layers_are_fused_and_every_token_is_kept(fusion, concept_files):
    fusion, fused = fusion
    lora_keys = set(load_concept(concept_files["cat"]).lora) | set(load_concept(concept_files["dog"]).lora)
    assert set(fused.deltas) == lora_keys
    assert {len(fusion.keys[s]) for s in STAGES} and all(fusion.keys[s] for s in STAGES)
    assert fused.meta.words == WORDS["cat"] + WORDS["dog"]
    assert set(fused.embeddings) == set(fused.meta.words)
    assert fused.embeddings["<dog1>"].shape == (fusion.num_layers, fusion.text_dim)
    for stage in STAGES:
        assert fused.meta.objectives[stage]["fused"] < fused.meta.objectives[stage]["base"]


def test_fused_layers_are_closer_to_each_concept_than_weight_fusion(fusion):
    fusion, _ = fusion
    for stage in STAGES:
        weighted = fusion.solve(stage, None, method="weight")
        for index, source in enumerate(fusion.sources):
            own = fusion.record(stage, [index])  # concept i's inputs, its own model's outputs
            closed = sum(objective(fusion.fused[k], s) for k, s in own.items())
            weight = sum(objective(weighted[k], s) for k, s in own.items())
            assert closed < 0.5 * weight, (stage, source.name, closed, weight)


def test_fused_kv_weight_equals_base_on_directions_no_concept_covers(fusion):
    fusion, _ = fusion
    stats = fusion.record("cross_kv")
    checked = 0
    for key, s in stats.items():
        values, vectors = torch.linalg.eigh(s.gram)
        null = vectors[:, values < 1e-10 * values.max()].float()
        assert null.shape[1] > 0  # 2 concepts x 2 prompts x 3 tokens < text width 32
        base = fusion.base[key]
        change = ((fusion.fused[key] - base) @ null).norm() / (base @ null).norm()
        assert change < 1e-5, key
        checked += 1
    assert checked == len(fusion.keys["cross_kv"])


def test_lbfgs_objective_is_never_below_the_closed_form(fusion):
    fusion, _ = fusion
    for stage in STAGES:
        stats = fusion.record(stage)
        for key in fusion.keys[stage]:
            s, w0 = stats[key], fusion.base[key]
            closed = solve_closed_form(s, fusion.config.ridge)
            lbfgs = solve_lbfgs(s, iters=50 if stage == "spatial" else 100)
            # the ridge solution minimises f + lam ||W - W0||^2, so for any W (LBFGS's included):
            # f(closed) <= f(W) + lam ||W - W0||^2; beyond that only float64 rounding is allowed
            slack = ridge_lambda(s.gram, fusion.config.ridge) * float((lbfgs - w0.double()).norm() ** 2)
            rounding = 1e-9 * objective(w0, s)
            assert objective(lbfgs, s) >= objective(closed, s) - slack - rounding, key


def test_fused_file_loads_on_the_base_model_and_samples_both_concepts(fusion, tmp_path, embedded_pipeline_factory,
                                                                    capsys):
    from mixofshow.sample.load import load_adapter
    from mixofshow.sample.pipeline import SampleConfig, generate

    fusion, fused = fusion
    path = tmp_path / "fused.safetensors"
    save_fused(path, fused)
    _, meta = load_safetensors(path)
    assert meta["format"] == FUSED_FORMAT
    concepts = json.loads(meta["concepts"])
    assert [c["words"] for c in concepts] == list(WORDS.values())
    assert concepts[1]["tokens"]["<dog2>"] == [f"<dog2_l{i}>" for i in range(fusion.num_layers)]
    pipe = embedded_pipeline_factory()
    model = load_adapter(pipe, path)  # what `mixofshow sample --concept fused.safetensors` does
    assert model.words == fused.meta.words
    key = next(iter(fused.deltas))
    assert torch.allclose(fusion.modules[key].weight, _module(pipe, key).weight)
    cat = model.encoder.encode("photo of a <cat1> <cat2>")
    dog = model.encoder.encode("photo of a <dog1> <dog2>")
    assert torch.allclose(cat, fusion.encoder.encode("photo of a <cat1> <cat2>"), atol=1e-5)
    assert not torch.allclose(cat, dog, atol=1e-3)
    from mixofshow.cli import main

    assert main(["export", str(path), "--format", "kohya", "--output", str(tmp_path / "k.safetensors")]) == 2
    assert "a fused model (several concepts merged into the weights)" in capsys.readouterr().err
    prompts = ["photo of a <cat1> <cat2>", "photo of a <dog1> <dog2>"]
    config = SampleConfig(prompts, num_images=1, seed=0, steps=2, height=32, width=32, output_dir=tmp_path)
    samples = generate(pipe, model.encoder, config, progress=False)
    pixels = [torch.tensor(list(s.image.getdata()), dtype=torch.float32) for s in samples]
    assert len(samples) == 2 and (pixels[0] - pixels[1]).abs().mean() > 0.5


def _module(pipe, key):
    component, _, name = key.partition(".")
    return getattr(pipe, component).get_submodule(name)


def test_diffusers_folder_export_round_trip(fusion, tmp_path):
    from mixofshow.fuse.export import attach_exported, export_diffusers
    from mixofshow.models.loading import load_pipeline

    fusion, fused = fusion
    folder = export_diffusers(fusion.pipe, tmp_path / "fused-diffusers", fused.meta)
    assert (folder / "model_index.json").is_file() and not list(tmp_path.glob(".*tmp"))
    pipe = load_pipeline(str(folder))
    model = attach_exported(pipe, folder)
    prompt = "photo of a <cat1> <cat2> and a <dog1> <dog2>"
    assert torch.allclose(model.encoder.encode(prompt), fusion.encoder.encode(prompt), atol=1e-5)
    key = next(k for k in fused.deltas if k.startswith("unet."))
    assert torch.allclose(_module(pipe, key).weight, fusion.modules[key].weight)
    # the text encoder's weights carry the names transformers 4.x (kohya's sd-scripts) looks for:
    # "text_model." + the module path, every one of them, so none is initialised at random there
    from safetensors import safe_open

    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    expected = {"text_model." + k.removeprefix("text_model.") for k in pipe.text_encoder.state_dict()}
    assert saved == expected
    # and the folder converts to one original-layout file that loads back with the folder's configs
    from mixofshow.models.single_file import save_single_file

    single = save_single_file(pipe, tmp_path / "fused.safetensors", torch.float32)
    again = load_pipeline(str(single), config=str(folder))
    again_model = attach_exported(again, folder)
    assert torch.allclose(again_model.encoder.encode(prompt), fusion.encoder.encode(prompt), atol=1e-5)


# -- config, CLI and errors -------------------------------------------------------------------
def _write_config(path, files, **extra):
    data = {"concepts": [{"file": str(f)} for f in files], **FAST, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_weight_fusion_writes_a_compact_file(concept_files, tmp_path, capsys):
    out = tmp_path / "out" / "fused.safetensors"
    config = _write_config(tmp_path / "fuse.yaml", concept_files.values(), base_model="embedded")
    assert cli_main(["fuse", str(config), "--method", "weight", "--output", str(out), "--no-progress"]) == 0
    fused = load_fused(out)
    assert fused.meta.method == "weight" and fused.meta.words == WORDS["cat"] + WORDS["dog"]
    assert [c["name"] for c in fused.meta.concepts] == ["cat", "dog"]
    assert str(out) in capsys.readouterr().out


def test_errors_name_the_files_and_nothing_is_written(concept_files, tmp_path, embedded_pipeline_factory, capsys):
    cat = load_concept(concept_files["cat"])
    other_base = tmp_path / "other.safetensors"
    cat.meta.base_model = "runwayml/stable-diffusion-v1-5"
    cat.meta.words = ["<cow1>", "<cow2>"]
    cat.embeddings = {"<cow1>": cat.embeddings["<cat1>"], "<cow2>": cat.embeddings["<cat2>"]}
    save_concept(other_base, cat)
    with pytest.raises(ValueError, match="different base models") as err:
        load_sources([FuseConceptConfig(file=str(concept_files["dog"])), FuseConceptConfig(file=str(other_base))])
    assert str(concept_files["dog"]) in str(err.value) and str(other_base) in str(err.value)

    twice = tmp_path / "cat_again.safetensors"
    twice.write_bytes(concept_files["cat"].read_bytes())
    with pytest.raises(ValueError, match="'<cat1>'") as err:
        load_sources([FuseConceptConfig(file=str(concept_files["cat"])), FuseConceptConfig(file=str(twice))])
    assert str(twice) in str(err.value)

    out = tmp_path / "never.safetensors"
    missing = tmp_path / "missing.safetensors"
    config = _write_config(tmp_path / "bad.yaml", [concept_files["cat"], missing], output=str(out))
    assert cli_main(["fuse", str(config), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err
    config = _write_config(tmp_path / "dup.yaml", [concept_files["cat"], twice], output=str(out))
    assert cli_main(["fuse", str(config), "--no-progress"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_a_failing_stage_writes_nothing(concept_files, tmp_path, embedded_pipeline_factory, monkeypatch):
    out = tmp_path / "fused.safetensors"
    config = FuseConfig(concepts=[FuseConceptConfig(file=str(p)) for p in concept_files.values()],
                        output=str(out), diffusers_output=str(tmp_path / "folder"), **FAST)

    def boom(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Fusion, "_run_spatial", boom)
    with pytest.raises(RuntimeError):
        fuse_concepts(config, pipe=embedded_pipeline_factory(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_errors_name_the_key(tmp_path, concept_files):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"concepts": [{"file": str(concept_files["cat"])}], "ridges": 1.0}))
    with pytest.raises(ConfigError, match="'ridges'"):
        load_fuse_config(bad)
    bad.write_text(yaml.safe_dump({"concepts": [{"file": str(concept_files["cat"]), "unet_alpha": "x"}]}))
    with pytest.raises(ConfigError, match=r"concepts\[0\]\.unet_alpha"):
        load_fuse_config(bad)
    bad.write_text(yaml.safe_dump({"concepts": [{"file": str(concept_files["cat"])}], "method": "svd"}))
    with pytest.raises(ConfigError, match="method"):
        load_fuse_config(bad)


def test_apply_fused_checks_before_changing_the_pipeline(fusion, embedded_pipeline_factory):
    _, fused = fusion
    pipe = embedded_pipeline_factory()
    apply_fused(pipe, fused)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="already loaded"):
        apply_fused(pipe, fused)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layers_no_concept_changes_are_left_alone(concept_files, tmp_path, embedded_pipeline_factory):
    paths = []
    for name, path in concept_files.items():
        concept = load_concept(path)
        for key, (a, b) in concept.lora.items():
            if key.startswith("text_encoder."):
                concept.lora[key] = (a, torch.zeros_like(b))  # as trained with a frozen text encoder
        paths.append(tmp_path / f"{name}.safetensors")
        save_concept(paths[-1], concept)
    config = FuseConfig(concepts=[FuseConceptConfig(file=str(p), unet_alpha=0.7) for p in paths],
                        method="weight", output=str(tmp_path / "out.safetensors"), **FAST)
    outcome = fuse_concepts(config, pipe=embedded_pipeline_factory(), progress=False)
    deltas = load_fused(outcome.output).deltas
    assert deltas and not any(k.startswith("text_encoder.") for k in deltas)
    cat, dog = (load_concept(p) for p in paths)
    key = next(iter(deltas))
    expected = 0.7 / 2 * sum(c.meta.scale * c.lora[key][1] @ c.lora[key][0] for c in (cat, dog))
    assert torch.allclose(deltas[key], expected, atol=1e-6)


def test_zero_ridge_on_a_rank_deficient_system_keeps_the_base_weight_and_fits_exactly():
    w0, xs, ws = _random_problem(rank=3, rows=(5, 4))
    stats = _stats(w0, xs, ws)
    fused = solve_closed_form(stats, ridge=0.0)
    values, vectors = torch.linalg.eigh(stats.gram)
    null = vectors[:, values < 1e-10 * values.max()]
    assert ((fused - w0) @ null).norm() < 1e-8 * (w0 @ null).norm()
    assert objective(fused, stats) < 1e-12 * objective(w0, stats)  # disjoint subspaces: exact fit
    w0_before = w0.clone()
    solve_closed_form(stats)
    assert torch.equal(w0, w0_before)  # the caller's weight is not modified


def test_fusion_reports_progress_layer_by_layer(concept_files, tmp_path, embedded_pipeline_factory):
    """What the app's fuse jobs show: (stage, done, total), done counting up to total once."""
    seen = []
    config = FuseConfig(concepts=[FuseConceptConfig(file=str(p)) for p in concept_files.values()],
                        method="closed-form", output=str(tmp_path / "out.safetensors"), **FAST)
    fuse_concepts(config, pipe=embedded_pipeline_factory(), progress=False, write=False,
                  on_progress=lambda *report: seen.append(report))
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == seen[-1][2] > 0
    assert {t for _, _, t in seen} == {seen[-1][2]}
    stages = list(dict.fromkeys(stage for stage, _, _ in seen))
    assert stages == [s for s in ("text_encoder", "cross_kv", "spatial") if s in stages] and len(stages) >= 2, seen
