"""HeadExplorer, PatchingMap, CircuitViewer: each control drives what the widget shows (headless).

Observers run synchronously when a control's ``.value`` is set and ``Button.click()``
fires handlers, so each test sets controls and checks the widget's ``current``
data against the results it was given or an independent computation (plain
hooks on the tiny model, attention and projections computed by hand here).
"""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import FAMILIES, make_prompts, tiny_model, word_tokenizer  # noqa: E402

from lsa import flow as F  # noqa: E402
from lsa import patching as P  # noqa: E402
from lsa.model import random_model  # noqa: E402
from widgets.behaviour import BehaviourExplorer  # noqa: E402
from widgets.heads import TYPED, HeadExplorer  # noqa: E402
from widgets.patching import PatchingMap  # noqa: E402


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2")
    en = make_prompts(n=3, pos=6, seed=0)
    zh = make_prompts(n=3, pos=6, seed=1, lengths=[6, 5, 4])
    heads = {
        "en": P.activation_patching(model, en, "head", progress=False),
        "zh": P.activation_patching(model, zh, "head", progress=False),
    }
    freq = F.head_frequency(model, {"en": en, "zh": zh})
    return model, en, zh, heads, freq


def _by_hand(model, tokens: torch.Tensor, layer: int, head: int, position: int):
    """Attention pattern ``[q, k]`` of one head and its write's logits at ``position``, from plain hooks.

    GPT-2: q, k from ``c_attn``'s output, softmax(q k^T / sqrt(d_head)) under a causal
    mask; the head's write = its slice of ``c_proj``'s input times its rows of the
    Conv1D weight; logits = W_U (gamma * centred(write) / s(final residual)).
    """
    hf = model.hf
    attn = hf.transformer.h[layer].attn
    d_model, dh = hf.config.n_embd, hf.config.n_embd // hf.config.n_head
    seen = {}
    hooks = [
        attn.c_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("qkv", o)),
        attn.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0])),
        hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])),
    ]
    with torch.no_grad():
        hf(tokens[None])
    for h in hooks:
        h.remove()
    q, k, _ = seen["qkv"][0].split(d_model, dim=-1)
    q, k = q[:, head * dh : (head + 1) * dh], k[:, head * dh : (head + 1) * dh]
    scores = q @ k.T / math.sqrt(dh)
    n = tokens.shape[0]
    scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    pattern = scores.softmax(-1)
    z = seen["z"][0, position, head * dh : (head + 1) * dh]
    write = z @ attn.c_proj.weight[head * dh : (head + 1) * dh]
    ln = hf.transformer.ln_f
    resid = seen["resid"][0, position]
    logits = hf.lm_head.weight @ ((write - write.mean()) / torch.sqrt(resid.var(unbiased=False) + ln.eps) * ln.weight)
    return pattern, logits


# ---------------------------------------------------------------------------- HeadExplorer
def test_head_explorer_layer_and_head_controls_show_that_heads_pattern_and_projection(setup):
    model, en, zh, heads, freq = setup
    ex = HeadExplorer(model, {"en": en, "zh": zh}, k=4)
    ex.layer.value = 1
    ex.head.value = 2
    cur = ex.current
    assert (cur["layer"], cur["head"], cur["position"]) == (1, 2, 5)  # end of en #0 (6 tokens)
    pattern, logits = _by_hand(model, en.clean[0], 1, 2, 5)
    assert torch.allclose(cur["pattern"], pattern, atol=1e-5)
    promoted = cur["projection"].query("direction == 'promoted'")
    suppressed = cur["projection"].query("direction == 'suppressed'")
    assert promoted["token_id"].tolist() == logits.topk(4).indices.tolist()
    assert suppressed["token_id"].tolist() == logits.topk(4, largest=False).indices.tolist()
    assert "head 1.2 writes at position 5" in ex.projection_html.value
    assert f"w{int(logits.argmax())}" in ex.projection_html.value
    assert ex.figure is not None and ex.figure.axes[0].get_title() == "attention of head 1.2"


def test_head_explorer_prompt_and_position_controls_move_the_view(setup):
    model, en, zh, heads, freq = setup
    ex = HeadExplorer(model, {"en": en, "zh": zh}, k=3)
    ex.prompt.value = ("zh", 2)  # 4 real tokens (padding trimmed)
    assert ex.current["tokens"].tolist() == zh.clean[2, :4].tolist()
    assert [v for _, v in ex.position.options] == [0, 1, 2, 3] and ex.position.value == 3
    ex.head.value = 3
    ex.position.value = 2
    pattern, logits = _by_hand(model, zh.clean[2, :4], 0, 3, 2)
    assert torch.allclose(ex.current["pattern"], pattern, atol=1e-5)
    top = ex.current["attended"]
    assert top["source"].iloc[0] == int(pattern[2, :3].argmax())
    assert abs(top["weight"].iloc[0] - float(pattern[2].max())) < 1e-5
    assert ex.current["projection"]["token_id"].iloc[0] == int(logits.argmax())


def test_head_explorer_typed_prompt_runs_the_model_on_that_text(setup):
    model, en, zh, heads, freq = setup
    ex = HeadExplorer(model, en)
    ex.text.value = "w5 w6 w7 w8"
    assert ex.prompt.value == TYPED
    assert ex.current["tokens"].tolist() == [5, 6, 7, 8]
    assert ex.current["labels"] == ["0:w5", "1:w6", "2:w7", "3:w8"]
    pattern, _ = _by_hand(model, torch.tensor([5, 6, 7, 8]), 0, 0, 3)
    assert torch.allclose(ex.current["pattern"], pattern, atol=1e-5)


def test_head_explorer_shows_each_languages_patching_effect_and_route_frequency(setup):
    model, en, zh, heads, freq = setup
    ex = HeadExplorer(model, {"en": en, "zh": zh}, patching=heads, frequency=freq)
    ex.select(layer=1, head=3)
    effects = ex.current["effects"].set_index("language")
    for lang, res in heads.items():
        row = res.components.index[(res.components["layer"] == 1) & (res.components["head"] == 3)][0]
        want = (res.patched[row].mean() - res.clean.mean()) / (res.clean.mean() - res.corrupt.mean())
        assert abs(effects.loc[lang, "normalized"] - float(want)) < 1e-5
        assert abs(effects.loc[lang, "normalized"] - float(res.array[1, 3])) < 1e-6
    fr = ex.current["frequency"].set_index("language")
    for lang in ("en", "zh"):
        want = freq[(freq["layer"] == 1) & (freq["head"] == 3) & (freq.language == lang)]["frequency"].item()
        assert fr.loc[lang, "frequency"] == want
    assert "patching effect of 1.3" in ex.effects_html.value and "route frequency of 1.3" in ex.frequency_html.value


def test_head_explorer_without_a_model_still_shows_results(setup):
    model, en, zh, heads, freq = setup
    ex = HeadExplorer(patching=heads, frequency=freq)
    assert (ex.n_layers, ex.n_heads) == (2, 4)
    ex.head.value = 1
    assert ex.current["pattern"] is None and "pass model=" in ex.attention_html.value
    assert set(ex.current["effects"]["language"]) == {"en", "zh"}


def test_head_explorer_bad_input_shows_a_message_not_a_traceback(setup):
    model, en, zh, heads, freq = setup
    other = random_model(
        dict(model_type="gpt2", n_layer=3, n_head=8, n_embd=32, n_positions=64), tokenizer=word_tokenizer()
    )
    wrong = P.activation_patching(other, en, "head", progress=False)
    ex = HeadExplorer(model, en, patching={"en": wrong})
    assert "covers 3 layers x 8 heads" in ex.message.value and "2 x 4" in ex.message.value
    assert ex.current["effects"] is None  # not shown for the wrong model
    shown = ex.current["pattern"].clone()
    ex.select(head=7)
    assert "head 7 out of range" in ex.message.value
    assert torch.equal(ex.current["pattern"], shown) and ex.head.value == 0
    ex.select(layer=0, position=99)
    assert "position 99 out of range" in ex.message.value
    ex.prompt.value = TYPED  # nothing typed yet
    assert "type a prompt" in ex.message.value


# ---------------------------------------------------------------------------- PatchingMap
def test_patching_map_click_and_dropdowns_select_a_cell_with_its_per_prompt_effects(setup):
    model, en, zh, heads, freq = setup
    pm = PatchingMap(heads)
    res = heads["en"]
    assert torch.allclose(pm.current["grid"], res.array, equal_nan=True)
    pm._buttons[1][3].click()  # the map's cell layer 1, head 3
    assert pm.current["cell"] == {"layer": 1, "head": 3}
    assert (pm.row.value, pm.col.value) == (1, 3)
    row = res.components.index[(res.components["layer"] == 1) & (res.components["head"] == 3)][0]
    per = pm.current["per_prompt"]
    assert per["effect"].tolist() == pytest.approx((res.patched[row] - res.clean).tolist(), abs=1e-6)
    assert per["metric"].tolist() == pytest.approx(res.patched[row].tolist(), abs=1e-6)
    pm.row.value = 0
    pm.col.value = 2
    assert pm.current["cell_value"] == pytest.approx(float(res.array[0, 2]))
    assert "layer 0, head 2" in pm.summary_html.value
    assert pm._buttons[0][2].layout.border.startswith("2px")  # the selected cell is outlined


def test_patching_map_language_toggle_value_and_side_by_side(setup):
    model, en, zh, heads, freq = setup
    pm = PatchingMap(heads)
    pm.select(1, 1)
    pm.language.value = "zh"
    assert torch.allclose(pm.current["grid"], heads["zh"].array, equal_nan=True)
    assert pm.current["cell"] == {"layer": 1, "head": 1}  # the selection survives the toggle
    assert set(pm.current["per_prompt"]["language"]) == {"zh"}
    pm.value.value = "effect"
    assert torch.allclose(pm.current["grid"], heads["zh"].grid("effect"))
    pm.side_by_side.value = True
    assert set(pm.current["per_prompt"]["language"]) == {"en", "zh"}
    assert [ax.get_title() for ax in pm.figure.axes[:2]] == ["en", "zh"]
    summary = pm.current["summary"].set_index("language")
    for lang, res in heads.items():
        assert summary.loc[lang, "effect"] == pytest.approx(float(res.grid("effect")[1, 1]), abs=1e-6)


def test_patching_map_of_a_layer_by_position_result_labels_positions_with_tokens(setup):
    model, en, zh, heads, freq = setup
    res = P.activation_patching(model, en, "resid_pre", positions="each", progress=False)
    pm = PatchingMap(res, model=model, prompts=en)
    assert pm.explorer is None  # not a head grid
    labels = [label for label, _ in pm.col.options]
    assert labels[:2] == [f"0:w{int(en.clean[0, 0])} (first)", f"1:w{int(en.clean[0, 1])}"]  # tokens, named positions
    assert [t.get_text() for t in pm.figure.axes[0].get_xticklabels()] == labels
    pm.select(1, 4)
    assert pm.current["cell"] == {"layer": 1, "pos": 4}
    assert pm.current["cell_value"] == pytest.approx(float(res.array[1, 4]))
    assert len(pm.current["per_prompt"]) == len(en)


def test_patching_map_with_a_model_opens_the_selected_head_in_a_head_explorer(setup):
    model, en, zh, heads, freq = setup
    pm = PatchingMap(heads, model=model, prompts={"en": en, "zh": zh})
    pm._buttons[1][2].click()
    assert (pm.explorer.current["layer"], pm.explorer.current["head"]) == (1, 2)
    pattern, _ = _by_hand(model, en.clean[0], 1, 2, 5)
    assert torch.allclose(pm.explorer.current["pattern"], pattern, atol=1e-5)


def test_patching_map_and_its_head_explorer_share_the_language_and_the_prompt(setup):
    model, en, zh, heads, freq = setup
    pm = PatchingMap(heads, model=model, prompts={"en": en, "zh": zh})
    ex = pm.explorer
    pm.select(1, 2)
    assert ex.prompt.value == ("en", 0)
    # the map's language moves the explorer to the same prompt number in that language's set
    ex.select(prompt=("en", 2))
    pm.language.value = "zh"
    assert ex.prompt.value == ("zh", 2) and (ex.current["layer"], ex.current["head"]) == (1, 2)
    n = int(zh.lengths[2])
    assert ex.current["tokens"].tolist() == zh.clean[2, :n].tolist()
    pattern, _ = _by_hand(model, zh.clean[2, :n], 1, 2, n - 1)
    assert torch.allclose(ex.current["pattern"], pattern, atol=1e-5)
    shown = pm.current["per_prompt"].query("shown")
    assert pm.current["prompt"] == ("zh", 2) and shown[["language", "prompt"]].values.tolist() == [["zh", 2]]
    assert shown["effect"].item() == pytest.approx(float(heads["zh"].patched[1 * 4 + 2, 2] - heads["zh"].base[2]))
    ex.prompt.value = ("zh", 1)  # another prompt of the same language: marked
    assert pm.current["per_prompt"].query("shown")["prompt"].tolist() == [1] and pm.language.value == "zh"
    # a prompt of the other language picked in the explorer switches the map
    ex.prompt.value = ("en", 1)
    assert pm.language.value == "en" and torch.equal(pm.current["grid"], heads["en"].grid("normalized"))
    assert pm.current["prompt"] == ("en", 1) and ex.current["tokens"].tolist() == en.clean[1].tolist()
    # a typed prompt stays when the language changes, and no row is marked for it
    ex.text.value = "w5 w6 w7 w8"
    assert pm.current["prompt"] == TYPED and "shown" not in pm.current["per_prompt"]
    pm.language.value = "zh"
    assert ex.prompt.value == TYPED and ex.current["tokens"].tolist() == [5, 6, 7, 8]
    assert pm.current["prompt"] == TYPED and "shown" not in pm.current["per_prompt"]


def test_patching_map_bad_input_shows_a_message(setup):
    model, en, zh, heads, freq = setup
    pm = PatchingMap(heads, model=model)
    pm.select(1, 2)
    pm.select(7, 0)
    assert "layer 7 is not in this result" in pm.message.value
    assert pm.current["cell"] == {"layer": 1, "head": 2}
    pm.select(0, 0, language="fr")
    assert "no result for language 'fr'" in pm.message.value
    other = random_model(
        dict(model_type="gpt2", n_layer=3, n_head=8, n_embd=32, n_positions=64), tokenizer=word_tokenizer()
    )
    wrong = P.activation_patching(other, en, "head", layers=[2], progress=False)
    pm = PatchingMap(wrong, model=model)
    assert "from another model" in pm.message.value and pm.explorer is None


# ---------------------------------------------------------------------------- CircuitViewer
def _circuits(tmp_path):
    from lsa.circuits import Circuit, Component, Edge

    en = Circuit(
        "tiny-gpt2",
        2,
        4,
        "ioi",
        "en",
        components=[
            Component("head", 1, 2, role="name mover", effect=-0.4, evidence={"step": 1, "receiver_input": "logits"}),
            Component("head", 0, 1, role="duplicate token", effect=-0.2, evidence={"step": 2, "receiver_input": "q"}),
            Component("mlp", 0, effect=-0.1, evidence={"note": "by hand"}),
        ],
        edges=[
            Edge(("head", 1, 2), ("logits",), "logits", -0.4),
            Edge(("head", 0, 1), ("head", 1, 2), "q", -0.2),
            Edge(("mlp", 0), ("head", 1, 2), "v", -0.05),
        ],
    )
    zh = Circuit(
        "tiny-gpt2",
        2,
        4,
        "ioi",
        "zh",
        components=[
            Component("head", 1, 2, role="name mover", effect=-0.5, evidence={"step": 1, "receiver_input": "logits"}),
            Component("head", 0, 3, role="S-inhibition", effect=-0.3, evidence={"step": 2, "receiver_input": "k"}),
        ],
        edges=[Edge(("head", 1, 2), ("logits",), "logits", -0.5), Edge(("head", 0, 3), ("head", 1, 2), "k", -0.3)],
    )
    path = en.to_json(tmp_path / "ioi_en.json")
    return {"en": path, "zh": zh}, en, zh


def test_circuit_viewer_overlays_saved_circuits_and_shows_the_selected_components_evidence(tmp_path):
    from widgets.circuits import CircuitViewer

    given, en, zh = _circuits(tmp_path)
    cv = CircuitViewer(given)  # en from its JSON file, zh as an object
    table = cv.current["table"].set_index("component")
    assert set(table.index) == {"0.1", "0.3", "MLP0", "1.2"}
    assert table.loc["1.2", "in"] == "en, zh" and table.loc["0.3", "in"] == "zh"
    assert table.loc["1.2", "effect_zh"] == -0.5 and table.loc["0.1", "role_en"] == "duplicate token"
    cv.select("1.2")
    cv.select("0.1")
    ev = cv.current["evidence"]
    assert ev["circuit"].tolist() == ["en"] and json.loads(ev["evidence"].iloc[0]) == {"step": 2, "receiver_input": "q"}
    assert cv.current["edges"][["sender", "receiver", "kind"]].values.tolist() == [["0.1", "1.2", "q"]]
    assert "duplicate token" in cv.evidence_html.value and "receiver_input" in cv.evidence_html.value
    cv.component.value = ("head", 1, 2)
    assert cv.current["evidence"]["effect"].tolist() == [-0.4, -0.5]
    assert len(cv.current["edges"]) == 5  # 3 edges touch 1.2 in en, 2 in zh
    # two circuits shown: their comparison; Jaccard by hand = |{1.2}| / |{1.2, 0.1, MLP0, 0.3}|
    assert cv.current["comparison"]["jaccard"].item() == pytest.approx(1 / 4)
    assert cv.figure is not None


def test_circuit_viewer_role_filter_and_circuit_choice_change_what_is_shown(tmp_path):
    from widgets.circuits import CircuitViewer

    given, en, zh = _circuits(tmp_path)
    cv = CircuitViewer(given)
    cv.role.value = ("name mover",)
    assert cv.current["table"]["component"].tolist() == ["1.2"]
    cv.select("1.2")
    edges = cv.current["edges"]
    assert edges[["circuit", "receiver", "kind"]].values.tolist() == [
        ["en", "logits", "logits"],
        ["zh", "logits", "logits"],
    ]
    cv.role.value = ("name mover", "S-inhibition")
    assert set(cv.current["table"]["component"]) == {"1.2", "0.3"}
    cv.shown.value = ("zh",)
    assert cv.current["shown"] == ["zh"] and cv.current["comparison"] is None
    assert set(cv.current["table"]["in"]) == {"zh"}
    cv.role.value = ("(all roles)",)
    assert set(cv.current["table"]["component"]) == {"1.2", "0.3"}  # zh has no other components


def test_circuit_viewer_bad_input_shows_a_message(tmp_path):
    from lsa.circuits import Circuit, Component
    from widgets.circuits import CircuitViewer

    cv = CircuitViewer(tmp_path / "missing.json")
    assert "no circuit file" in cv.message.value
    given, en, zh = _circuits(tmp_path)
    cv = CircuitViewer(given)
    cv.select("1.3")
    assert "'1.3' is not among the shown components" in cv.message.value
    cv.select(("head", 9))
    assert "not among the shown components" in cv.message.value
    big = Circuit("other", 4, 8, "ioi", "en", components=[Component("head", 3, 7, role="name mover")])
    cv = CircuitViewer([big], model=tiny_model("gpt2"))
    assert "3.7" in cv.message.value and "does not have" in cv.message.value


@pytest.mark.parametrize("family", FAMILIES)
def test_head_explorer_shows_a_causal_pattern_and_a_projection_on_every_family(family):
    model = tiny_model(family)
    prompts = make_prompts(n=2, pos=5, vocab=97)
    ex = HeadExplorer(model, prompts, k=3)
    last = model.adapter.n_heads - 1
    ex.select(layer=1, head=last, position=2)
    pattern = ex.current["pattern"]
    assert pattern.shape == (5, 5)
    assert torch.allclose(pattern.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.count_nonzero(torch.triu(pattern, 1)) == 0  # no query sees a later token
    assert len(ex.current["projection"]) == 6 and ex.message.value == ""


def test_patching_map_slices_a_head_by_position_result_and_maps_grouped_path_patching(setup):
    model, en, zh, heads, freq = setup
    res = P.activation_patching(model, en, "head", positions=["first", "mid"], progress=False)
    pm = PatchingMap(res)
    assert [v for _, v in pm.extra.options] == ["first", "mid"]
    pm.extra.value = "mid"
    assert torch.allclose(pm.current["grid"], res.array[:, :, 1])
    pm.select(1, 2)
    assert pm.current["cell"] == {"layer": 1, "head": 2, "pos": "mid"}
    row = res.components.index[
        (res.components["layer"] == 1) & (res.components["head"] == 2) & (res.components["pos"] == "mid")
    ][0]
    assert pm.current["per_prompt"]["metric"].tolist() == pytest.approx(res.patched[row].tolist(), abs=1e-6)
    path = P.path_patching(model, en, senders=[[(0, 1), (0, 2)], (1, 3)], progress=False)
    pm = PatchingMap(path)  # one column of sender groups
    assert pm.current["rows"] == ["0.1, 0.2", "1.3"] and pm.current["cols"] == ["all"]
    pm._buttons[1][0].click()
    assert pm.current["cell"] == {"senders": "1.3"}
    assert pm.current["per_prompt"]["effect"].tolist() == pytest.approx(
        (path.patched[1] - path.clean).tolist(), abs=1e-6
    )


# ---------------------------------------------------------------------------- BehaviourExplorer
def _end_logits_by_hand(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(tokens[None]).logits[0, -1]


def test_behaviour_explorer_shows_a_set_prompts_answers_and_top_predictions_as_the_model_gives_them(setup):
    model, en, zh, heads, freq = setup
    ex = BehaviourExplorer(model, {("random", "en"): en, ("random", "zh"): zh}, k=5)
    ex.prompt.value = ("random/zh", 1)
    n = int(zh.lengths[1])
    logits = _end_logits_by_hand(model, zh.clean[1, :n])
    assert ex.current["tokens"].tolist() == zh.clean[1, :n].tolist()
    assert ex.current["top"]["token_id"].tolist() == logits.topk(5).indices.tolist()
    answers = ex.current["answers"].set_index("answer")
    for name, token in (("answer", zh.answer[1]), ("distractor", zh.distractor[1])):
        assert answers.loc[name, "token_id"] == int(token)
        assert answers.loc[name, "logit"] == pytest.approx(float(logits[token]), abs=1e-5)
        assert answers.loc[name, "prob"] == pytest.approx(float(logits.softmax(-1)[token]), abs=1e-6)
        assert answers.loc[name, "rank"] == 1 + sum(float(v) > float(logits[token]) for v in logits)
    assert ex.current["logit_diff"] == pytest.approx(float(logits[zh.answer[1]] - logits[zh.distractor[1]]), abs=1e-5)
    assert "logit(answer) − logit(distractor)" in ex.answers_html.value
    assert ex.answer.value == f"w{int(zh.answer[1])}"  # the set's answer, filled in for typing a variant


def test_behaviour_explorer_scores_a_typed_prompt_and_typed_answers(setup):
    model, en, zh, heads, freq = setup
    ex = BehaviourExplorer(model, {"en": en})
    ex.answer.value, ex.distractor.value = " w40", " w41"  # with a set's prompt shown, they wait for a typed one
    assert ex.current["prompt"] == ("en", 0)
    ex.text.value = "w10 w11 w12"
    assert ex.prompt.value == TYPED and ex.current["tokens"].tolist() == [10, 11, 12]
    logits = _end_logits_by_hand(model, torch.tensor([10, 11, 12]))
    assert ex.current["answers"]["token_id"].tolist() == [40, 41]
    assert ex.current["logit_diff"] == pytest.approx(float(logits[40] - logits[41]), abs=1e-5)
    ex.answer.value = " nonsense"
    assert "unknown to the tokenizer" in ex.message.value and ex.error
    ex.text.value = " "
    assert "type a prompt" in ex.message.value


def test_circuit_viewer_moves_an_edge_circuit_along_its_curve_and_shows_its_faithfulness():
    from lsa import circuits as C
    from widgets.circuits import CircuitViewer

    model = tiny_model("gpt2", spec={"initializer_range": 0.2})
    prompts = make_prompts(n=6, pos=6, seed=5)
    found = C.discover(model, prompts, "eap-ig", steps=1, target=0.0, progress=False, roles=False)
    curve = C.edge_curve(model, found.edges, prompts, sizes=[4, 12, 30], rank="absolute")
    viewer = CircuitViewer({"en": found.circuit}, curves={"en": curve}, scores={"en": found.edges}, most=10)
    for size in (4, 30):
        viewer.size.value = size
        shown = viewer.current["circuits"]["en"]
        kept = found.edges.circuit(size, "absolute")  # the top edges by |score|, pruned
        assert {(e.sender, e.receiver, e.kind) for e in shown.edges} == set(found.edges.graph.edge_keys(kept))
        row = curve.frame.set_index("size").loc[size]
        assert (
            f"normalised faithfulness {row['normalized']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            in (viewer.current["faithfulness"])
        )
    drawn = viewer.figure.axes[0].patches  # one arrow per edge drawn: the strongest ``most`` alone
    assert len(drawn) == min(10, len(viewer.current["circuits"]["en"].edges))
