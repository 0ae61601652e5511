"""Import of original Mix-of-Show .pth files; export to diffusers (PEFT) and kohya LoRA layouts."""

from __future__ import annotations

import pytest
import torch
from test_sample import make_toy_concept

from mixofshow.concepts.attention import num_cross_attention_layers
from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.export import (
    embeddings_path,
    export_diffusers_lora,
    export_kohya_lora,
    import_mixofshow_pth,
)
from mixofshow.concepts.io import load_concept, save_concept
from mixofshow.concepts.lora import text_encoder_lora_targets, unet_lora_targets
from mixofshow.utils.io import load_safetensors


@pytest.fixture(scope="module")
def concept_path(tmp_path_factory, embedded_pipeline_factory):
    path = tmp_path_factory.mktemp("concept") / "toy.safetensors"
    make_toy_concept(path, embedded_pipeline_factory)
    return path


def _original_state(pipe, rank=4, seed=0, words=("<potter1>", "<potter2>")) -> dict:
    """A synthetic checkpoint laid out as Mix-of-Show's ``delta_state_dict`` saves it."""
    gen = torch.Generator().manual_seed(seed)
    num_layers, dim = num_cross_attention_layers(pipe.unet), pipe.text_encoder.config.hidden_size
    state = {"new_concept_embedding": {w: torch.randn(num_layers, dim, generator=gen) for w in words}}
    for component, model, names in (
        ("text_encoder", pipe.text_encoder, text_encoder_lora_targets(pipe.text_encoder)),
        ("unet", pipe.unet, unet_lora_targets(pipe.unet)),
    ):
        state[component] = {}
        for name in names:
            linear = model.get_submodule(name)
            if component == "text_encoder" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # the original's (transformers 4) module names
            state[component][f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=gen)
            state[component][f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=gen)
    return state


@pytest.mark.parametrize("wrapped", [True, False], ids=["params", "bare"])
def test_import_original_pth(tmp_path, embedded_pipeline_factory, wrapped):
    pipe = embedded_pipeline_factory()
    state = _original_state(pipe)
    pth = tmp_path / "potter.pth"
    torch.save({"params": state} if wrapped else state, pth)
    concept = import_mixofshow_pth(pth, pipe, base_model="embedded", class_words={"<potter2>": "man"})
    meta = concept.meta
    assert meta.words == ["<potter1>", "<potter2>"] and meta.rank == 4 and meta.scale == 1.0
    expected_shape = (num_cross_attention_layers(pipe.unet), pipe.text_encoder.config.hidden_size)
    assert (meta.num_layers, meta.text_dim) == expected_shape and meta.base_model == "embedded"
    assert meta.class_words == {"<potter2>": "man"}
    assert torch.equal(concept.embeddings["<potter1>"], state["new_concept_embedding"]["<potter1>"])
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    a, b = concept.lora[f"unet.{key}"]
    assert torch.equal(a, state["unet"][f"{key}.lora_down.weight"])
    assert torch.equal(b, state["unet"][f"{key}.lora_up.weight"])
    assert len(concept.lora) == len(state["unet"]) // 2 + len(state["text_encoder"]) // 2
    # text-encoder names follow the installed transformers layout
    assert {f"text_encoder.{n}" for n in text_encoder_lora_targets(pipe.text_encoder)} <= set(concept.lora)

    # the imported concept loads and its LoRA layers compute W0 + 1.0 * up @ down
    out = tmp_path / "potter.safetensors"
    save_concept(out, concept)
    model = EDLoRA.from_concept(embedded_pipeline_factory(), out)
    layer = model.layers["unet"][key]
    expected = layer.base.weight + state["unet"][f"{key}.lora_up.weight"] @ state["unet"][f"{key}.lora_down.weight"]
    assert torch.allclose(layer.base.weight + layer.delta_weight(), expected, atol=1e-5)


class _Arbitrary:
    def __init__(self):
        self.payload = "not a tensor"


def test_import_refuses_unsafe_pickles(tmp_path):
    pth = tmp_path / "evil.pth"
    torch.save({"params": {"new_concept_embedding": {"<a>": _Arbitrary()}}}, pth)
    with pytest.raises(ValueError, match=r"evil\.pth.*refused.*_Arbitrary"):
        import_mixofshow_pth(pth)


def test_import_errors_name_file_and_key(tmp_path, embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    corrupt = tmp_path / "corrupt.pth"
    torch.save(_original_state(pipe), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"corrupt\.pth.*not a readable"):
        import_mixofshow_pth(corrupt)

    cases = {
        "missing": (lambda s: s.pop("new_concept_embedding"), "new_concept_embedding"),
        "not_tensor": (lambda s: s["new_concept_embedding"].update({"<potter1>": 3}), "<potter1>"),
        "emb_shape": (lambda s: s["new_concept_embedding"].update({"<potter1>": torch.zeros(16, 768)}), "expected"),
        "no_partner": (lambda s: s["unet"].pop(next(k for k in s["unet"] if k.endswith("lora_up.weight"))), "partner"),
        "full_weight": (lambda s: s["unet"].update({"conv_in.weight": torch.zeros(3, 3)}), "conv_in.weight"),
        "wrong_width": (
            lambda s: s["text_encoder"].update(
                {"text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": torch.zeros(4, 99)}
            ),
            "q_proj",
        ),
    }
    for name, (mutate, message) in cases.items():
        state = _original_state(pipe)
        mutate(state)
        pth = tmp_path / f"{name}.pth"
        torch.save({"params": state}, pth)
        with pytest.raises(ValueError, match=message) as exc:
            import_mixofshow_pth(pth, pipe)
        assert f"{name}.pth" in str(exc.value)


def _pipes_with_concept_and_export(concept_path, factory, tmp_path, exporter):
    ours = factory()
    EDLoRA.from_concept(ours, concept_path, multiplier=1.0)
    exported, emb = exporter(concept_path, tmp_path / "lora.safetensors")
    theirs = factory()
    theirs.load_lora_weights(str(exported))
    return ours, theirs, exported, emb


def _assert_same_outputs(ours, theirs, base):
    ids = ours.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text_ours = ours.text_encoder(ids)[0]
        text_theirs = theirs.text_encoder(ids)[0]
        assert not torch.allclose(text_theirs, base.text_encoder(ids)[0], atol=1e-4)  # LoRA is active
        assert torch.allclose(text_ours, text_theirs, atol=1e-5)
        latents = torch.randn(1, 4, 8, 8, generator=gen)
        context = torch.randn(1, 77, ours.unet.config.cross_attention_dim, generator=gen)
        num_layers = num_cross_attention_layers(ours.unet)
        # a plain 77-token context repeated for every layer = the plain context in each layer
        eps_ours = ours.unet(latents, 10, context.repeat(1, num_layers, 1)).sample
        eps_theirs = theirs.unet(latents, 10, context).sample
    assert torch.allclose(eps_ours, eps_theirs, atol=1e-5)


def test_diffusers_export_loads_and_matches(concept_path, embedded_pipeline_factory, tmp_path):
    ours, theirs, exported, emb = _pipes_with_concept_and_export(
        concept_path, embedded_pipeline_factory, tmp_path, export_diffusers_lora
    )
    tensors, _ = load_safetensors(exported)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert any(k.startswith("unet.down_blocks.") for k in tensors)
    # portable text-encoder names (transformers < 5 layout), which diffusers maps to the installed one
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    _assert_same_outputs(ours, theirs, embedded_pipeline_factory())
    # the layer-wise embeddings are written beside
    assert emb == embeddings_path(exported) and emb.name == "lora.embeddings.safetensors"
    emb_tensors, emb_meta = load_safetensors(emb)
    concept = load_concept(concept_path)
    assert torch.equal(emb_tensors["<toy1>"], concept.embeddings["<toy1>"])
    assert emb_meta["num_layers"] == str(concept.meta.num_layers)


def test_diffusers_export_folds_the_scale(concept_path, tmp_path):
    concept = load_concept(concept_path)
    concept.meta.scale = 0.5
    exported, _ = export_diffusers_lora(concept, tmp_path / "half.safetensors")
    tensors, _ = load_safetensors(exported)
    name, (a, b) = next((k, v) for k, v in concept.lora.items() if k.startswith("unet."))
    assert torch.allclose(tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"], 0.5 * b @ a)


def test_kohya_export_reconstructs_the_delta(concept_path, embedded_pipeline_factory, tmp_path):
    concept = load_concept(concept_path)
    concept.meta.scale = 0.75  # exercise alpha = s * r
    exported, _ = export_kohya_lora(concept, tmp_path / "kohya.safetensors")
    tensors, meta = load_safetensors(exported)
    assert meta["ss_network_dim"] == "4"
    pipe = embedded_pipeline_factory()
    model = EDLoRA.from_concept(pipe, concept)
    layers = model.all_layers()
    assert len(tensors) == 3 * len(layers)
    for name, layer in layers.items():
        component, _, module = name.partition(".")
        if component == "text_encoder":
            module = "text_model." + module.removeprefix("text_model.")
        key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        alpha = tensors[f"{key}.alpha"]
        assert alpha.dim() == 0 and float(alpha) == pytest.approx(0.75 * 4)
        up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
        rebuilt = layer.base.weight + (alpha / down.shape[0]) * up @ down
        assert torch.allclose(rebuilt, layer.base.weight + layer.delta_weight(), atol=1e-6), name
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors


def test_kohya_export_loads_in_diffusers(concept_path, embedded_pipeline_factory, tmp_path):
    ours, theirs, _, _ = _pipes_with_concept_and_export(
        concept_path, embedded_pipeline_factory, tmp_path, export_kohya_lora
    )
    _assert_same_outputs(ours, theirs, embedded_pipeline_factory())


def test_cli_export_and_import(concept_path, embedded_pipeline_factory, tmp_path, capsys):
    from mixofshow.cli import main

    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(concept_path), "--format", fmt, "--output", str(out)]) == 0
        assert out.is_file() and embeddings_path(out).is_file()
    printed = capsys.readouterr().out
    assert "embeddings" in printed and "A1111:" in printed and "ComfyUI:" in printed
    # kohya's export also writes the A1111 / ComfyUI textual inversion: one vector per word, the
    # mean of its layer-wise vectors, under the key those tools read
    from safetensors.torch import load_file

    concept = load_concept(concept_path)
    ti_files = list(tmp_path.glob("*_edlora.safetensors"))
    assert len(ti_files) == 1 and ti_files[0].stem in printed
    ti = load_file(ti_files[0])["emb_params"]
    expected = torch.stack([concept.embeddings[w].float().mean(0) for w in concept.meta.words])
    assert ti.shape == (len(concept.meta.words), concept.meta.text_dim)
    assert torch.allclose(ti.float(), expected, atol=1e-2)  # stored in fp16

    pth = tmp_path / "potter.pth"
    torch.save({"params": _original_state(embedded_pipeline_factory())}, pth)
    out = tmp_path / "potter.safetensors"
    code = main(["import", str(pth), str(out), "--base-model", "embedded", "--class-word", "man"])
    assert code == 0
    concept = load_concept(out)
    assert concept.meta.base_model == "embedded" and concept.meta.class_words == {"<potter2>": "man"}
    assert "potter.safetensors" in capsys.readouterr().out

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["import", str(bad), str(tmp_path / "x.safetensors"), "--base-model", "embedded"]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and "Traceback" not in err
    assert main(["export", str(pth), "--format", "kohya", "--output", str(tmp_path / "k.safetensors")]) == 2
