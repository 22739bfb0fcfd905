"""Zero, mean and resample ablation and circuit faithfulness against hand-written hooks."""

import pytest
import torch
from helpers import FAMILIES, make_prompts, random_tokens, tiny_model

from lsa import engine
from lsa.ablation import ablate, ablation_sweep, complement, donors, faithfulness
from lsa.metrics import logit_diff

TOL = 1e-5


@torch.no_grad()
def _acts(model, tokens, module, kind):
    store = {}
    if kind == "in":
        handle = module.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: store.__setitem__("x", out.clone()))
    try:
        model.hf(tokens)
    finally:
        handle.remove()
    return store["x"]


@torch.no_grad()
def ref_ablate(model, prompts, components, values, where=None):
    """Clean run with each component overwritten by ``values[component]`` ([n, pos, width] or broadcastable).

    ``where``: overwrite only each prompt's position ``where[b]`` (default: every position).
    """
    a = model.adapter
    n, width = prompts.clean.shape
    keep = torch.ones(n, width, 1, dtype=torch.bool)
    if where is not None:
        keep = (torch.arange(width)[None, :] == where[:, None])[..., None]
    handles = []
    for comp, value in zip(components, values):
        kind, layer = comp[0], comp[1]
        if kind == "head":
            cols = slice(comp[2] * a.d_head, (comp[2] + 1) * a.d_head)

            def pre(m, args, cols=cols, value=value):
                x = args[0].clone()
                x[..., cols] = torch.where(keep, value, x[..., cols])
                return (x, *args[1:])

            handles.append(model.module("o_proj", layer).register_forward_pre_hook(pre))
        elif kind == "neuron":

            def pre(m, args, i=comp[2], value=value):
                x = args[0].clone()
                x[..., i] = torch.where(keep[..., 0], value, x[..., i])
                return (x, *args[1:])

            handles.append(model.module("mlp_out", layer).register_forward_pre_hook(pre))
        else:  # the MLP's write: what joins the residual (a sandwich norm's output in Gemma 3)
            handles.append(
                model.module("mlp_write", layer).register_forward_hook(
                    lambda m, args, out, value=value: torch.where(keep, torch.zeros_like(out) + value, out)
                )
            )
    try:
        return logit_diff(model.hf(prompts.clean).logits, prompts)
    finally:
        for h in handles:
            h.remove()


COMPONENTS = [("head", 0, 1), ("head", 1, 3), ("mlp", 0), ("neuron", 1, 5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_ablation_matches_reference_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=20)
    got = ablate(model, prompts, COMPONENTS, method="zero")
    ref = ref_ablate(model, prompts, COMPONENTS, [0.0] * len(COMPONENTS))
    assert (got - ref).abs().max() <= TOL


def _ref_values(model, tokens, per_prompt_index=None):
    """Per-position means (or rows ``per_prompt_index``) of each component's activation on ``tokens``."""
    a = model.adapter
    values = []
    for comp in COMPONENTS:
        kind, layer = comp[0], comp[1]
        if kind == "head":
            x = _acts(model, tokens, model.module("o_proj", layer), "in")[
                ..., comp[2] * a.d_head : (comp[2] + 1) * a.d_head
            ]
        elif kind == "neuron":
            x = _acts(model, tokens, model.module("mlp_out", layer), "in")[..., comp[2]]
        else:
            x = _acts(model, tokens, model.module("mlp_write", layer), "out")
        values.append(x.mean(0) if per_prompt_index is None else x[per_prompt_index])
    return values


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_ablation_over_reference_tokens_matches_reference_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, seed=21)
    reference = random_tokens(batch=5, pos=6, seed=22)
    got = ablate(model, prompts, COMPONENTS, method="mean", reference=reference)
    ref = ref_ablate(model, prompts, COMPONENTS, _ref_values(model, reference))
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bloom"])
def test_resample_ablation_takes_the_chosen_reference_rows(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, seed=23)
    reference = random_tokens(batch=4, pos=6, seed=24)
    index = torch.tensor([3, 0, 2])
    got = ablate(model, prompts, COMPONENTS, method="resample", reference=reference, index=index)
    ref = ref_ablate(model, prompts, COMPONENTS, _ref_values(model, reference, index))
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_interchange_mean_and_resample_take_the_counterfactuals_of_the_prompt_or_its_group(family):
    model = tiny_model(family)
    prompts = make_prompts(n=5, pos=6, lengths=[6, 5, 6, 6, 5], seed=31)  # groups {0, 2, 3}, {1, 4}
    groups = prompts.groups()
    assert groups.tolist() == [0, 1, 0, 0, 1]
    own = _ref_values(model, prompts.corrupt, torch.arange(5))  # each prompt's own counterfactual
    got = ablate(model, prompts, COMPONENTS, method="interchange")
    assert (got - ref_ablate(model, prompts, COMPONENTS, own)).abs().max() <= TOL
    means = [torch.stack([v[groups == g].mean(0) for g in groups.tolist()]) for v in own]
    got = ablate(model, prompts, COMPONENTS, method="mean")
    assert (got - ref_ablate(model, prompts, COMPONENTS, means)).abs().max() <= TOL
    rows = donors(prompts, "resample", seed=3)
    assert (groups[rows] == groups).all() and (rows != torch.arange(5)).all()  # its group, never itself
    got = ablate(model, prompts, COMPONENTS, method="resample", seed=3)
    assert (got - ref_ablate(model, prompts, COMPONENTS, [v[rows] for v in own])).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_faithfulness_ablates_everything_outside_the_circuit(family):
    model = tiny_model(family)
    a = model.adapter
    prompts = make_prompts(n=4, pos=6, seed=25)
    circuit = [("head", 0, 2), ("head", 1, 0), ("head", 1, 1)]
    res = faithfulness(model, prompts, circuit, method="zero")
    outside = [("head", la, h) for la in range(a.n_layers) for h in range(a.n_heads) if ("head", la, h) not in circuit]
    values = [0.0] * len(outside)
    full = logit_diff(model.logits(prompts.clean), prompts)
    assert (res.full - full).abs().max() <= TOL
    # reuse the hook builder for head-only sets (COMPONENTS-independent)
    assert (res.circuit - _ref_heads(model, prompts, outside, values)).abs().max() <= TOL
    every = [("head", la, h) for la in range(a.n_layers) for h in range(a.n_heads)]
    assert (res.empty - _ref_heads(model, prompts, every, [0.0] * len(every))).abs().max() <= TOL
    assert res.faithfulness == pytest.approx(float(res.circuit.mean() / full.mean()), rel=1e-4)
    frame = res.frame
    assert list(frame.columns) == [
        "method", "ablation", "components", "prompts", "full", "circuit", "empty", "faithfulness", "normalized",
        "ci_low", "ci_high",
    ]  # fmt: skip
    assert frame["ablation"][0] == "zero ablation of every head outside the circuit"
    assert frame["ci_low"][0] <= res.normalized <= frame["ci_high"][0]
    # the whole model as the circuit: nothing is ablated
    kept = faithfulness(model, prompts, every, method="mean")
    assert kept.faithfulness == pytest.approx(1.0, abs=1e-5)


def _ref_heads(model, prompts, heads, values):
    return ref_ablate(model, prompts, heads, values)


def test_faithfulness_with_an_mlp_in_the_set_also_ablates_the_other_mlps():
    model = tiny_model("llama")
    prompts = make_prompts(n=3, pos=6, seed=26)
    comps = [("head", 1, 2), ("mlp", 1), ("neuron", 0, 4)]
    outside = complement(model, comps)
    assert ("mlp", 0) not in outside and ("mlp", 1) not in outside
    assert ("neuron", 0, 4) not in outside and ("neuron", 0, 3) in outside
    res = faithfulness(model, prompts, comps, method="zero")
    ref = ref_ablate(model, prompts, outside, [0.0] * len(outside))
    assert (res.circuit - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_ablation_sweep_matches_one_hook_per_head(family):
    model = tiny_model(family)
    a = model.adapter
    prompts = make_prompts(n=3, pos=6, lengths=[6, 4, 5], seed=27)
    res = ablation_sweep(model, prompts, "head", method="zero", progress=False)
    assert res.array.shape == (a.n_layers, a.n_heads)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        ref = ref_ablate(model, prompts, [("head", row["layer"], row["head"])], [0.0])
        assert (patched - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_at_positions_recomputes_only_them_and_matches_reference_hooks(family):
    model = tiny_model(family)
    a = model.adapter
    prompts = make_prompts(n=3, pos=8, lengths=[8, 7, 7], seed=29)
    reference = random_tokens(batch=4, pos=8, seed=30)
    where = {"mid": prompts.positions["mid"], "end": prompts.end}
    got = ablate(model, prompts, COMPONENTS, method="mean", reference=reference, positions="mid")
    ref = ref_ablate(model, prompts, COMPONENTS, _ref_values(model, reference), where=where["mid"])
    assert (got - ref).abs().max() <= TOL
    widths = []
    last = a.blocks(model.hf)[-1]
    handle = last.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    kw = dict(method="mean", reference=reference, positions=["mid", "end"], progress=False)
    try:
        res = ablation_sweep(model, prompts, "head", **kw)
    finally:
        handle.remove()
    with engine.without("reuse_cache"):
        old = ablation_sweep(model, prompts, "head", **kw)
    assert res.array.shape == (a.n_layers, a.n_heads, 2)
    # after the reference, clean and counterfactual runs, each ablated run recomputes from its position on
    recomputed = {int(n - p) for pos in where.values() for n, p in zip(prompts.lengths, pos)}
    assert set(widths[3:]) == recomputed == {1, 4}
    torch.testing.assert_close(res.patched, old.patched, rtol=0, atol=1e-5)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        o_in = _acts(model, reference, model.module("o_proj", row["layer"]), "in")
        value = o_in[..., row["head"] * a.d_head : (row["head"] + 1) * a.d_head].mean(0)
        ref = ref_ablate(model, prompts, [("head", row["layer"], row["head"])], [value], where=where[row["pos"]])
        assert (patched - ref).abs().max() <= TOL, (family, row)


def test_bad_components_and_methods_give_clear_errors():
    model = tiny_model("gpt2")
    prompts = make_prompts(n=2, pos=5, seed=28)
    with pytest.raises(ValueError, match="bad component"):
        ablate(model, prompts, [("attn", 0)])
    with pytest.raises(IndexError, match="head 4 out of range"):
        ablate(model, prompts, [("head", 0, 4)])
    with pytest.raises(IndexError, match="layer 2 out of range"):
        ablate(model, prompts, [("mlp", 2)])
    with pytest.raises(ValueError, match="method must be one of"):
        ablate(model, prompts, [("mlp", 0)], method="gaussian")
    with pytest.raises(ValueError, match="index must be"):
        ablate(model, prompts, [("mlp", 0)], method="resample", index=torch.tensor([0, 9]))
