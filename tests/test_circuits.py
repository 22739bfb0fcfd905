"""Circuits as data: discovery on a planted circuit, comparison, JSON, validation, roles, faithfulness, drawing.

The planted model is a tiny random GPT-2 in which every head but two writes
nothing (its rows of the attention output projection are zero), so only the
planted heads can have any effect; their effects are checked against plain
torch hooks written here.
"""

import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch
from helpers import make_prompts, tiny_model

from lsa import circuits as C
from lsa import workbook
from lsa.plotting import circuits as PC

PLANTED = [(0, 1), (1, 2)]


def planted_model(planted=PLANTED, scale: float = 10.0):
    """Tiny GPT-2 (2 layers x 4 heads) where only ``planted`` heads write to the residual stream."""
    model = tiny_model("gpt2", seed=3)
    a = model.adapter
    with torch.no_grad():
        for layer in range(a.n_layers):
            w = model.module("o_proj", layer).weight  # Conv1D: [n_heads * d_head, d_model]
            for h in range(a.n_heads):
                rows = slice(h * a.d_head, (h + 1) * a.d_head)
                w[rows] = w[rows] * scale if (layer, h) in planted else 0.0
    return model


def ioi_like_prompts(n=6, pos=7, seed=0):
    prompts = make_prompts(n=n, pos=pos, seed=seed)
    prompts.positions.update(IO=torch.full((n,), 1), S1=torch.full((n,), 2), S2=torch.full((n,), 5))
    return prompts


# ----------------------------------------------------------------- independent references
def _logit_diff(logits, prompts):
    rows = torch.arange(len(prompts))
    last = logits[rows, prompts.end]
    return last[rows, prompts.answer] - last[rows, prompts.distractor]


def _head_inputs(model, tokens):
    """Every layer's o_proj input ``[n, pos, n_heads * d_head]`` from a plain forward."""
    seen = {}
    hooks = [
        model.module("o_proj", layer).register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0])
        )
        for layer in range(model.adapter.n_layers)
    ]
    with torch.no_grad():
        model.hf(tokens)
    for h in hooks:
        h.remove()
    return seen


def _reference_direct_effect(model, prompts, sender):
    """Normalised path effect sender -> logits: clean run, sender's z from the corrupt run, every other head frozen clean."""
    a = model.adapter
    clean_z, corrupt_z = _head_inputs(model, prompts.clean), _head_inputs(model, prompts.corrupt)

    def frozen(layer):
        def pre(m, args):
            z = clean_z[layer].clone().reshape(*clean_z[layer].shape[:2], a.n_heads, a.d_head)
            if layer == sender[0]:
                dz = corrupt_z[layer].reshape(*z.shape)
                z[:, :, sender[1]] = dz[:, :, sender[1]]
            return (z.reshape(clean_z[layer].shape),)

        return pre

    hooks = [model.module("o_proj", layer).register_forward_pre_hook(frozen(layer)) for layer in range(a.n_layers)]
    with torch.no_grad():
        patched = _logit_diff(model.hf(prompts.clean).logits, prompts).mean()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        clean = _logit_diff(model.hf(prompts.clean).logits, prompts).mean()
        corrupt = _logit_diff(model.hf(prompts.corrupt).logits, prompts).mean()
    return float((patched - clean) / (clean - corrupt))


def _reference_value_path_effect(model, prompts, sender, receiver, pos=None):
    """Normalised effect of sender -> receiver's value only: the receiver's v from a run with the sender corrupted
    (at every position, or at ``pos`` ``[n]`` alone)."""
    a = model.adapter
    corrupt_z = _head_inputs(model, prompts.corrupt)
    block = model.adapter.block(model.hf, receiver[0])
    seen = {}
    at = slice(None) if pos is None else pos

    def swap(m, args):
        z = args[0].clone().reshape(*args[0].shape[:2], a.n_heads, a.d_head)
        rows = slice(None) if pos is None else torch.arange(len(pos))
        z[rows, at, sender[1]] = corrupt_z[sender[0]].reshape(*z.shape)[rows, at, sender[1]]
        return (z.reshape(args[0].shape),)

    hooks = [
        model.module("o_proj", sender[0]).register_forward_pre_hook(swap),
        block.ln_1.register_forward_hook(lambda m, args, out: seen.__setitem__("x", out)),
    ]
    with torch.no_grad():
        model.hf(prompts.clean)
    for h in hooks:
        h.remove()
    d = a.d_head
    v_cols = slice(
        2 * a.n_heads * d + receiver[1] * d, 2 * a.n_heads * d + (receiver[1] + 1) * d
    )  # c_attn = [q | k | v]

    def patch_v(m, args, out):
        out = out.clone()
        out[..., v_cols] = (seen["x"] @ m.weight + m.bias)[..., v_cols]  # Conv1D: x @ W[in, out] + b
        return out

    hook = block.attn.c_attn.register_forward_hook(patch_v)
    with torch.no_grad():
        patched = _logit_diff(model.hf(prompts.clean).logits, prompts).mean()
    hook.remove()
    with torch.no_grad():
        clean = _logit_diff(model.hf(prompts.clean).logits, prompts).mean()
        corrupt = _logit_diff(model.hf(prompts.corrupt).logits, prompts).mean()
    return float((patched - clean) / (clean - corrupt))


# ----------------------------------------------------------------- discovery
def test_discovery_recovers_planted_heads_and_nothing_else(tmp_path):
    model = planted_model()
    prompts = make_prompts(n=6, pos=7, seed=1)
    found = C.path_patching_discovery(model, prompts, k=1.0, floor=0.01, max_steps=3, roles=False)
    assert sorted(found.circuit.heads) == PLANTED
    steps = found.steps
    planted = [(la, h) in PLANTED for la, h in zip(steps["layer"], steps["head"])]
    assert (steps.loc[[not p for p in planted], "effect"].abs() < 1e-6).all()  # unplanted heads: no effect at all
    # step 1 (heads -> logits) equals plain-hook path patching for every head
    for r in steps[steps["step"] == 1].itertuples():
        want = _reference_direct_effect(model, prompts, (r.layer, r.head)) if (r.layer, r.head) in PLANTED else 0.0
        assert r.effect == pytest.approx(want, abs=1e-4)
    # 1.2 was found through the logits; 0.1 (a small direct effect) through 1.2's value input at step 2
    assert found.circuit.get((1, 2)).evidence["receiver_input"] == "logits"
    via = found.circuit.get((0, 1)).evidence["receiver_input"]
    assert via == "v"
    # ... patched where 1.2 attends most from the end: the named positions and the token after each, by hand
    with torch.no_grad():
        att = model.hf(prompts.clean, output_attentions=True).attentions[1][:, 2]  # [n, q, k]
    rows = torch.arange(len(prompts))
    named = {"first": prompts.positions["first"], "mid": prompts.positions["mid"], "end": prompts.end}
    named.update({f"{k}+1": v + 1 for k, v in list(named.items()) if k != "end"})
    best = max(named, key=lambda k: float(att[rows, prompts.end, named[k]].mean()))
    assert found.circuit.get((0, 1)).evidence["position"] == best
    assert found.circuit.get((0, 1)).effect == pytest.approx(
        _reference_value_path_effect(model, prompts, (0, 1), (1, 2), pos=named[best]), abs=1e-4
    )
    every = C.path_patching_discovery(
        model, prompts, k=1.0, floor=0.01, max_steps=3, roles=False, positions="all", progress=False
    )
    assert sorted(every.circuit.heads) == PLANTED and set(every.steps["position"]) == {"all"}
    assert every.circuit.get((0, 1)).effect == pytest.approx(
        _reference_value_path_effect(model, prompts, (0, 1), (1, 2)), abs=1e-4
    )
    # the only head-to-head edge runs between the planted heads, 0.1 -> 1.2
    head_edges = {(e.sender, e.receiver) for e in found.circuit.edges if e.kind != "logits"}
    assert head_edges == {(("head", 0, 1), ("head", 1, 2))}
    assert found.n_steps == 2  # step 3 would need senders below layer 0: discovery stopped
    # the circuit keeps every step's scores as evidence, and survives a JSON round trip with them
    assert len(found.circuit.steps()) == len(found.steps)
    assert C.Circuit.from_json(found.circuit.to_json(tmp_path / "c.json")) == found.circuit


def test_discovery_on_model_where_no_head_writes_gives_empty_circuit():
    model = planted_model(planted=[])
    prompts = make_prompts(n=4, pos=6, seed=2)
    found = C.path_patching_discovery(model, prompts, roles=True)
    assert len(found.circuit) == 0 and found.circuit.edges == []
    assert found.scores is None
    fig = PC.draw(found.circuit)
    assert fig is not None


def test_selection_rule_matches_hand_computed_z_scores():
    effects = [0.0, 0.1, -0.1, -0.8, 0.02]
    mean = sum(effects) / 5
    std = math.sqrt(sum((e - mean) ** 2 for e in effects) / 5)
    out = C.select(effects, k=1.5, floor=0.05)
    assert out["z"].tolist() == pytest.approx([(e - mean) / std for e in effects])
    assert out["selected"].tolist() == [False, False, False, True, False]
    # one candidate (no spread): only the floor decides
    assert C.select([0.2], k=3, floor=0.05)["selected"].tolist() == [True]
    assert C.select([0.01], k=3, floor=0.05)["selected"].tolist() == [False]


# ----------------------------------------------------------------- data
def _circuit(keys_roles_effects, model="m", language="en", shape=(4, 4)):
    comps = [C.Component(*key, role=role, effect=eff) for key, role, eff in keys_roles_effects]
    return C.Circuit(model, shape[0], shape[1], "ioi", language, comps)


def test_json_round_trip_is_lossless(tmp_path):
    circuit = C.Circuit(
        "toy-bilingual",
        4,
        4,
        "ioi",
        "zh",
        [
            C.Component("head", 3, 1, role="name mover", effect=-0.4123456789, evidence={"step": 1, "z": [1.5, 2]}),
            C.Component("mlp", 0, role="input"),
            C.Component("neuron", 2, 17, role="past tense", effect=0.1, evidence={"scores": {"a": 1, "b": None}}),
        ],
        [
            C.Edge(("head", 3, 1), ("logits",), "logits", -0.4123456789),
            C.Edge(("mlp", 0), ("head", 3, 1), "k", 1e-9, evidence={"per_receiver": True}),
        ],
        evidence={"method": "hand", "parameters": {"k": 1.5}, "names": ["小明", "Mary"]},
        d_mlp=512,
    )
    path = circuit.to_json(tmp_path / "circuit.json")
    back = C.Circuit.from_json(path)
    assert back == circuit
    assert back.get(("neuron", 2, 17)).role == "past tense"
    assert back.edges[0].receiver == ("logits",)
    assert "小明" in path.read_text(encoding="utf-8")


def test_circuit_naming_missing_head_or_layer_is_a_clear_error():
    model = tiny_model("gpt2")  # 2 layers x 4 heads
    with pytest.raises(IndexError, match=r"head 1\.7"):
        _circuit([(("head", 1, 7), "", None)]).validate(model)
    with pytest.raises(IndexError, match=r"head 5\.0.*2 layers"):
        _circuit([(("head", 5, 0), "", None)]).validate(model)
    with pytest.raises(IndexError, match="MLP9"):
        _circuit([(("mlp", 9), "", None)]).validate(model)
    with pytest.raises(ValueError, match="more than once"):
        _circuit([(("head", 0, 0), "", None), (("head", 0, 0), "x", None)])
    assert _circuit([(("head", 1, 3), "", None)]).validate(model)


# ----------------------------------------------------------------- comparison
def test_comparison_of_circuit_with_itself_is_full_overlap():
    a = _circuit([(("head", 3, 0), "name mover", -0.5), (("head", 2, 1), "S-inhibition", -0.2)])
    cmp = C.compare(a, a)
    assert cmp["jaccard"] == 1.0 and cmp["weighted_overlap"] == pytest.approx(1.0)
    assert cmp["role_agreement"] == 1.0 and cmp["n_shared"] == 2


def test_comparison_of_disjoint_circuits_is_zero_overlap():
    a = _circuit([(("head", 3, 0), "name mover", -0.5)], language="en")
    b = _circuit([(("head", 2, 1), "name mover", -0.3)], language="zh")
    cmp = C.compare(a, b)
    assert cmp["jaccard"] == 0.0 and cmp["weighted_overlap"] == 0.0 and cmp["n_shared"] == 0
    assert math.isnan(cmp["role_agreement"])
    assert cmp.only(0) == ["3.0"] and cmp.only(1) == ["2.1"]


def test_partial_overlap_matches_hand_computed_scores():
    a = _circuit([(("head", 0, 0), "x", 1.0), (("head", 1, 1), "name mover", -1.0)], language="en")
    b = _circuit([(("head", 1, 1), "copy", 1.0), (("head", 2, 2), "y", -3.0)], language="zh")
    cmp = C.compare(a, b)
    assert cmp["jaccard"] == pytest.approx(1 / 3)
    # weights: a {0.0: .5, 1.1: .5}; b {1.1: .25, 2.2: .75}; sum min / sum max = .25 / 1.75
    assert cmp["weighted_overlap"] == pytest.approx(0.25 / 1.75)
    assert cmp["role_agreement"] == 0.0
    row = cmp.table.set_index("unit").loc["1.1"]
    assert row["status"] == "shared" and row["role_en"] == "name mover" and row["role_zh"] == "copy"


def test_circuits_of_different_shapes_compare_by_role_and_relative_depth():
    a = _circuit([(("head", 11, 0), "name mover", -1.0), (("head", 7, 3), "S-inhibition", -1.0)], shape=(12, 12))
    b = _circuit([(("head", 3, 2), "name mover", -1.0)], language="zh", shape=(4, 4))
    cmp = C.compare(a, b)
    assert cmp.by == "role" and cmp.shared == ["name mover"]
    assert cmp["jaccard"] == pytest.approx(0.5)
    assert cmp["depth_difference"] == pytest.approx(abs(11.5 / 12 - 3.5 / 4))
    with pytest.raises(ValueError, match="different shapes"):
        C.compare(a, b, by="component")
    other_model = _circuit([(("head", 3, 0), "name mover", -1.0)], model="other", shape=(4, 4))
    assert C.compare(b, other_model).by == "role"  # head indices of two models do not correspond
    matrix = C.overlap_matrix({"a": a, "b": b})
    assert matrix.loc["a", "a"] == 1.0 and matrix.loc["a", "b"] == pytest.approx(0.5)


# ----------------------------------------------------------------- roles
def test_roles_from_hand_built_attention_pattern():
    n, width = 3, 8
    prompts = ioi_like_prompts(n=n, pos=width)  # IO=1, S1=2, S2=5, end=7
    pattern = torch.zeros(n, 1, 4, width, width)
    for q in range(width):
        pattern[:, 0, :, q, 0] = 1.0  # default: attend to the first token
    pattern[:, 0, 0, 7] = 0
    pattern[:, 0, 0, 7, 1] = 1.0  # head 0: end -> IO
    pattern[:, 0, 1, 5] = 0
    pattern[:, 0, 1, 5, 2] = 1.0  # head 1: S2 -> S1 (duplicate token)
    pattern[:, 0, 2, 5] = 0
    pattern[:, 0, 2, 5, 3] = 0.8  # head 2: S2 -> S1 + 1 (induction)
    pattern[:, 0, 2, 5, 2] = 0.2
    for q in range(1, width):  # head 3: previous token everywhere
        pattern[:, 0, 3, q] = 0
        pattern[:, 0, 3, q, q - 1] = 1.0
    scores = C.attention_scores(pattern, prompts).set_index("head")
    assert scores.loc[0, "end_IO"] == 1.0 and scores.loc[0, "end_S2"] == 0.0
    assert scores.loc[1, "S2_S1"] == 1.0
    assert scores.loc[2, "S2_S1+1"] == pytest.approx(0.8) and scores.loc[2, "S2_S1"] == pytest.approx(0.2)
    assert scores.loc[3, "prev_token"] == 1.0
    assert scores.loc[0, "prev_token"] == pytest.approx(1 / 7)  # only position 1 -> 0 is a previous-token step
    row = lambda h: scores.loc[h].to_dict()  # noqa: E731
    assert C.suggest_role(row(0), -0.4, "logits") == "name mover"
    assert C.suggest_role(row(0), +0.4, "logits") == "negative name mover"
    assert C.suggest_role(row(1), -0.1, "v") == "duplicate token"
    assert C.suggest_role(row(2), -0.1, "k") == "induction"
    assert C.suggest_role(row(3), -0.1, "k") == "previous token"
    assert C.suggest_role(row(3), -0.1, "q", step=2) == "S-inhibition"
    assert C.suggest_role(row(3), -0.1, "q", step=3) == "previous token"  # a query of a deeper head: by pattern
    assert C.suggest_role({**row(3), "copy_score": -2.0}, +0.1, "logits") == "copy suppression"
    assert C.suggest_role({**row(3), "copy_score": 0.0}, -0.1, "logits") == "direct"
    s_head = {**row(0), "end_IO": 0.1, "end_S2": 0.7, "copy_score": 0.0}
    assert C.suggest_role(s_head, -0.3, "logits") == "direct (attends S)"


def test_roles_are_sign_aware_a_head_that_supports_the_answer_is_never_negative_or_copy_suppression():
    # A constructed case like SmolLM2's head 23.3: found through the logits, negative copy score, but patching
    # it moves the metric towards the counterfactual (noising effect < 0): it supports the answer.
    suppressor = {"end_IO": 0.05, "end_S1": 0.1, "end_S2": 0.6, "copy_score": -3.0}
    io_mover = {"end_IO": 0.8, "end_S1": 0.05, "end_S2": 0.05, "copy_score": -3.0}
    negative = ("negative name mover", "copy suppression")
    for direction, supports, opposes in (("noising", -0.3, +0.3), ("denoising", +0.3, -0.3)):
        assert C.effect_sign(supports, direction) == 1 and C.effect_sign(opposes, direction) == -1
        assert C.suggest_role(suppressor, supports, "logits", direction=direction) == "direct (attends S)"
        assert C.suggest_role(suppressor, opposes, "logits", direction=direction) == "copy suppression"
        assert C.suggest_role(io_mover, supports, "logits", direction=direction) == "name mover"
        assert C.suggest_role(io_mover, opposes, "logits", direction=direction) == "negative name mover"
    for unknown in (None, float("nan"), 0.0):  # no sign, no negative role
        assert C.effect_sign(unknown) == 0
        assert C.suggest_role(suppressor, unknown, "logits") not in negative
        assert C.suggest_role(io_mover, unknown, "logits") not in negative
    # and through suggest_roles, which reads the direction from the circuit's evidence
    circuit = C.Circuit(
        "m", 30, 9, "ioi", "en", [C.Component("head", 23, 3, effect=+0.2, evidence={"receiver_input": "logits"})]
    )
    circuit.evidence = {"parameters": {"direction": "denoising"}}
    scores = pd.DataFrame([{"layer": 23, "head": 3, **suppressor}])
    assert C.suggest_roles(circuit, scores).get((23, 3)).role == "direct (attends S)"


def test_head_scores_attention_matches_patterns_from_plain_hooks():
    model = tiny_model("gpt2", seed=1)
    prompts = ioi_like_prompts(n=5, pos=8, seed=4)
    seen = {}
    hooks = [
        model.module("attn", layer).register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, out[1])
        )
        for layer in range(2)
    ]
    with torch.no_grad():
        model.hf(prompts.clean)
    for h in hooks:
        h.remove()
    scores = C.head_scores(model, prompts, chunk=2).set_index(["layer", "head"])
    rows = torch.arange(5)
    for layer in range(2):
        for head in range(4):
            want = seen[layer][rows, head, prompts.end, prompts.positions["IO"]].mean()
            assert scores.loc[(layer, head), "end_IO"] == pytest.approx(float(want), abs=1e-5)
            want = seen[layer][rows, head, prompts.positions["S2"], prompts.positions["S1"] + 1].mean()
            assert scores.loc[(layer, head), "S2_S1+1"] == pytest.approx(float(want), abs=1e-5)


def test_head_scores_copy_score_matches_a_hand_computed_vocabulary_projection():
    """copy_score against plain hooks on GPT-2: head h's write at the end ``z_h @ W_O[h]``, the final
    LayerNorm with the scale of the actual final residual, ``W_U``, z-scored at the attended token."""
    model = tiny_model("gpt2", seed=1)
    prompts = ioi_like_prompts(n=5, pos=8, seed=4)
    hf, seen = model.hf, {}
    hooks = [
        model.module("o_proj", layer).register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(("z", layer), args[0])
        )
        for layer in range(2)
    ]
    hooks += [model.module("attn", layer).register_forward_hook(
        lambda m, a, out, layer=layer: seen.__setitem__(("pattern", layer), out[1])
    ) for layer in range(2)]  # fmt: skip
    hooks.append(hf.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0])))
    with torch.no_grad():
        hf(prompts.clean)
    for h in hooks:
        h.remove()
    scores = C.head_scores(model, prompts, chunk=2).set_index(["layer", "head"])
    rows, end, ln = torch.arange(5), prompts.end, hf.transformer.ln_f
    final = seen["final"][rows, end]
    scale = (final.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    d_head = model.adapter.d_head
    for layer in range(2):
        w_o = model.module("o_proj", layer).weight.detach()  # Conv1D: [in = heads * d_head, out = d_model]
        for head in range(4):
            cols = slice(head * d_head, (head + 1) * d_head)
            write = seen[("z", layer)][rows, end, cols] @ w_o[cols]
            logits = (
                (write - write.mean(-1, keepdim=True)) / scale * ln.weight.detach()
            ) @ hf.lm_head.weight.detach().T
            target = prompts.clean[rows, seen[("pattern", layer)][rows, head, end].argmax(-1)]
            want = (logits[rows, target] - logits.mean(-1)) / logits.std(-1)
            assert scores.loc[(layer, head), "copy_score"] == pytest.approx(float(want.mean()), abs=1e-4)


# ----------------------------------------------------------------- faithfulness and drawing
def test_faithfulness_of_whole_model_circuit_is_one_and_of_empty_circuit_zero():
    model = tiny_model("gpt2", seed=2)
    prompts = make_prompts(n=4, pos=6, seed=5)
    everything = C.Circuit.empty_for(model, "random", "none")
    for layer in range(2):
        for h in range(4):
            everything.add(C.Component("head", layer, h))
    empty = C.Circuit.empty_for(model, "random", "none")
    table = C.faithfulness_table(model, {"all": everything, "none": empty}, {"x": prompts, "y": prompts.subset([0, 1])})
    assert len(table) == 4
    assert table.loc[table.circuit == "all", "normalized"].tolist() == pytest.approx([1.0, 1.0])
    assert table.loc[table.circuit == "none", "normalized"].tolist() == pytest.approx([0.0, 0.0])


def test_draw_overlays_two_circuits_and_marks_shared_components():
    a = _circuit([(("head", 3, 0), "name mover", -0.5), (("head", 1, 1), "S-inhibition", -0.2)])
    a.edges.append(C.Edge(("head", 1, 1), ("head", 3, 0), "q", -0.2))
    b = _circuit([(("head", 3, 0), "name mover", -0.4)], language="zh")
    fig = PC.draw([a, b])
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "shared by all: 1" in texts and "en" in texts and "zh" in texts
    side = PC.draw([a, _circuit([], shape=(12, 12))])  # different shapes: side by side
    assert len(side.axes) == 2
    assert isinstance(C.compare(a, b).table, pd.DataFrame)


def test_cross_faithfulness_reports_languages_the_tokenizer_cannot_express():
    model = tiny_model("gpt2")  # word tokenizer w0..w96: no English or Chinese names
    circuit = C.Circuit.empty_for(model, "ioi", "en")
    table = workbook.cross_faithfulness({"en": circuit}, ["en", "zh"], models={model.name: model}, n_prompts=4)
    assert table["language"].tolist() == ["en", "zh"]
    assert table["normalized"].isna().all()
    assert table["note"].str.contains("one token").all()


def test_logit_effect_correlation_over_step_one_effects():
    def with_steps(effects, language):
        rows = [
            {"step": 1, "receiver_input": "logits", "layer": i // 2, "head": i % 2, "effect": e}
            for i, e in enumerate(effects)
        ]
        return C.Circuit("m", 2, 2, "ioi", language, evidence={"steps": rows})

    a = with_steps([0.1, -0.5, 0.0, 0.3], "en")
    assert C.compare(a, with_steps([0.2, -1.0, 0.0, 0.6], "zh"))["logit_effect_correlation"] == pytest.approx(1.0)
    assert C.compare(a, with_steps([-0.1, 0.5, 0.0, -0.3], "zh"))["logit_effect_correlation"] == pytest.approx(-1.0)
    assert math.isnan(C.logit_effect_correlation(a, C.Circuit("m", 2, 2)))


def test_a_30_layer_circuit_diagram_is_bounded_and_draws_only_the_layers_with_components():
    layers = {3: "previous token", 12: "induction", 17: "S-inhibition", 23: "name mover", 28: "name mover"}
    circuit = _circuit(
        [(("head", la, la % 9), role, -0.3) for la, role in layers.items()] + [(("mlp", 20), "direct", -0.1)],
        shape=(30, 9),
    )
    circuit.edges.append(C.Edge(("head", 17, 17 % 9), ("head", 23, 23 % 9), "q", -0.2))
    circuit.edges.append(C.Edge(("head", 23, 23 % 9), ("logits",), "logits", -0.3))
    fig = PC.draw(circuit)
    width, height = fig.get_size_inches()
    assert width <= PC.MAX_SIZE[0] and height <= PC.MAX_SIZE[1]
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    # the six layers with a component get a row each; the runs between them one band each
    assert ticks == ["L0-2", "L3", "L4-11", "L12", "L13-16", "L17", "L18-19", "L20", "L21-22", "L23"] + [
        "L24-27",
        "L28",
        "L29",
    ]
    rows, _ = PC.layer_rows({3, 12, 17, 20, 23, 28}, 30)
    assert rows[12] - rows[3] == pytest.approx(1.0 + PC.GAP) and rows[4] == rows[11]
    # the grey dots of the model's heads: 9 per shown layer, not 9 x 30
    assert len(ax.collections[0].get_offsets()) == 9 * 6
    full = PC.draw(circuit, compress=False)  # the old layout, still bounded
    assert full.get_size_inches()[1] <= PC.MAX_SIZE[1] and len(full.axes[0].get_yticklabels()) == 30


def test_step_effect_titles_wrap_and_name_at_most_four_receivers_on_a_30_layer_model():
    receivers = ", ".join(f"23.{h}" for h in range(9))
    rows = [
        dict(step=s, receiver_input=k, receivers=r, layer=la, head=h, effect=0.01 * (la - h), selected=la == 23)
        for s, k, r in [(1, "logits", "logits"), (2, "q", receivers), (2, "k", receivers), (2, "v", receivers)]
        + [(3, "q", "17.8")]
        for la in range(30)
        for h in range(9)
    ]
    fig = PC.step_effects(pd.DataFrame(rows))
    width, height = fig.get_size_inches()
    assert width <= 16 and height <= 12
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "step 1: -> logits"
    assert titles[1] == "step 2 (q): -> 23.0, 23.1,\n23.2, 23.3 +5 more"
    assert all(len(line) <= 30 for t in titles for line in t.split("\n"))
    fig.canvas.draw()  # titles of neighbouring panels do not overlap
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
