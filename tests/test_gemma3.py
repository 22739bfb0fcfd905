"""Gemma 3 (``gemma3_text``) on random configs: HF's own forward and plain-hook references.

The tiny config (``lsa.configs.TINY["gemma3"]``) has three layers, the first two
with a 4-token sliding window (shorter than the prompts here), one key/value head
(``"1kv"``) or two (``"2kv"``), and random norm weights, so the ``1 + w`` gains,
the sandwich norms and the window all act. The family-parametrised tests in the
other files run on it too; these add what only Gemma has.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_prompts, random_tokens, tiny_model
from test_patching import ref_patch_metric, ref_path_to_receivers

from lsa import flow, lens
from lsa import neurons as N
from lsa.adapter import UnsupportedArchitecture, check_config
from lsa.configs import TINY, build_config, random_hf_model
from lsa.engine import Plan, Read, Start, run
from lsa.model import wrap
from lsa.patching import activation_patching, path_patching

KV = {"1kv": {}, "2kv": {"num_key_value_heads": 2}}
TOL = 1e-5


def gemma(kv: str = "1kv", seed: int = 0):
    return tiny_model("gemma3", seed=seed, spec=KV[kv])


def _hand_rms(module, x):
    """Gemma's RMSNorm written out: ``x / sqrt(mean(x**2) + eps) * (1 + weight)``."""
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * (1 + module.weight.double())


@torch.no_grad()
def _hooked(model, tokens):
    """Per layer, by plain hooks on the HF modules: block input / mid residual / output, o_proj in and out,
    down_proj in and out, the final norm's input, and the logits."""
    got = {k: {} for k in ("pre", "mid", "post", "z", "o", "n", "m")}

    def keep(name, layer, what):
        def hook(module, args, *rest):
            value = {"in": args[0] if args else None, "out": rest[-1] if rest else None}[what]
            got[name][layer] = value[0] if isinstance(value, tuple) else value

        return hook

    handles = []
    for layer, block in enumerate(model.hf.model.layers):
        pre = lambda m, a, k, layer=layer: got["pre"].__setitem__(layer, a[0] if a else k["hidden_states"])  # noqa: E731
        handles += [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(keep("post", layer, "out")),
            block.pre_feedforward_layernorm.register_forward_pre_hook(keep("mid", layer, "in")),
            block.self_attn.o_proj.register_forward_hook(keep("z", layer, "in")),
            block.self_attn.o_proj.register_forward_hook(keep("o", layer, "out")),
            block.mlp.down_proj.register_forward_hook(keep("n", layer, "in")),
            block.mlp.down_proj.register_forward_hook(keep("m", layer, "out")),
        ]
    handles.append(model.hf.model.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0])))
    try:
        got["logits"] = model.hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return got


# ----------------------------------------------------------------- the config and the forward
@pytest.mark.parametrize("kv", KV)
def test_random_gemma3_has_sliding_window_gqa_and_random_norm_gains_that_change_the_output(kv):
    model = gemma(kv)
    cfg, ad = model.hf.config, model.adapter
    assert cfg.model_type == "gemma3_text" and ad.layout.family == "gemma3"
    assert (ad.n_heads, ad.n_kv_heads, ad.d_head) == (4, 1 if kv == "1kv" else 2, 8)
    assert cfg.layer_types[:2] == ["sliding_attention"] * 2 and cfg.layer_types[2] == "full_attention"
    assert ad.describe()["sandwich_norms"] is True
    tokens = random_tokens(2, 9)  # longer than the 4-token window
    logits = _hooked(model, tokens)["logits"]
    # the window acts: the same weights with a window wider than the prompt give other logits
    wide = random_hf_model({**TINY["gemma3"], **KV[kv], "sliding_window": 64})
    wide.load_state_dict(model.hf.state_dict())
    with torch.no_grad():
        assert (wide(tokens).logits - logits)[:, 4:].abs().max() > 1e-3
        assert (wide(tokens).logits - logits)[:, :4].abs().max() < 1e-5  # within the window nothing differs
    # the embeddings are scaled by sqrt(d_model) inside the embedding module
    with torch.no_grad():
        scaled = model.module("embed")(tokens)
    torch.testing.assert_close(scaled, model.hf.model.embed_tokens.weight[tokens] * 32**0.5, atol=1e-5, rtol=1e-5)
    assert model.adapter.unembed_weight(model.hf).data_ptr() == model.hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kv", KV)
def test_lsa_forward_from_layer_zero_and_from_a_cached_layer_equals_hf_forward(kv):
    model = gemma(kv, seed=1)
    tokens = random_tokens(3, 9, seed=2)
    end = torch.tensor([8, 6, 7])
    got = _hooked(model, tokens)
    want = got["logits"][torch.arange(3), end]
    reads = [Read("resid_pre", 2), Read("resid_mid", 1), Read("mlp_out", 0)]
    out = run(model, tokens, Plan(reads=reads, end=end))
    logits, cache = out.logits, out.values
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[("resid_mid", 1)], got["mid"][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[("mlp_out", 0)], got["post"][0] - got["mid"][0], atol=1e-5, rtol=0)
    # skipping blocks 0-1 (their output from the cache) still builds the sliding-window masks right
    resumed = run(model, tokens, Plan(start=Start(2, cache[("resid_pre", 2)]), end=end)).logits
    torch.testing.assert_close(resumed, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- writes through the sandwich norms
@pytest.mark.parametrize("kv", KV)
def test_writes_are_the_sandwich_norm_outputs_and_the_frozen_scale_rebuilds_them(kv):
    model = gemma(kv, seed=3)
    tokens = random_tokens(2, 7, seed=4)
    got = _hooked(model, tokens)
    acts = flow.capture(model, tokens)
    ad = model.adapter
    for layer in range(ad.n_layers):
        block = model.hf.model.layers[layer]
        attn_write = got["mid"][layer] - got["pre"][layer]
        mlp_write = got["post"][layer] - got["mid"][layer]
        # the write is the post-norm of the projection output, by the formula written out here
        torch.testing.assert_close(_hand_rms(block.post_attention_layernorm, got["o"][layer]).float(), attn_write, atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(_hand_rms(block.post_feedforward_layernorm, got["m"][layer]).float(), mlp_write, atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(acts.attn_out[layer], attn_write, atol=1e-5, rtol=0)
        torch.testing.assert_close(acts.mlp_out[layer], mlp_write, atol=1e-5, rtol=0)
        # the frozen-scale factor maps the projection output to the write
        torch.testing.assert_close(got["o"][layer] * acts.attn_scale[layer], acts.attn_out[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["m"][layer] * acts.mlp_scale[layer], acts.mlp_out[layer], atol=1e-6, rtol=0)
        assert model.module("attn_write", layer) is block.post_attention_layernorm
        assert model.module("mlp_write", layer) is block.post_feedforward_layernorm
        assert model.module("ln2", layer) is block.pre_feedforward_layernorm


@pytest.mark.parametrize("kv", KV)
def test_each_heads_write_is_its_projection_slice_times_the_runs_norm_scale_and_they_sum_to_the_write(kv):
    model = gemma(kv, seed=5)
    tokens = random_tokens(2, 7, seed=6)
    got = _hooked(model, tokens)
    acts = flow.capture(model, tokens)
    ad = model.adapter
    for layer in range(ad.n_layers):
        block = model.hf.model.layers[layer]
        o = got["o"][layer].double()
        scale = (1 + block.post_attention_layernorm.weight.double()) / torch.sqrt(
            o.pow(2).mean(-1, keepdim=True) + block.post_attention_layernorm.eps
        )
        writes = flow.head_writes(model, acts, layer)  # [b, pos, H, d]
        for h in range(ad.n_heads):
            z = torch.zeros_like(got["z"][layer]).reshape(2, 7, ad.n_heads, ad.d_head)
            z[:, :, h] = got["z"][layer].reshape(2, 7, ad.n_heads, ad.d_head)[:, :, h]
            with torch.no_grad():
                ref = block.self_attn.o_proj(z.reshape(2, 7, -1)).double() * scale
            torch.testing.assert_close(writes[:, :, h].double(), ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                lens.head_write(acts, model, layer, h, 1, 5).double(), ref[1, 5], atol=1e-5, rtol=0
            )
        torch.testing.assert_close(writes.sum(2), got["mid"][layer] - got["pre"][layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv", KV)
def test_route_parts_sum_to_each_residual_write(kv):
    model = gemma(kv, seed=7)
    tokens = random_tokens(2, 8, seed=8)
    got = _hooked(model, tokens)
    acts = flow.capture(model, tokens)
    ad = model.adapter
    for layer in range(ad.n_layers):
        parts, bias = flow.decompose_attention(model, acts, layer)  # [b, H, q, k, d], [b, q, d]
        torch.testing.assert_close(parts.sum((1, 3)) + bias, got["mid"][layer] - got["pre"][layer], atol=1e-5, rtol=0)
        # the FFN write split into neurons, each scaled by the run's post-FFN norm factor
        w_out = ad.mlp_out_weight(model.hf, layer)  # [d_mlp, d_model]
        neurons = acts.neurons[layer][..., :, None] * w_out * acts.mlp_scale[layer][..., None, :]
        torch.testing.assert_close(neurons.sum(-2), got["post"][layer] - got["mid"][layer], atol=1e-5, rtol=0)
    flow_ = flow.contributions(model, tokens)  # its internal sum checks pass, and every sum is normalised
    total = flow_.attn.sum((2, 4)) + flow_.attn_resid + flow_.attn_bias
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_neuron_importances_use_the_scaled_neuron_writes():
    model = gemma("2kv", seed=9)
    tokens = random_tokens(1, 6, seed=10)
    got = _hooked(model, tokens)
    layer, pos = 1, 4
    block = model.hf.model.layers[layer]
    m = got["m"][layer][0, pos].double()
    scale = (1 + block.post_feedforward_layernorm.weight.double()) / torch.sqrt(
        m.pow(2).mean() + block.post_feedforward_layernorm.eps
    )
    parts = got["n"][layer][0, pos].double()[:, None] * block.mlp.down_proj.weight.T.double() * scale  # [d_mlp, d]
    post, mid = got["post"][layer][0, pos].double(), got["mid"][layer][0, pos].double()

    def prox(y, z):
        return (y.abs().sum(-1) - (y - z).abs().sum(-1)).clamp_min(0)

    p = prox(post, parts)
    expected = p / (p.sum() + prox(post, mid))
    frame = flow.neuron_contributions(model, tokens, layer, pos, top=None).set_index("neuron")
    torch.testing.assert_close(
        torch.tensor(frame.loc[list(range(model.adapter.d_mlp)), "importance"].values), expected, atol=1e-6, rtol=0
    )


# ----------------------------------------------------------------- patching through the shared key/value head
@pytest.mark.parametrize("kv", KV)
def test_patching_every_site_matches_plain_hook_references(kv):
    model = gemma(kv, seed=11)
    prompts = make_prompts(n=3, pos=7, lengths=[7, 6, 5], seed=12)
    for site in ("head", "attn_out", "mlp_out", "resid_mid", "neuron"):
        kw = {"neurons": [2, 9]} if site == "neuron" else {}
        res = activation_patching(model, prompts, site, progress=False, **kw)
        for row, patched in zip(res.components.to_dict("records"), res.patched):
            ref = ref_patch_metric(model, prompts, site, row["layer"], row.get("head", row.get("neuron")), None)
            assert (patched - ref).abs().max() <= TOL, (kv, site, row)


@pytest.mark.parametrize("kv", KV)
def test_path_patching_into_queries_keys_and_values_matches_plain_hook_references(kv):
    model = gemma(kv, seed=13)
    prompts = make_prompts(n=2, pos=7, lengths=[7, 6], seed=14)
    receivers = [(2, 0), (2, 3), (1, 2)]  # with one kv head, every query head shares the patched keys / values
    senders = [(0, 1), (0, 3), (1, 0)]
    for kinds in ("q", "k", "v", "kv"):
        res = path_patching(model, prompts, senders=senders, receivers=receivers, receiver_input=kinds, progress=False)
        for sender, patched in zip(senders, res.patched):
            ref = ref_path_to_receivers(model, prompts, sender, receivers, kinds)
            assert (patched - ref).abs().max() <= TOL, (kv, kinds, sender)


# ----------------------------------------------------------------- lens and neurons
def test_lens_reads_the_final_norm_with_one_plus_weight_and_heads_through_their_sandwich_norm():
    model = gemma("1kv", seed=15)
    tokens = random_tokens(1, 6, seed=16)
    got = _hooked(model, tokens)
    x = got["final"][0, -1]
    w_u, final = model.hf.lm_head.weight.double(), model.hf.model.norm
    # frozen at the run's own residual, the map gives the model's logits (no softcapping here)
    torch.testing.assert_close(
        lens.write_logits(model, x, x).double(), got["logits"][0, -1].double(), atol=1e-4, rtol=0
    )
    layer, head = 1, 2
    block = model.hf.model.layers[layer]
    z = torch.zeros(4, 8)
    z[head] = got["z"][layer][0, -1].reshape(4, 8)[head]
    with torch.no_grad():
        o = got["o"][layer][0, -1].double()
        scale = (1 + block.post_attention_layernorm.weight.double()) / torch.sqrt(o.pow(2).mean() + block.post_attention_layernorm.eps)  # fmt: skip
        write = block.self_attn.o_proj(z.reshape(1, -1))[0].double() * scale
        frozen = write / torch.sqrt(x.double().pow(2).mean() + final.eps) * (1 + final.weight.double())
    expected = w_u @ frozen
    frame = lens.head_projection(model, tokens, layer, head, -1, k=5)
    promoted = frame[frame["direction"] == "promoted"]
    assert promoted["token_id"].tolist() == expected.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(promoted["logit"].values), expected.topk(5).values, atol=1e-5, rtol=1e-5)
    # a neuron's direction: down_proj column through both gains, then the unembedding
    neuron = 11
    d = block.mlp.down_proj.weight[:, neuron].double() * (1 + block.post_feedforward_layernorm.weight.double())
    direction = w_u @ (d * (1 + final.weight.double()))
    frame = lens.neuron_projection(model, layer, neuron, k=4)
    assert frame.loc[frame["direction"] == "promoted", "token_id"].tolist() == direction.topk(4).indices.tolist()
    top = N.promoted_tokens(model, layer, neuron, k=4)
    assert top.loc[top["direction"] == "suppressed", "token_id"].tolist() == direction.topk(4, largest=False).indices.tolist()  # fmt: skip


def test_neuron_statistics_and_plnd_norms_match_the_gelu_gate_and_scaled_output_rows():
    model = gemma("2kv", seed=17)
    seqs = {"en": [[5, 6, 7, 8], [9, 10, 11]], "zh": [[40, 41, 42, 43, 44]]}
    stats = N.collect_stats(model, seqs, batch_size=2, progress=False)
    for j, lang in enumerate(["en", "zh"]):
        acts = {layer: [] for layer in range(3)}

        def gate(layer, acts=acts):
            return lambda m, a: acts[layer].append(F.gelu(m.gate_proj(a[0]), approximate="tanh")[0])

        handles = [model.hf.model.layers[layer].mlp.register_forward_pre_hook(gate(layer)) for layer in range(3)]
        with torch.no_grad():
            for s in seqs[lang]:
                model.hf(torch.tensor([s]))
        for h in handles:
            h.remove()
        ref = torch.stack([torch.cat(acts[layer]) for layer in range(3)])  # [layer, tokens, d_mlp]
        torch.testing.assert_close(stats.prob[j].float(), (ref > 0).float().mean(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(stats.mean[j].float(), ref.mean(1), atol=1e-5, rtol=1e-4)
    rows = torch.stack(
        [
            (
                model.hf.model.layers[la].mlp.down_proj.weight.T
                * (1 + model.hf.model.layers[la].post_feedforward_layernorm.weight)
            ).norm(dim=-1)  # fmt: skip
            for la in range(3)
        ]
    )
    torch.testing.assert_close(N.plnd_importance(model, stats), stats.mean_abs * rows[None].double(), atol=1e-6, rtol=1e-6)  # fmt: skip


# ----------------------------------------------------------------- what the adapter refuses
@pytest.mark.parametrize(
    "attribute,value",
    [("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True)],
)
def test_config_attributes_lsa_does_not_implement_are_refused_by_name(attribute, value):
    config = build_config({**TINY["gemma3"], attribute: value})
    with pytest.raises(UnsupportedArchitecture, match=f"{attribute}={value!r}.*set it to"):
        check_config(config)
    hf = random_hf_model({**TINY["gemma3"], attribute: value})
    with pytest.raises(UnsupportedArchitecture, match=attribute):
        wrap(hf)
