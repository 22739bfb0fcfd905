"""lsa's sites inside a trace of yours (``model.sites``) and a plan applied there (``lsa.engine.apply``).

References are plain torch hooks on the Hugging Face modules (no lsa engine), and lsa's own
activation patching, which ``tests/test_patching.py`` checks against plain hooks.
"""

from __future__ import annotations

import dataclasses

import nnsight
import pytest
import torch
from helpers import FAMILIES, make_prompts, parity_model, tiny_model

from lsa import engine
from lsa import steering as S
from lsa.engine import Edit, Plan, Read
from lsa.metrics import logit_diff
from lsa.patching import activation_patching

TOL = 1e-5
SIDES = {  # site -> (adapter part or "block", "in" | "out"), written out here as the models define them
    "resid_pre": ("block", "in"),
    "attn_in": ("ln1", "out"),
    "head": ("o_proj", "in"),
    "attn_proj": ("o_proj", "out"),
    "attn_out": ("attn_write", "out"),
    "resid_mid": ("ln2", "in"),  # the mid residual is what the second norm reads
    "mlp_act": ("mlp_act", "out"),
    "neuron": ("mlp_out", "in"),
    "mlp_proj": ("mlp_out", "out"),
    "mlp_out": ("mlp_write", "out"),
    "resid_post": ("block", "out"),
}


def _twins(family):
    model = tiny_model(family)
    return [model, dataclasses.replace(model, remote="local")]


@torch.no_grad()
def _hooked(model, tokens, module, side, fn):
    """Full logits of a plain forward with one hook: ``fn(tensor) -> tensor or None`` on ``module``'s input/output."""

    def pre(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = fn(x)
        if y is None:
            return None
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    def post(m, args, out):
        y = fn(out[0] if isinstance(out, tuple) else out)
        return None if y is None else ((y, *out[1:]) if isinstance(out, tuple) else y)

    handle = (
        module.register_forward_pre_hook(pre, with_kwargs=True) if side == "in" else module.register_forward_hook(post)
    )
    try:
        return model.hf(tokens).logits
    finally:
        handle.remove()


def _module(model, part, layer):
    return model.adapter.block(model.hf, layer) if part == "block" else model.module(part, layer)


def _kept(store: dict):
    """A hook function keeping its tensor in ``store["x"]`` and changing nothing."""

    def keep(x):
        store["x"] = x.clone()

    return keep


def _plain_read(model, tokens, site, layer):
    seen = {}
    part, side = SIDES[site]
    _hooked(model, tokens, _module(model, part, layer), side, _kept(seen))
    return seen["x"]


# ----------------------------------------------------------------- the must-show: head patching by hand
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("remote", [False, "local"])
def test_head_activation_patching_written_by_hand_with_the_accessors_equals_activation_patching(family, remote):
    base = parity_model(family)  # weights large enough that every head moves the metric
    model = dataclasses.replace(base, remote=remote)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 4, 5], seed=2)
    a, sites, rows = model.adapter, model.sites, torch.arange(len(prompts))
    with torch.no_grad(), model.trace(prompts.corrupt):
        donor = nnsight.save([sites.head[layer] for layer in range(a.n_layers)])  # each [batch, pos, heads, d_head]
    patched = torch.empty(a.n_layers, a.n_heads, len(prompts))
    for layer in range(a.n_layers):
        for head in range(a.n_heads):
            with torch.no_grad(), model.trace(prompts.clean):
                sites.head[layer, head] = donor[layer][:, :, head]
                logits = sites.logits.save()
            patched[layer, head] = logit_diff(logits[rows, prompts.end], prompts)
    want = activation_patching(base, prompts, "head", progress=False)
    torch.testing.assert_close(patched.reshape(-1, len(prompts)), want.patched, rtol=0, atol=TOL)
    assert want.effect.abs().max() > 0.1  # the heads do something


# ----------------------------------------------------------------- reads
@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_read_in_a_trace_equals_a_plain_hook_with_heads_and_key_value_heads_split(family):
    model = tiny_model(family)
    a, sites, layer = model.adapter, model.sites, 1
    tokens = make_prompts(n=2, pos=5, seed=4).clean
    names = [s for s in SIDES if not (s == "resid_mid" and a.parallel_residual)]
    with torch.no_grad(), model.trace(tokens):
        got = nnsight.save({s: getattr(sites, s)[layer] for s in ["resid_pre", "attn_in", "q", "k", "v", *names[2:]]})
    for site in names:
        want = _plain_read(model, tokens, site, layer)
        if site in ("head",):
            want = want.unflatten(-1, (a.n_heads, a.d_head))
        torch.testing.assert_close(got[site], want, rtol=0, atol=TOL, msg=f"{family} {site}")
    for kind, n in (("q", a.n_heads), ("k", a.n_kv_heads), ("v", a.n_kv_heads)):
        module, _ = a.qkv_columns(model.hf, kind, layer, 0)
        out = {}
        _hooked(model, tokens, module, "out", _kept(out))
        want = torch.stack([out["x"][..., a.qkv_columns(model.hf, kind, layer, g)[1]] for g in range(n)], -2)
        assert got[kind].shape == (*tokens.shape, n, a.d_head)
        torch.testing.assert_close(got[kind], want, rtol=0, atol=TOL, msg=f"{family} {kind}")


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_one_unit_and_nnterps_names_read_the_same_tensors_locally_and_remotely(family):
    for model in _twins(family):
        sites, tokens = model.sites, make_prompts(n=2, pos=5, seed=4).clean
        with torch.no_grad(), model.trace(tokens):
            whole = sites.resid_pre[1].save()
            via_nnterp = sites.layers_input[1].save()  # the same module side: one reach, two names
            kv = sites.k[1, 1].save()  # in forward order: keys before the heads' outputs
            heads = sites.head[1].save()
            one = sites.head[1, 2].save()
            neuron = sites.neuron[1, 5].save()
            out = sites.layers_output[1].save()
        torch.testing.assert_close(via_nnterp, whole, rtol=0, atol=0)
        torch.testing.assert_close(one, heads[:, :, 2], rtol=0, atol=0)
        assert kv.shape == (*tokens.shape, model.adapter.d_head)
        assert neuron.shape == tokens.shape
        torch.testing.assert_close(out, _plain_read(model, tokens, "resid_post", 1), rtol=0, atol=TOL)


# ----------------------------------------------------------------- sets
@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2", "gemma3"])
def test_setting_a_head_a_key_value_head_and_the_mid_residual_equals_plain_hooks(family):
    for model in _twins(family):
        a, sites = model.adapter, model.sites
        tokens = make_prompts(n=2, pos=5, seed=6).clean
        d = a.d_head
        with torch.no_grad(), model.trace(tokens):
            sites.head[1, 1] = torch.zeros(2, 5, d)
            head_zeroed = sites.logits.save()
        want = _hooked(
            model,
            tokens,
            model.module("o_proj", 1),
            "in",
            lambda x, d=d: torch.cat([x[..., :d], 0 * x[..., d : 2 * d], x[..., 2 * d :]], -1),
        )
        torch.testing.assert_close(head_zeroed, want, rtol=0, atol=TOL)
        module, cols = a.qkv_columns(model.hf, "v", 1, a.n_kv_heads - 1)
        with torch.no_grad(), model.trace(tokens):
            sites.v[1, a.n_kv_heads - 1] = 2 * sites.v[1, a.n_kv_heads - 1]
            v_doubled = sites.logits.save()

        def double(x, cols=cols):
            x = x.clone()
            x[..., cols] *= 2
            return x

        torch.testing.assert_close(v_doubled, _hooked(model, tokens, module, "out", double), rtol=0, atol=TOL)
        with torch.no_grad(), model.trace(tokens):
            sites.resid_mid[0] = 1.5 * sites.resid_mid[0]
            mid = sites.logits.save()
        want = engine.run(model, tokens, Plan(edits=[Edit("resid_mid", 0, lambda x: 1.5 * x)], logits="all")).logits
        torch.testing.assert_close(mid, want, rtol=0, atol=TOL)


def test_accessors_refuse_what_a_site_does_not_have_with_the_reason():
    model = tiny_model("gpt2")
    sites = model.sites
    with pytest.raises(AttributeError, match="no site 'heads'.*layers_output"):
        sites.heads  # noqa: B018
    with pytest.raises(AttributeError, match="parallel-residual"):
        tiny_model("gpt_neox").sites.resid_mid  # noqa: B018
    tokens = make_prompts(n=1, pos=4).clean
    with pytest.raises(IndexError, match="4 unit"), torch.no_grad(), model.trace(tokens):
        sites.head[0, 4]
    with pytest.raises(ValueError, match="read, not set"), torch.no_grad(), model.trace(tokens):
        sites.pattern[0] = torch.zeros(1, 4, 4, 4)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        sites.head[2]


# ----------------------------------------------------------------- a plan, and steering, in a trace of yours
@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
def test_steer_acts_inside_your_own_trace_through_apply_locally_and_remotely(family):
    local, remote = _twins(family)
    tokens = make_prompts(n=2, pos=5, seed=7).clean
    edits = [S.deactivate({0: [1, 2, 3]}), S.scale({1: [0, 4]}, 4.0)]
    with S.steer(local, *edits):
        want = engine.run(local, tokens).logits
    plain = local.hf(tokens).logits
    assert (want - plain).abs().max() > 1e-3  # the edits change the logits
    for model in (local, remote):
        with torch.no_grad(), model.trace(tokens):
            unsteered = model.sites.logits.save()
        with S.steer(model, *edits), torch.no_grad(), model.trace(tokens):
            engine.apply(model)
            steered = model.sites.logits.save()
        torch.testing.assert_close(unsteered, plain, rtol=0, atol=TOL)  # a trace of yours is yours until you apply
        torch.testing.assert_close(steered, want, rtol=0, atol=TOL)
        with S.steer(model, *edits):
            prepared = engine.prepare(model, Plan(reads=[Read("mlp_act", 0)], logits=None))
        with torch.no_grad(), model.trace(tokens):  # prepared inside the block, applied after it: still steered
            got = prepared.apply()
            again = model.sites.logits.save()
        torch.testing.assert_close(again, want, rtol=0, atol=TOL)
        assert torch.all(got[("mlp_act", 0)][..., [1, 2, 3]] == 0)


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_a_plan_applied_in_your_trace_reads_and_edits_as_the_engine_runs_it(family):
    model = tiny_model(family)
    tokens = make_prompts(n=2, pos=5, seed=8).clean
    plan = Plan(
        edits=[Edit("head", 0, lambda x: 0.5 * x), Edit("neuron", 1, lambda x: x + 0.25)],
        reads=[Read("attn_out", 0), Read("k", 1), Read("mlp_out", 1)],
        logits="all",
    )
    want = engine.run(model, tokens, plan)
    with torch.no_grad(), model.trace(tokens):
        got = engine.apply(model, plan)
        logits = model.sites.logits.save()
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=TOL)
    for key in want.values:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=TOL)
