"""The adapter names the right modules: per-head writes rebuild the attention output."""

import pytest
import torch

from lsa.adapter import UnsupportedArchitecture
from lsa.configs import random_hf_model
from lsa.model import wrap
from tests.helpers import FAMILIES, random_tokens, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_writes_plus_bias_equal_attention_output_by_plain_hooks(family):
    model = tiny_model(family)
    a = model.adapter
    proj = model.module("o_proj", 1)
    seen = {}
    # Independent capture with plain torch hooks on the projection (input and output).
    h = proj.register_forward_hook(lambda m, inp, out: seen.update(z=inp[0].detach(), out=out.detach()))
    try:
        model.logits(random_tokens())
    finally:
        h.remove()
    z = seen["z"].view(*seen["z"].shape[:2], a.n_heads, a.d_head)
    per_head = torch.einsum("bphd,hdm->bphm", z, a.o_proj_by_head(model.hf, 1))
    total = per_head.sum(2)
    bias = a.o_proj_bias(model.hf, 1)
    if bias is not None:
        total = total + bias
    assert torch.allclose(total, seen["out"], atol=1e-5)
    # each head contributes something (a slicing bug would leave some heads at zero)
    assert (per_head.abs().amax(dim=(0, 1, 3)) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_neuron_writes_rebuild_mlp_output(family):
    model = tiny_model(family)
    a = model.adapter
    out_proj = model.module("mlp_out", 0)
    seen = {}
    h = out_proj.register_forward_hook(lambda m, inp, out: seen.update(n=inp[0].detach(), out=out.detach()))
    try:
        model.logits(random_tokens())
    finally:
        h.remove()
    assert seen["n"].shape[-1] == a.d_mlp
    total = seen["n"] @ a.mlp_out_weight(model.hf, 0)
    bias = a.mlp_out_bias(model.hf, 0)
    if bias is not None:
        total = total + bias
    assert torch.allclose(total, seen["out"], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unembed_of_last_residual_equals_model_logits(family):
    model = tiny_model(family)
    tokens = random_tokens()
    seen = {}
    last = model.adapter.block(model.hf, model.adapter.n_layers - 1)
    h = last.register_forward_hook(lambda m, inp, out: seen.update(r=(out[0] if isinstance(out, tuple) else out)))
    try:
        logits = model.logits(tokens)
    finally:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(model.adapter.unembed(model.hf, seen["r"]), logits, atol=1e-5)


def test_grouped_query_geometry_is_read_from_config():
    model = tiny_model("qwen2")
    assert (model.adapter.n_heads, model.adapter.n_kv_heads, model.adapter.group_size) == (4, 2, 2)
    assert [model.adapter.kv_head(h) for h in range(4)] == [0, 0, 1, 1]


def test_unknown_architecture_error_names_supported_ones():
    hf = random_hf_model(
        dict(
            model_type="gpt_neo",
            num_layers=2,
            num_heads=4,
            hidden_size=32,
            vocab_size=97,
            attention_types=[[["global"], 2]],
        )
    )
    with pytest.raises(UnsupportedArchitecture, match="gpt_neo.*supported model types: bloom, gemma3_text, gpt2"):
        wrap(hf)


def test_out_of_range_layer_and_head_are_clear_errors():
    a = tiny_model("gpt2").adapter
    with pytest.raises(IndexError, match="layer 5 out of range: the model has 2 layers"):
        a.check_layer(5)
    with pytest.raises(IndexError, match="head 4 out of range"):
        a.check_head(4)


def test_nnsight_envoy_and_plain_module_see_the_same_activation():
    model = tiny_model("bloom")
    tokens = random_tokens()
    with torch.no_grad(), model.trace(tokens):
        z = model.envoy("o_proj", 1).input.save()
    seen = {}
    h = model.module("o_proj", 1).register_forward_pre_hook(lambda m, inp: seen.update(z=inp[0].detach()))
    try:
        model.logits(tokens)
    finally:
        h.remove()
    assert torch.allclose(z, seen["z"], atol=1e-6)
