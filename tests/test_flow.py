"""Information flow routes: decomposition, importances, routes and head frequency against independent computations."""

from __future__ import annotations

import networkx as nx
import pandas as pd
import pytest
import torch
from helpers import FAMILIES, random_tokens, tiny_model, word_tokenizer

from lsa import flow
from lsa.configs import random_hf_model
from lsa.model import wrap
from lsa.tasks import DropReport, PromptSet


def _hooked(model, tokens):
    """Independent capture with plain hooks: per layer block input, ln2 input, attention pattern,
    o_proj input/output, the attention and FFN writes (what joins the residual: o_proj / mlp_out
    output, or the sandwich norm's after it), and the final norm's input."""
    hf, ad = model.hf, model.adapter
    got = {k: {} for k in ("pre", "mid", "pattern", "z", "o_out", "write", "mlp")}
    handles = []
    for layer, block in enumerate(ad.blocks(hf)):

        def pre(m, a, k, layer=layer):
            got["pre"][layer] = a[0] if a else k["hidden_states"]

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(
            model.module("ln2", layer).register_forward_pre_hook(
                lambda m, a, layer=layer: got["mid"].__setitem__(layer, a[0])
            )
        )
        handles.append(
            model.module("attn", layer).register_forward_hook(
                lambda m, a, o, layer=layer: got["pattern"].__setitem__(layer, o[1])
            )
        )

        def o_proj(m, a, o, layer=layer):
            got["z"][layer], got["o_out"][layer] = a[0], o

        handles.append(model.module("o_proj", layer).register_forward_hook(o_proj))
        handles.append(
            model.module("attn_write", layer).register_forward_hook(
                lambda m, a, o, layer=layer: got["write"].__setitem__(layer, o)
            )
        )
        handles.append(
            model.module("mlp_write", layer).register_forward_hook(
                lambda m, a, o, layer=layer: got["mlp"].__setitem__(layer, o)
            )
        )
    handles.append(model.module("final_norm").register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0])))
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    n = ad.n_layers
    got["post"] = {layer: got["pre"][layer + 1] if layer + 1 < n else got["final"] for layer in range(n)}
    return got


def _reference_parts(model, got, layer):
    """Per-(head, q, k) parts ``[H, b, q, k, d]`` from hooked activations only: value vectors recovered by
    solving ``z = A v`` (A is lower-triangular with a positive diagonal), writes through the o_proj module.
    With a sandwich norm after o_proj, the norm at its run's own scale is the elementwise factor
    ``write / o_out`` (an RMSNorm scales each channel of o_out by a per-position constant), applied to
    every part and the bias."""
    ad = model.adapter
    pattern = got["pattern"][layer].double()  # [b, H, q, k]
    b, H, pos, _ = pattern.shape
    z = got["z"][layer].double().reshape(b, pos, H, ad.d_head).transpose(1, 2)  # [b, H, pos, dh]
    v = torch.linalg.solve_triangular(pattern, z, upper=False)  # [b, H, k, dh]
    o_proj = model.module("o_proj", layer)
    bias = o_proj.bias.detach().double() if o_proj.bias is not None else torch.zeros(ad.d_model, dtype=torch.float64)
    parts = torch.zeros(H, b, pos, pos, ad.d_model, dtype=torch.float64)
    for h in range(H):
        zh = torch.zeros(b, pos, H, ad.d_head, dtype=torch.float64)
        zh[:, :, h] = v[:, h]
        with torch.no_grad():
            u = o_proj.double()(zh.reshape(b, pos, -1)) - bias  # [b, k, d]: head h's write per unit attention
        o_proj.float()
        parts[h] = pattern[:, h, :, :, None] * u[:, None, :, :]
    if model.module("attn_write", layer) is not o_proj:
        factor = got["write"][layer].double() / got["o_out"][layer].double()  # [b, q, d]
        return parts * factor[None, :, :, None], bias * factor
    return parts, bias


def _prox(y, z):
    return (y.abs().sum(-1) - (y - z).abs().sum(-1)).clamp_min(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_parts_plus_bias_sum_to_hooked_attention_write_on_every_family(family):
    model = tiny_model(family)
    tokens = random_tokens(2, 6)
    got = _hooked(model, tokens)
    acts = flow.capture(model, tokens)
    for layer in range(model.adapter.n_layers):
        parts, bias = flow.decompose_attention(model, acts, layer)
        assert parts.shape == (2, model.adapter.n_heads, 6, 6, model.adapter.d_model)
        torch.testing.assert_close(parts.sum((1, 3)) + bias, got["write"][layer], atol=1e-5, rtol=0)
        if not model.adapter.parallel_residual:  # the write is what the residual gains across attention
            torch.testing.assert_close(got["write"][layer], got["mid"][layer] - got["pre"][layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_importances_match_proximity_formula_from_hooked_activations(family):
    model = tiny_model(family, seed=1)
    tokens = random_tokens(2, 5, seed=3)
    got = _hooked(model, tokens)
    result = flow.contributions(model, tokens)
    parallel = model.adapter.parallel_residual
    assert result.parallel == parallel
    for layer in range(model.adapter.n_layers):
        parts, bias = _reference_parts(model, got, layer)
        pre, post, mlp = (got[k][layer].double() for k in ("pre", "post", "mlp"))
        y = post if parallel else got["mid"][layer].double()
        p_parts = _prox(y[None, :, :, None], parts)  # [H, b, q, k]
        p_res, p_bias = _prox(y, pre), _prox(y, bias.expand_as(y))
        total = p_parts.sum((0, 3)) + p_res + p_bias
        if parallel:
            p_ffn = _prox(y, mlp)
            total = total + p_ffn
            torch.testing.assert_close(result.ffn[:, layer].double(), p_ffn / total, atol=1e-5, rtol=0)
            assert (result.ffn_resid[:, layer] == 0).all()
        else:
            f, r = _prox(post, mlp), _prox(post, y)
            torch.testing.assert_close(result.ffn[:, layer].double(), f / (f + r), atol=1e-5, rtol=0)
            torch.testing.assert_close(result.ffn_resid[:, layer].double(), r / (f + r), atol=1e-5, rtol=0)
        expected = (p_parts / total[None, :, :, None]).permute(1, 0, 2, 3)
        torch.testing.assert_close(result.attn[:, layer].double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.attn_resid[:, layer].double(), p_res / total, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.attn_bias[:, layer].double(), p_bias / total, atol=1e-5, rtol=0)


def test_threshold_zeroes_parts_at_or_below_tau_and_renormalises_each_sum():
    model = tiny_model("gpt2")
    raw = flow.contributions(model, random_tokens(2, 6))
    tau = 0.05
    out = raw.threshold(tau)
    b, layer, q = 1, 1, 4
    parts = torch.cat(
        [raw.attn[b, layer, :, q].flatten(), raw.attn_resid[b, layer, q : q + 1], raw.attn_bias[b, layer, q : q + 1]]
    )
    kept = torch.where(parts > tau, parts, torch.zeros_like(parts))
    expected = kept / kept.sum()
    got = torch.cat(
        [out.attn[b, layer, :, q].flatten(), out.attn_resid[b, layer, q : q + 1], out.attn_bias[b, layer, q : q + 1]]
    )
    torch.testing.assert_close(got, expected)
    f = torch.stack([raw.ffn[b, layer, q], raw.ffn_resid[b, layer, q]])
    f = torch.where(f > tau, f, torch.zeros_like(f))
    torch.testing.assert_close(torch.stack([out.ffn[b, layer, q], out.ffn_resid[b, layer, q]]), f / f.sum())
    with pytest.raises(ValueError, match="tau"):
        raw.threshold(1.5)


def _one_head_model(trigger: tuple[int, ...] = (10, 11, 12)):
    """A 1-layer GPT-2 whose head 0 attends only to token 0 and, when token 0 is a trigger, writes a large vector.

    Directions of the 32-dim residual: e0 marks position 0 (read by head 0's keys), e2 marks trigger tokens
    (read by head 0's values), head 0 writes along e3; e1 and e5 keep every embedding's mean at 0, so the
    layer norm only rescales. Every other head and the MLP write nothing.
    """
    spec = dict(model_type="gpt2", n_layer=1, n_head=4, n_embd=32, n_positions=32, vocab_size=40)
    hf = random_hf_model(spec, seed=0)
    block = hf.transformer.h[0]
    with torch.no_grad():
        torch.manual_seed(0)
        wte = hf.transformer.wte.weight
        wte.normal_(0, 0.02)
        wte[:, [0, 1, 2, 3, 5]] = 0
        wte[list(trigger), 2] = 1.0
        wte[:, 5] = -wte.sum(1)  # every row has mean 0, so layer norm only rescales it
        hf.transformer.wpe.weight.zero_()
        hf.transformer.wpe.weight[0, 0], hf.transformer.wpe.weight[0, 1] = 1.0, -1.0
        for p in (block.attn.c_attn.weight, block.attn.c_attn.bias, block.attn.c_proj.weight, block.attn.c_proj.bias):
            p.zero_()
        d = 32
        block.attn.c_attn.bias[0] = 20.0  # head 0 query, dim 0: constant
        block.attn.c_attn.weight[0, d + 0] = 1.0  # head 0 key, dim 0 <- e0 (position 0)
        block.attn.c_attn.weight[2, 2 * d + 0] = 10.0  # head 0 value, dim 0 <- e2 (trigger)
        block.attn.c_proj.weight[0, 3] = 10.0  # head 0, dim 0 -> e3
        for p in block.mlp.parameters():
            p.zero_()
    return wrap(hf, word_tokenizer(40), name="one-head")


def test_route_of_hand_built_one_head_model_goes_through_that_head_and_token_zero():
    model = _one_head_model()
    tokens = torch.tensor([[10, 20, 21, 22, 23]])
    result = flow.contributions(model, tokens)
    assert result.attn[0, 0, 0, 4, 0] > 0.9  # head 0 from token 0 into the last position
    graph = flow.route(result, 0, tau=0.04)
    assert isinstance(graph, nx.DiGraph)
    assert set(graph.nodes) == {(0, 0, "embed"), (0, 4, "mid"), (0, 4, "post")}
    edge = graph.edges[(0, 0, "embed"), (0, 4, "mid")]
    assert edge["kind"] == "attn" and set(edge["heads"]) == {0} and edge["weight"] > 0.9
    assert graph.edges[(0, 4, "mid"), (0, 4, "post")]["kind"] == "residual"
    assert flow.route_heads(graph) == {(0, 0)}
    assert graph.graph["tokens"] == ["w10", "w20", "w21", "w22", "w23"]
    assert graph.graph["prediction"] == model.tokenizer.decode([int(model.logits(tokens)[0, -1].argmax())])
    edges = flow.route_edges(graph)
    assert set(edges["kind"]) == {"attn", "residual"}
    assert edges.loc[edges["kind"] == "attn", ["source", "target", "head"]].values.tolist() == [[0, 4, 0]]
    # without a trigger at token 0 the head writes nothing and the route is the residual stream alone
    quiet = flow.route(flow.contributions(model, torch.tensor([[30, 20, 21, 22, 23]])), 0, tau=0.04)
    assert set(quiet.nodes) == {(0, 4, "embed"), (0, 4, "mid"), (0, 4, "post")}
    assert flow.route_heads(quiet) == set()


def _prompt_set(rows: list[list[int]], language: str) -> PromptSet:
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    clean = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    n = len(rows)
    return PromptSet(
        task="toy",
        language=language,
        clean=clean,
        corrupt=clean.clone(),
        lengths=lengths,
        answer=torch.zeros(n, dtype=torch.long),
        distractor=torch.zeros(n, dtype=torch.long),
        positions={"end": lengths - 1},
        meta=pd.DataFrame({"i": range(n)}),
        report=DropReport(total=n, kept=n),
        pad_id=1,
    )


def test_head_frequency_counts_share_of_prompts_whose_route_uses_each_head():
    model = _one_head_model()
    en = _prompt_set([[10, 20, 21], [11, 22, 23, 24, 25], [12, 26], [30, 27, 28, 29]], "en")  # 3 of 4 triggered
    zh = _prompt_set([[30, 20, 21], [31, 22, 23, 24], [11, 25, 26, 27, 28, 29]], "zh")  # 1 of 3 triggered
    freq = flow.head_frequency(model, {"en": en, "zh": zh}, tau=0.04, batch_size=3)
    assert list(freq.columns) == ["layer", "head", "language", "frequency", "importance", "n_prompts"]
    assert len(freq) == 2 * 4
    table = freq.set_index(["language", "layer", "head"])["frequency"]
    assert table[("en", 0, 0)] == pytest.approx(0.75)
    assert table[("zh", 0, 0)] == pytest.approx(1 / 3)
    assert (freq.loc[freq["head"] != 0, ["frequency", "importance"]] == 0).all().all()
    assert 0.9 * 0.75 < freq.loc[(freq["language"] == "en") & (freq["head"] == 0), "importance"].item() <= 0.75
    wide = flow.compare_frequency(freq, "en", "zh")
    assert wide.loc[0, ["layer", "head"]].tolist() == [0, 0]
    assert wide.loc[0, "difference"] == pytest.approx(0.75 - 1 / 3)
    assert wide.attrs["correlation"] == pytest.approx(1.0)
    per_prompt = flow.route_heads_frame(flow.contributions(model, en.clean, en.lengths), tau=0.04)
    assert per_prompt.loc[per_prompt["used"], ["prompt", "layer", "head"]].values.tolist() == [
        [0, 0, 0],
        [1, 0, 0],
        [2, 0, 0],
    ]


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_head_usage_in_padded_batches_is_each_prompts_own_route_run_alone(family):
    model = tiny_model(family, seed=3)
    tokens = random_tokens(5, 7, seed=6)
    ps = PromptSet(
        task="t",
        language="en",
        clean=tokens,
        corrupt=tokens,
        lengths=torch.tensor([7, 4, 6, 3, 5]),
        answer=torch.zeros(5, dtype=torch.long),
        distractor=torch.ones(5, dtype=torch.long),
        positions={},
        meta=pd.DataFrame({"i": range(5)}),
        report=DropReport(total=5, kept=5),
    )
    usage = flow.head_usage(model, {"en": ps}, tau=0.03, batch_size=2)["en"]
    assert usage.shape == (5, model.adapter.n_layers, model.adapter.n_heads)
    for i, n in enumerate(ps.lengths.tolist()):
        alone = flow.contributions(model, tokens[i : i + 1, :n], tau=0.03)  # unpadded, with its predictions
        assert flow.route_heads(flow.route(alone, 0)) == {tuple(x) for x in (usage[i] > 0).nonzero().tolist()}
        torch.testing.assert_close(usage[i], flow.route_head_importance(alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_vectorised_heads_used_agrees_with_route_graph(family):
    model = tiny_model(family, seed=2)
    tokens = random_tokens(3, 8, seed=5)
    lengths = torch.tensor([8, 5, 6])
    result = flow.contributions(model, tokens, lengths, tau=0.02)
    used = flow.heads_used(result)
    end_weights = flow.route_head_importance(result, into="end")
    for i in range(3):
        graph = flow.route(result, i)
        assert graph.graph["position"] == int(lengths[i]) - 1
        assert max(n[1] for n in graph.nodes) < int(lengths[i])
        assert flow.route_heads(graph) == {tuple(x) for x in used[i].nonzero().tolist()}
        assert any(n[2] == "mid" for n in graph.nodes) != model.adapter.parallel_residual
        edges = flow.route_edges(graph)
        into_end = edges[(edges["kind"] == "attn") & (edges["target"] == int(lengths[i]) - 1)]
        expected = torch.zeros(model.adapter.n_layers, model.adapter.n_heads, dtype=torch.float64)
        for row in into_end.itertuples():
            expected[row.layer, row.head] += row.importance
        torch.testing.assert_close(end_weights[i].double(), expected, atol=1e-6, rtol=0)
        assert nx.has_path(graph, next(n for n in graph.nodes if n[2] == "embed"), (1, int(lengths[i]) - 1, "post"))


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("gpt2")
    result = flow.contributions(model, random_tokens(2, 5))
    with pytest.raises(IndexError, match="index"):
        flow.route(result, 5)
    with pytest.raises(IndexError, match="position"):
        flow.route(result, 0, position=7)
    with pytest.raises(ValueError, match="lengths"):
        flow.contributions(model, random_tokens(2, 5), torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="tokens"):
        flow.capture(model, torch.tensor([1, 2, 3]))
    sdpa = random_hf_model(dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=8, vocab_size=97))
    sdpa.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="eager"):
        flow.capture(wrap(sdpa, word_tokenizer()), random_tokens(1, 4))


def test_neuron_importances_match_proximity_of_each_neuron_write():
    model = tiny_model("llama")
    tokens = random_tokens(1, 5)
    got = _hooked(model, tokens)
    acts = {}
    h = model.module("mlp_out", 1).register_forward_pre_hook(lambda m, a: acts.__setitem__("n", a[0]))
    with torch.no_grad():
        model.hf(tokens)
    h.remove()
    frame = flow.neuron_contributions(model, tokens, layer=1, position=3, top=None)
    post, mid = got["post"][1][0, 3], got["mid"][1][0, 3]
    w = model.module("mlp_out", 1).weight.T  # [d_mlp, d_model]
    p = _prox(post, acts["n"][0, 3][:, None] * w)
    total = p.sum() + _prox(post, mid)
    by_neuron = frame.set_index("neuron")["importance"]
    expected = (p / total).detach().double()
    torch.testing.assert_close(torch.tensor(by_neuron.loc[list(range(w.shape[0]))].values), expected, atol=1e-6, rtol=0)
    assert by_neuron.sum() == pytest.approx(1.0, abs=1e-5)


def test_route_and_frequency_figures_draw_what_the_results_hold():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsa.plotting import flow as flow_plots

    model = _one_head_model()
    graph = flow.route(flow.contributions(model, torch.tensor([[10, 20, 21, 22]])), 0)
    fig = flow_plots.plot_route(graph)
    ax = fig.axes[0]
    assert len(ax.lines) == graph.number_of_edges()
    assert [t.get_text() for t in ax.get_xticklabels()] == graph.graph["tokens"]
    assert any(t.get_text() == "0.0" for t in ax.texts)  # the head label on the attention edge
    freq = pd.DataFrame(
        [
            (layer, head, lang, f, f, 4)
            for layer in range(2)
            for head in range(3)
            for lang, f in (("en", layer * 0.5), ("zh", head / 3))
        ],
        columns=["layer", "head", "language", "frequency", "importance", "n_prompts"],
    )
    fig = flow_plots.plot_head_frequency(freq)
    images = [a.images[0].get_array() for a in fig.axes if a.images]
    assert len(images) == 2
    assert images[0][1].tolist() == [0.5, 0.5, 0.5] and images[1][:, 2].tolist() == pytest.approx([2 / 3, 2 / 3])
    panels = [a for a in fig.axes if a.images]  # one layer label, on the first panel (not over its neighbour)
    assert [a.get_ylabel() for a in panels] == ["layer", ""]
    fig = flow_plots.plot_frequency_scatter(freq, "en", "zh", n_label=2)
    assert len(fig.axes[0].texts) == 2
    assert f"r = {flow.frequency_correlation(freq):.2f}" in fig.axes[0].get_title()
    table = pd.DataFrame(
        {"reference": ["en vs zh", "chance"], "correlation": [0.8, 0.0], "low": [0.7, -0.3], "high": [0.9, 0.3]}
    )
    ax = flow_plots.plot_frequency_comparison(table).axes[0]
    bars = ax.containers[0]
    assert bars.lines[0].get_xdata().tolist() == [0.8, 0.0]  # first row on top
    assert [s[:, 0].tolist() for s in bars.lines[2][0].get_segments()] == [[0.7, 0.9], [-0.3, 0.3]]
    height = {t.get_text(): t.get_position()[1] for t in ax.get_yticklabels()}
    assert height["en vs zh"] > height["chance"] and bars.lines[0].get_ydata().tolist() == [1, 0]
    plt.close("all")


def _reference_route_edges(result, index, tau):
    """The LM Transparency Tool's search, written out: a full graph of string nodes (X0_t, A/M/I<layer>_t)
    with every edge, then a depth-first search backwards from I<last>_<end> over edges of weight > tau."""
    t = result.threshold(tau)
    n = int(t.lengths[index])
    g = nx.DiGraph()

    def add(u, v, w):
        g.add_edge(u, v, weight=g[u][v]["weight"] + w if g.has_edge(u, v) else w)

    for layer in range(t.n_layers):
        src = lambda k, layer=layer: f"I{layer - 1}_{k}" if layer > 0 else f"X0_{k}"  # noqa: E731
        for q in range(n):
            for k in range(n):
                add(src(k), f"A{layer}_{q}", float(t.attn[index, layer, :, q, k].sum()))
            add(src(q), f"A{layer}_{q}", float(t.attn_resid[index, layer, q]))
            add(f"A{layer}_{q}", f"M{layer}_{q}", float(t.ffn[index, layer, q]))
            add(f"M{layer}_{q}", f"I{layer}_{q}", float(t.ffn[index, layer, q]))
            add(f"A{layer}_{q}", f"I{layer}_{q}", float(t.ffn_resid[index, layer, q]))
    reverse = g.reverse()
    search = nx.subgraph_view(reverse, filter_edge=lambda u, v: reverse[u][v]["weight"] > tau)
    edges = nx.edge_dfs(search, source=f"I{t.n_layers - 1}_{n - 1}")
    return {(v, u) for u, v in edges}


def _name(node):
    layer, pos, kind = node
    return {"embed": f"X0_{pos}", "mid": f"A{layer}_{pos}", "ffn": f"M{layer}_{pos}", "post": f"I{layer}_{pos}"}[kind]


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bloom"])
def test_route_edges_match_reference_tool_search_over_the_full_graph(family):
    model = tiny_model(family, seed=4)
    tokens = random_tokens(2, 7, seed=9)
    result = flow.contributions(model, tokens, torch.tensor([7, 5]))
    for index in range(2):
        for tau in (0.002, 0.01, 0.04):
            graph = flow.route(result, index, tau=tau)
            assert {(_name(u), _name(v)) for u, v in graph.edges} == _reference_route_edges(result, index, tau)


def _route_graph_through(n_layers: int, working: dict[int, str]) -> nx.DiGraph:
    """A hand-made route of 4 tokens: the residual of position 3 through every layer; ``working`` layers add
    an attention edge from position 1 (``"attn"``) or an FFN (``"ffn"``)."""
    g = nx.DiGraph(tokens=["a", "b", "c", "d"], index=0, position=3, tau=0.1, n_layers=n_layers, parallel=False)
    g.add_node((n_layers - 1, 3, "post"))
    for layer in range(n_layers):
        src = (layer - 1, 3, "post") if layer else (0, 3, "embed")
        mid, post = (layer, 3, "mid"), (layer, 3, "post")
        g.add_edge(src, mid, weight=0.5, kind="residual", heads={}, residual=0.5)
        if working.get(layer) == "attn":
            g.add_edge((layer - 1, 1, "post"), mid, weight=0.4, kind="attn", heads={2: 0.4}, residual=0.0)
        if working.get(layer) == "ffn":
            g.add_edge(mid, (layer, 3, "ffn"), weight=0.3, kind="ffn", heads={}, residual=0.0)
            g.add_edge((layer, 3, "ffn"), post, weight=0.3, kind="ffn", heads={}, residual=0.0)
        g.add_edge(mid, post, weight=0.5, kind="residual", heads={}, residual=0.5)
    return g


def test_a_30_layer_route_figure_is_bounded_and_thins_the_layers_that_only_pass_the_residual():
    import matplotlib

    matplotlib.use("Agg")
    from lsa.plotting import flow as flow_plots

    graph = _route_graph_through(30, {12: "attn", 25: "ffn"})
    fig = flow_plots.plot_route(graph)
    width, height = fig.get_size_inches()
    assert width <= flow_plots.MAX_ROUTE_SIZE[0] and height <= flow_plots.MAX_ROUTE_SIZE[1]
    assert height < 1.0 + 0.55 * 2.0 * 30  # smaller than the uncompressed layout (2 units a layer)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "L12", "L25", "L29"]
    bottoms, heights = flow_plots.layer_bands(graph, 30)
    assert heights[12] == heights[25] == 2.0 and heights[0] == heights[29] == flow_plots.QUIET
    assert bottoms[13] == pytest.approx(bottoms[12] + 2.0)
    assert len(ax.lines) == graph.number_of_edges()
    full = flow_plots.plot_route(graph, compress=False)
    assert len(full.axes[0].get_yticklabels()) == 31 and full.get_size_inches()[1] <= flow_plots.MAX_ROUTE_SIZE[1]
