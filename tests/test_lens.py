"""Vocabulary projection and logit lens against hand computations from hooked activations."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tokens, tiny_model

from lsa import lens


def _hook(model, tokens, layer):
    """o_proj input of ``layer``, neuron values of ``layer`` and the final norm's input, by plain hooks."""
    got = {}
    handles = [
        model.module("o_proj", layer).register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0])),
        model.module("mlp_out", layer).register_forward_pre_hook(lambda m, a: got.__setitem__("n", a[0])),
        model.module("final_norm").register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0])),
    ]
    with torch.no_grad():
        logits = model.hf(tokens).logits
    for h in handles:
        h.remove()
    return got, logits


def _hand_norm(module, write, x):
    """Frozen-scale final norm written out: LayerNorm centres and divides by sqrt(var + eps); RMSNorm by the rms."""
    if isinstance(module, torch.nn.LayerNorm):
        return (write - write.mean()) / torch.sqrt(x.var(unbiased=False) + module.eps) * module.weight
    return write / torch.sqrt(x.pow(2).mean() + module.variance_epsilon) * module.weight


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_head_projection_equals_frozen_final_norm_and_unembedding_of_the_hooked_head_write(family):
    model = tiny_model(family)
    tokens = random_tokens(2, 6)
    layer, head, index, position = 1, 2, 1, 4
    got, _ = _hook(model, tokens, layer)
    ad = model.adapter
    # the head's write through the o_proj module itself: its slice of z alone, minus the bias
    z = torch.zeros_like(got["z"][index, position]).reshape(ad.n_heads, ad.d_head)
    z[head] = got["z"][index, position].reshape(ad.n_heads, ad.d_head)[head]
    o_proj = model.module("o_proj", layer)
    with torch.no_grad():
        write = o_proj(z.reshape(1, -1))[0] - (o_proj.bias if o_proj.bias is not None else 0)
        expected = model.module("unembed").weight @ _hand_norm(
            model.module("final_norm"), write, got["x"][index, position]
        )
    frame = lens.head_projection(model, tokens, layer, head, position, index=index, k=5)
    promoted = frame[frame["direction"] == "promoted"]
    suppressed = frame[frame["direction"] == "suppressed"]
    assert promoted["token_id"].tolist() == expected.topk(5).indices.tolist()
    assert suppressed["token_id"].tolist() == expected.topk(5, largest=False).indices.tolist()
    torch.testing.assert_close(
        torch.tensor(promoted["logit"].values), expected.topk(5).values.double(), atol=1e-5, rtol=1e-5
    )
    assert promoted["token"].tolist() == [model.tokenizer.decode([i]) for i in promoted["token_id"]]
    assert set(frame[["component", "layer", "head", "position"]].itertuples(index=False)) == {("head", 1, 2, 4)}
    # norm="apply": the final norm module applied to the write itself
    applied = lens.write_logits(model, write, norm="apply")
    with torch.no_grad():
        torch.testing.assert_close(
            applied, model.module("unembed")(model.module("final_norm")(write)), atol=1e-5, rtol=1e-5
        )


def test_frozen_projections_of_all_writes_add_up_to_the_logits():
    model = tiny_model("gpt2")
    tokens = random_tokens(1, 5)
    writes = []
    handles = [model.module("blocks")[0].register_forward_pre_hook(lambda m, a: writes.append(a[0]))]
    for layer in range(model.adapter.n_layers):
        for part in ("o_proj", "mlp_out"):
            handles.append(model.module(part, layer).register_forward_hook(lambda m, a, o: writes.append(o)))
    got, logits = _hook(model, tokens, 0)
    for h in handles:
        h.remove()
    x = got["x"][0, -1]
    assert len(writes) == 1 + 2 * model.adapter.n_layers
    # direct logit attribution is linear: embedding + every sublayer write, plus the norm's bias, give the logits
    total = sum(lens.write_logits(model, w[0, -1], x) for w in writes)
    total = total + model.module("unembed").weight @ model.module("final_norm").bias
    torch.testing.assert_close(total, logits[0, -1], atol=1e-4, rtol=1e-4)


def test_neuron_projection_matches_hand_computation_with_and_without_a_position():
    model = tiny_model("llama")
    tokens = random_tokens(1, 5)
    layer, neuron = 0, 7
    got, _ = _hook(model, tokens, layer)
    w = model.module("mlp_out", layer).weight[:, neuron]  # down_proj is [d_model, d_mlp]
    w_u, norm = model.module("unembed").weight, model.module("final_norm")
    with torch.no_grad():
        direction = w_u @ (w * norm.weight)
        act = got["n"][0, 2, neuron]
        at_pos = w_u @ _hand_norm(norm, act * w, got["x"][0, 2])
    frame = lens.neuron_projection(model, layer, neuron, k=3)
    assert frame.loc[frame["direction"] == "promoted", "token_id"].tolist() == direction.topk(3).indices.tolist()
    frame = lens.neuron_projection(model, layer, neuron, tokens, position=2, k=3)
    assert (
        frame.loc[frame["direction"] == "suppressed", "token_id"].tolist()
        == at_pos.topk(3, largest=False).indices.tolist()
    )
    assert frame["activation"].iloc[0] == pytest.approx(float(act))


def test_ffn_projection_reads_the_hooked_ffn_output():
    model = tiny_model("bloom")
    tokens = random_tokens(1, 6)
    out = {}
    h = model.module("mlp_out", 1).register_forward_hook(lambda m, a, o: out.__setitem__("w", o))
    got, _ = _hook(model, tokens, 1)
    h.remove()
    with torch.no_grad():
        model.hf(tokens)
        expected = model.module("unembed").weight @ _hand_norm(
            model.module("final_norm"), out["w"][0, 3], got["x"][0, 3]
        )
    frame = lens.ffn_projection(model, tokens, 1, 3, k=4)
    assert frame.loc[frame["direction"] == "promoted", "token_id"].tolist() == expected.topk(4).indices.tolist()


def test_logit_lens_last_layer_is_the_model_output_and_target_rank_is_counted_by_hand():
    model = tiny_model("qwen2")
    tokens = random_tokens(1, 6)
    _, logits = _hook(model, tokens, 0)
    target = 17
    result = lens.logit_lens(model, tokens, position=-1, k=3, target=target)
    assert result.logits.shape == (model.adapter.n_layers + 1, model.adapter.d_vocab)
    torch.testing.assert_close(result.logits[-1], logits[0, -1], atol=1e-5, rtol=1e-5)
    last = result.target.set_index("layer").loc[model.adapter.n_layers - 1]
    assert last["rank"] == int((logits[0, -1] > logits[0, -1, target]).sum())
    assert last["prob"] == pytest.approx(float(logits[0, -1].softmax(-1)[target]), rel=1e-5)
    assert result.top.groupby("layer").size().tolist() == [3] * (model.adapter.n_layers + 1)
    assert result.top.loc[result.top["layer"] == -1, "rank"].tolist() == [0, 1, 2]


def test_lens_rejects_bad_arguments():
    model = tiny_model("gpt2")
    tokens = random_tokens(1, 4)
    with pytest.raises(IndexError, match="head"):
        lens.head_projection(model, tokens, 0, 9)
    with pytest.raises(IndexError, match="position"):
        lens.ffn_projection(model, tokens, 0, 4)
    with pytest.raises(ValueError, match="norm"):
        lens.write_logits(model, torch.zeros(model.adapter.d_model), norm="other")
    with pytest.raises(IndexError, match="target"):
        lens.logit_lens(model, tokens, target=10_000)


def test_projection_and_logit_lens_figures_show_the_tokens():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsa.plotting import lens as lens_plots

    model = tiny_model("gpt2")
    tokens = random_tokens(1, 5)
    frame = lens.head_projection(model, tokens, 0, 1, k=3)
    fig = lens_plots.plot_projection(frame)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(frame.loc[frame["direction"] == "promoted", "token"])
    assert "head 0.1" in fig._suptitle.get_text()
    result = lens.logit_lens(model, tokens, target=5)
    fig = lens_plots.plot_logit_lens(result)
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx(result.target["prob"].tolist())
    with pytest.raises(ValueError, match="target"):
        lens_plots.plot_logit_lens(lens.logit_lens(model, tokens))
    plt.close("all")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_write_logit_z_equals_the_z_score_of_the_full_vocabulary_projection(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    d = model.adapter.d_model
    write, resid = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g) * 2
    targets = torch.tensor([0, 7, 13, 2, 40])
    logits = lens.write_logits(model, write, resid)
    want = (logits[torch.arange(5), targets] - logits.mean(-1)) / logits.std(-1)
    torch.testing.assert_close(lens.write_logit_z(model, write, resid, targets), want, rtol=0, atol=1e-5)
