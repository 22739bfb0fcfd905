"""Attribution patching: exact where the metric is linear in the activation, and the formula checked by hand."""

import pytest
import torch
from helpers import FAMILIES, make_prompts, tiny_model
from torch import nn

from lsa.attribution import attribution_patching, attribution_vs_exact, compare, correlation
from lsa.metrics import logit_diff
from lsa.patching import activation_patching

TOL = 1e-4


def _identity(root, path):
    *parents, name = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, name, nn.Identity())


def _without_final_norm(family):
    """A tiny model whose logits are linear in the last block's sublayer outputs (final norm -> identity,
    and the last block's sandwich norms too where the family has them, as Gemma 3 does)."""
    model = tiny_model(family)
    layout = model.adapter.layout
    _identity(model.hf, layout.final_norm)
    last = model.adapter.block(model.hf, model.adapter.n_layers - 1)
    for path in (layout.attn_post_norm, layout.mlp_post_norm):
        if path is not None:
            _identity(last, path)
    return model


def _check_exact(model, prompts, cases):
    last = model.adapter.n_layers - 1
    for site, kw in cases:
        for direction in ("noising", "denoising"):
            exact = activation_patching(model, prompts, site, layers=[last], direction=direction, progress=False, **kw)
            approx = attribution_patching(model, prompts, site, layers=[last], direction=direction, **kw)
            scale = exact.effect.abs().max()
            assert scale > 1e-6  # a real effect, not 0 = 0
            # random tiny models have small effects: demand agreement relative to them, too
            assert (exact.patched - approx.patched).abs().max() <= min(TOL, 1e-3 * scale), (model.name, site, kw)
    return exact, approx


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_equals_exact_patching_where_metric_is_linear_in_the_activation(family):
    # 1) final norm -> identity: the logits are linear in the last MLP's output and the last residual.
    model = _without_final_norm(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=11)
    cases = [("neuron", {"neurons": [0, 3, 7]}), ("mlp_out", {}), ("resid_post", {"positions": ["end", "mid"]})]
    exact, approx = _check_exact(model, prompts, cases)
    # integrated gradients: the gradient is the same all along the path, so still exact
    for site in ("mlp_out", "neuron"):
        kw = {"neurons": [0, 3]} if site == "neuron" else {}
        last = model.adapter.n_layers - 1
        ex = activation_patching(model, prompts, site, layers=[last], progress=False, **kw)
        ig = attribution_patching(model, prompts, site, layers=[last], steps=3, **kw)
        assert (ex.patched - ig.patched).abs().max() <= min(TOL, 1e-3 * ex.effect.abs().max())
    table = compare(exact, approx)
    assert table.attrs["correlation"] == pytest.approx(1.0, abs=1e-6)
    assert list(table.columns[-3:]) == ["exact", "attribution", "error"]
    # 2) and the last MLP's output weight zeroed: linear in the last layer's head outputs too.
    with torch.no_grad():
        model.module("mlp_out", model.adapter.n_layers - 1).weight.zero_()
    _check_exact(model, prompts, [("head", {}), ("head", {"positions": ["end", 2]}), ("attn_out", {})])


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_of_heads_is_activation_difference_dot_autograd_gradient(family):
    model = tiny_model(family)
    a = model.adapter
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=12)
    expected = torch.zeros(a.n_layers, a.n_heads)
    for layer in range(a.n_layers):
        o_proj = model.module("o_proj", layer)
        store = {}

        def keep(m, args, store=store):
            store["z"] = args[0]

        handle = o_proj.register_forward_pre_hook(keep)
        try:
            with torch.no_grad():
                model.hf(prompts.corrupt)
            z_corrupt = store["z"].clone()
            logits = model.hf(prompts.clean).logits
            z_clean = store["z"]
            (grad,) = torch.autograd.grad(logit_diff(logits, prompts).sum(), z_clean)
        finally:
            handle.remove()
        prod = ((z_corrupt - z_clean.detach()) * grad).reshape(3, 6, a.n_heads, a.d_head)
        expected[layer] = prod.sum((1, 3)).mean(0)
    approx = attribution_patching(model, prompts, "head")
    assert (approx.grid("effect") - expected).abs().max() <= TOL


def test_attribution_correlates_with_exact_head_patching_on_a_random_model():
    model = tiny_model("gpt2")
    prompts = make_prompts(n=4, pos=6, seed=13)
    exact = activation_patching(model, prompts, "head", progress=False)
    approx = attribution_patching(model, prompts, "head")
    assert approx.array.shape == exact.array.shape == (2, 4)
    r = correlation(exact, approx)
    assert -1.0 <= r <= 1.0
    table = attribution_vs_exact(model, prompts, "head", progress=False)
    assert table.attrs["correlation"] == pytest.approx(r, abs=1e-9)
    assert torch.allclose(torch.tensor(table["exact"].values), exact.effect.double())
    with pytest.raises(ValueError, match="different components"):
        compare(exact, attribution_patching(model, prompts, "head", layers=[0]))


def test_attribution_rejects_a_metric_of_the_wrong_shape_and_bad_steps():
    model = tiny_model("gpt2")
    prompts = make_prompts(n=2, pos=5, seed=14)
    with pytest.raises(ValueError, match="one value per prompt"):
        attribution_patching(model, prompts, "head", metric=lambda logits, p: logit_diff(logits, p).sum())
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        attribution_patching(model, prompts, "head", steps=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_integrated_gradient_steps_average_gradients_along_the_embedding_path(family):
    # Hand-written integrated gradients for one layer's heads: embeddings interpolated
    # from clean to counterfactual, gradients of the metric at the heads averaged.
    model = tiny_model(family)
    a = model.adapter
    prompts = make_prompts(n=3, pos=6, seed=15)
    embed, o_proj = model.module("embed"), model.module("o_proj", 1)
    with torch.no_grad():
        e_clean, e_corrupt = embed(prompts.clean), embed(prompts.corrupt)
    store = {}
    h1 = o_proj.register_forward_pre_hook(lambda m, args: store.__setitem__("z", args[0]))
    try:
        with torch.no_grad():
            model.hf(prompts.corrupt)
        z_corrupt = store["z"].clone()
        grad_sum, z_clean = 0, None
        for k in range(4):
            h2 = embed.register_forward_hook(lambda m, i, o, k=k: e_clean + k / 4 * (e_corrupt - e_clean))
            try:
                values = logit_diff(model.hf(prompts.clean).logits, prompts)
            finally:
                h2.remove()
            z_clean = store["z"].detach() if k == 0 else z_clean
            (g,) = torch.autograd.grad(values.sum(), store["z"])
            grad_sum = grad_sum + g / 4
    finally:
        h1.remove()
    expected = ((z_corrupt - z_clean) * grad_sum).reshape(3, 6, a.n_heads, a.d_head).sum((1, 3)).mean(0)
    ig = attribution_patching(model, prompts, "head", layers=[1], steps=4)
    assert (ig.effect - expected).abs().max() <= TOL


def test_attribution_position_map_keeps_the_same_aligned_group_as_exact_patching_and_equals_it_where_linear():
    """positions="each" on prompts of two layouts: both estimate the same 3 prompts, labelled alike."""
    model = _without_final_norm("gpt2")
    prompts = make_prompts(n=5, pos=6, seed=3)
    prompts.positions["IO"] = torch.tensor([1, 1, 4, 1, 4])  # two layouts of one length
    last = model.adapter.n_layers - 1
    with pytest.warns(UserWarning, match=r"patching the largest, 3 prompts"):
        exact = activation_patching(model, prompts, "resid_post", layers=[last], positions="each", progress=False)
    with pytest.warns(UserWarning, match=r"patching the largest, 3 prompts"):
        approx = attribution_patching(model, prompts, "resid_post", layers=[last], positions="each")
    assert (approx.meta["n_prompts"], approx.meta["n_given"]) == (3, 5)
    assert approx.meta["pos_labels"] == exact.meta["pos_labels"] and approx.meta["pos_labels"][1].endswith("(IO)")
    assert approx.patched.shape == exact.patched.shape == (6, 3)
    # the final residual, without a final norm, is linear in the logits: the estimate is exact
    assert (exact.patched - approx.patched).abs().max() <= 1e-4
