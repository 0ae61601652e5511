"""ED-LoRA: layer-wise tokens, one batched text-encoder call, per-layer contexts, LoRA layers, concept files."""

from __future__ import annotations

import pytest
import torch

from mixofshow.concepts.attention import cross_attention_layers, num_cross_attention_layers
from mixofshow.concepts.edlora import EDLoRA, LoRAConfig
from mixofshow.concepts.io import load_concept, save_concept
from mixofshow.concepts.lora import LoRALinear
from mixofshow.concepts.tokens import layer_token_names
from mixofshow.utils.io import FileFormatError, load_safetensors, save_safetensors
from mixofshow.optim.full_grad import FullGradients

WORDS = ["<toy1>", "<toy2>"]


@pytest.fixture
def model(embedded_pipeline_factory):
    return EDLoRA(embedded_pipeline_factory(), WORDS, init={"<toy2>": "robot"}, generator=torch.Generator().manual_seed(0))


def test_layer_count_is_derived_from_the_unet(model):
    # tiny UNet: 2 down (1 each), 1 mid, 2 up (2 each) transformer blocks
    assert model.num_layers == 7 == num_cross_attention_layers(model.unet)
    assert all(len(ids) == 7 for ids in model.token_ids.values())
    assert model.tokenizer.convert_ids_to_tokens(model.token_ids["<toy1>"]) == layer_token_names("<toy1>", 7)


def test_initialisation_random_and_class_word(model):
    emb = model.text_encoder.get_input_embeddings()
    rows = model.embedding_parameter().detach()
    class_id = model.tokenizer("robot", add_special_tokens=False).input_ids[0]
    assert torch.equal(rows[7:], emb.base.weight[class_id].expand(7, -1))  # <toy2> copies "robot"
    assert 0.005 < rows[:7].std().item() < 0.03  # <toy1> ~ N(0, 0.013^2)


def test_layerwise_encoding_is_one_batched_call_matching_per_layer_prompts(model):
    calls = []
    handle = model.text_encoder.register_forward_pre_hook(lambda m, args, kw: calls.append(1), with_kwargs=True)
    ctx = model.encoder.encode(["a photo of <toy1> <toy2>", "a dog"])
    handle.remove()
    assert len(calls) == 1 and ctx.shape == (2, 7 * 77, 32)
    for layer in (0, 3, 6):
        prompt = f"a photo of <toy1_l{layer}> <toy2_l{layer}>"
        ids = model.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        single = model.text_encoder(ids)[0][0]
        assert torch.allclose(ctx[0, layer * 77 : (layer + 1) * 77], single, atol=1e-6)
    assert not torch.allclose(ctx[0, :77], ctx[0, 77:154])  # layers see different tokens
    assert torch.allclose(ctx[1, :77], ctx[1, 77:154])  # no concept word: identical contexts


def test_each_cross_attention_layer_reads_its_own_context(model):
    seen = {}
    for index, (name, module) in enumerate(cross_attention_layers(model.unet)):
        module.to_k.register_forward_hook(lambda m, args, out, i=index: seen.__setitem__(i, args[0].clone()))
    ctx = torch.randn(1, 7 * 77, 32)
    model.unet(torch.randn(1, 4, 32, 32), 10, ctx)
    for i in range(7):
        assert torch.equal(seen[i], ctx[:, i * 77 : (i + 1) * 77])


def test_lora_layers_zero_init_keep_base_outputs(embedded_pipeline_factory):
    pipe = embedded_pipeline_factory()
    x = torch.randn(1, 4, 32, 32)
    ctx = torch.randn(1, 7 * 77, 32)
    model = EDLoRA(pipe, WORDS, lora=None)
    before = pipe.unet(x, 5, ctx).sample
    pipe2 = embedded_pipeline_factory()
    model2 = EDLoRA(pipe2, WORDS, lora=LoRAConfig(rank=2, scale=0.5))
    assert len(model2.layers["text_encoder"]) == 2 * 4 and len(model2.layers["unet"]) == 7 * 2 * 4
    assert torch.allclose(before, pipe2.unet(x, 5, ctx).sample, atol=1e-6)
    assert model.layers == {"text_encoder": {}, "unet": {}}


def test_lora_delta_and_multiplier():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, scale=0.5)
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(3, 6)
    expected = base(x) + x @ (0.5 * layer.lora_up @ layer.lora_down).T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.multiplier = 0.0
    assert torch.allclose(layer(x), base(x))


def test_full_gradient_hook_matches_autograd():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, scale=0.7)
    full = FullGradients.for_layers([layer])
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(4, 3, 6)
    w = base.weight.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x, w + layer.delta_weight().detach(), base.bias)
    y_ref.square().sum().backward()
    layer(x).square().sum().backward()
    assert torch.allclose(full.grad(layer.lora_down), w.grad, atol=1e-5)
    # the factor gradients are the chain rule through G: G_A = s B^T G, G_B = s G A^T
    assert torch.allclose(layer.lora_down.grad, 0.7 * layer.lora_up.T @ w.grad, atol=1e-5)


def test_concept_file_round_trip(model, tmp_path, embedded_pipeline_factory):
    with torch.no_grad():
        for layer in model.all_layers().values():
            layer.lora_up.normal_(std=0.01)
    path = tmp_path / "toy.safetensors"
    save_concept(path, model.to_concept_file(model.meta(optimizer="adams", steps=12, class_words={"<toy2>": "robot"})))
    concept = load_concept(path)
    assert concept.meta.words == WORDS and concept.meta.optimizer == "adams" and concept.meta.steps == 12
    assert concept.meta.num_layers == 7 and concept.meta.rank == 4
    loaded = EDLoRA.from_concept(embedded_pipeline_factory(), path)
    ctx_a = model.encoder.encode("a <toy1> <toy2> on the beach")
    ctx_b = loaded.encoder.encode("a <toy1> <toy2> on the beach")
    assert torch.allclose(ctx_a, ctx_b, atol=1e-6)
    x = torch.randn(1, 4, 32, 32)
    assert torch.allclose(model.unet(x, 9, ctx_a).sample, loaded.unet(x, 9, ctx_b).sample, atol=1e-5)


def test_concept_file_errors_name_file_and_key(model, tmp_path):
    path = tmp_path / "c.safetensors"
    save_concept(path, model.to_concept_file(model.meta()))
    tensors, meta = load_safetensors(path)
    del tensors["embeddings.<toy1>"]
    save_safetensors(tmp_path / "missing.safetensors", tensors, meta)
    with pytest.raises(FileFormatError, match=r"missing\.safetensors.*embeddings\.<toy1>"):
        load_concept(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(FileFormatError, match=r"junk\.safetensors: not a readable"):
        load_concept(tmp_path / "junk.safetensors")
    save_safetensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"format": "something"})
    with pytest.raises(FileFormatError, match="not a mixofshow concept file"):
        load_concept(tmp_path / "other.safetensors")
    with pytest.raises(FileFormatError, match="no such file"):
        load_concept(tmp_path / "nope.safetensors")


def test_concept_words_are_validated(embedded_pipeline_factory):
    with pytest.raises(ValueError, match="lower case"):
        EDLoRA(embedded_pipeline_factory(), ["<Toy1>"])
    with pytest.raises(ValueError, match="single CLIP token"):
        EDLoRA(embedded_pipeline_factory(), ["<toy1>"], init={"<toy1>": "hot dog"})
