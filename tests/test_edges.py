"""Edges of the residual graph: edge attribution (EAP, EAP-IG) and exact edge ablation, each against a
plain-hook reference (``edge_reference``) on tiny random models of every family."""

import pytest
import torch
from edge_reference import Parts, read_parts, receiver_input, run, swap_change
from helpers import FAMILIES, make_prompts, randomize_norms, tiny_model

from lsa.ablation import ablate, ablate_edges
from lsa.attribution import edge_attribution
from lsa.graph import Graph
from lsa.metrics import logit_diff

TOL = 1e-5


def _model(family):
    """A tiny random model with weights large enough that every edge matters (see helpers.parity_model),
    and random norm gains, so that a norm of the wrong layer cannot pass unseen."""
    model = tiny_model(family, spec={"initializer_range": 0.2})
    randomize_norms(model.hf, seed=4, scale=1.0)
    return model


def _prompts():
    return make_prompts(n=4, pos=6, lengths=[6, 6, 5, 6], seed=3)


def _end_diff(logits, prompts):
    rows = torch.arange(len(prompts))
    end = logits[rows, prompts.end]
    return end[rows, prompts.answer] - end[rows, prompts.distractor]


def _receivers(graph: Graph):
    """``(layer, kind, index)`` of every receiver, in the graph's order."""
    out = []
    for key, kind in graph.receivers:
        layer = graph.n_layers if kind == "logits" else key[1]
        out.append((layer, kind, key[2] if len(key) == 3 else 0))
    return out


def _upstream(model, layer, kind):
    a = model.adapter
    keys = [("embed",)]
    for lay in range(layer):
        keys += [("head", lay, h) for h in range(a.n_heads)] + [("mlp", lay)]
    if kind == "mlp" and not a.parallel_residual:
        keys += [("head", layer, h) for h in range(a.n_heads)]
    return keys


def _eap_reference(model, prompts, sender, receiver, steps, direction):
    """Per prompt ``d metric / d eps`` with the receiver reading ``x + eps * change(sender)``, averaged over the steps."""
    base_tokens, donor_tokens = (
        (prompts.clean, prompts.corrupt) if direction == "noising" else (prompts.corrupt, prompts.clean)
    )
    base, donor = read_parts(model, base_tokens), read_parts(model, donor_tokens)
    change = swap_change(model, base, donor, sender)
    total = torch.zeros(len(prompts), dtype=torch.float64)
    for k in range(steps):
        eps = torch.zeros(len(prompts), requires_grad=True)
        embed = base.embed + k / steps * (donor.embed - base.embed)
        fn = lambda x, current, eps=eps: x + eps[:, None, None] * change  # noqa: E731
        logits = run(model, base_tokens, {receiver: fn}, embed=embed)
        (grad,) = torch.autograd.grad(_end_diff(logits, prompts).sum(), eps)
        total += grad.double() / steps
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_edge_attribution_equals_the_derivative_of_each_edge_alone_by_plain_hooks(family):
    model = _model(family)
    prompts = _prompts()
    graph = Graph.of(model)
    a = model.adapter
    last = a.n_layers - 1
    edges = [  # (sender, (layer, kind, index)): every receiver kind, and senders of every kind
        (("embed",), (0, "q", a.n_heads - 1)),
        (("head", 0, 1), (1, "k", a.n_kv_heads - 1)),
        (("mlp", 0), (last, "v", 0)),
        (("head", last, 0), (last, "mlp", 0)),
        (("mlp", last), (a.n_layers, "logits", 0)),
        (("head", 0, a.n_heads - 1), (a.n_layers, "logits", 0)),
    ]
    if a.parallel_residual:  # heads of a layer do not feed its MLP
        edges[3] = (("head", last - 1, 0), (last, "mlp", 0))
    for steps, direction in ((1, "noising"), (3, "denoising")):
        found = edge_attribution(model, prompts, method="eap-ig", steps=steps, direction=direction, progress=False)
        for sender, receiver in edges:
            want = _eap_reference(model, prompts, sender, receiver, steps, direction)
            col = graph.span(receiver[0], receiver[1]).start + receiver[2]
            got = found.per_prompt[:, graph.sender(sender), col].double()
            assert want.abs().max() > 1e-6, (sender, receiver)  # a real effect, not 0 = 0
            assert torch.allclose(got, want, rtol=1e-4, atol=TOL), (family, sender, receiver, steps, got, want)


def test_eap_is_eap_ig_with_one_step_and_scores_are_zero_off_the_graph():
    model = _model("qwen2")
    prompts = _prompts()
    eap = edge_attribution(model, prompts, method="eap", progress=False)
    ig1 = edge_attribution(model, prompts, method="eap-ig", steps=1, progress=False)
    assert eap.steps == 1 and torch.equal(eap.per_prompt, ig1.per_prompt)
    assert (eap.per_prompt[:, ~eap.graph.valid] == 0).all()
    frame = eap.frame
    assert len(frame) == eap.graph.n_edges and frame["score"].abs().is_monotonic_decreasing


def _reference_parts(model, prompts, method):
    if method == "interchange":
        return read_parts(model, prompts.corrupt)
    parts = read_parts(model, prompts.corrupt)
    groups = prompts.groups()
    out = Parts()

    def each(x):
        if method == "zero":
            return torch.zeros_like(x)
        return torch.stack([x[groups == g].mean(0) for g in groups.tolist()])

    out.embed = each(parts.embed)
    for name in ("heads", "mlp"):
        getattr(out, name).update({k: each(v) for k, v in getattr(parts, name).items()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["interchange", "mean", "zero"])
def test_edge_ablation_equals_receivers_built_from_parts_by_plain_hooks(family, method):
    model = _model(family)
    prompts = _prompts()
    graph = Graph.of(model)
    kept = graph.valid & (torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    if method == "zero":  # a receiver (or a sandwich-normed layer) left with no part reads rounding noise, which
        for key in [("embed",)] + [("head", layer, 0) for layer in range(graph.n_layers)]:  # a norm scales up
            kept[graph.sender(key)] = graph.valid[graph.sender(key)]
    reference = _reference_parts(model, prompts, method)
    receivers = {}
    for col, (layer, kind, index) in enumerate(_receivers(graph)):
        upstream = _upstream(model, layer, kind)
        keep = lambda key, col=col: bool(kept[graph.sender(key), col])  # noqa: E731
        receivers[(layer, kind, index)] = lambda x, current, up=upstream, keep=keep: receiver_input(
            model, current, reference, x, up, keep
        )
    want = _end_diff(run(model, prompts.clean, receivers), prompts)
    got = ablate_edges(model, prompts, kept, method=method)
    assert torch.allclose(got, want, atol=TOL), (family, method, got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_edge_kept_is_the_model_none_kept_is_the_counterfactual_and_a_head_cut_is_node_ablation(family):
    model = _model(family)
    prompts = _prompts()
    graph = Graph.of(model)
    with torch.no_grad():
        clean = logit_diff(model.hf(prompts.clean).logits, prompts)
        corrupt = logit_diff(model.hf(prompts.corrupt).logits, prompts)
    stack = torch.stack([graph.valid, torch.zeros_like(graph.valid)])
    both = ablate_edges(model, prompts, stack)
    assert torch.allclose(both[0], clean, atol=TOL) and torch.allclose(both[1], corrupt, atol=TOL)
    heads = [("head", 1, 0), ("head", 0, 1)]
    cut = graph.valid.clone()
    for key in heads:
        cut[graph.sender(key)] = False
    for method in ("interchange", "mean", "resample"):
        node = ablate(model, prompts, heads, method=method, seed=2)
        edge = ablate_edges(model, prompts, cut, method=method, seed=2)
        assert torch.allclose(node, edge, atol=TOL), (family, method)


def test_the_graph_counts_its_edges_and_prunes_what_has_no_path_from_embeddings_to_logits():
    g = Graph(n_layers=2, n_heads=2, n_kv_heads=1)
    # senders: embed, 0.0, 0.1, MLP0, 1.0, 1.1, MLP1; receivers per layer: q0 q1 kv0(k) kv0(v) mlp, then logits
    assert len(g.senders) == 7 and len(g.receivers) == 11
    # layer 0: 4 inputs read embed; MLP0 reads 3; layer 1: 4 inputs read 4 senders; MLP1 reads 6; logits 7
    assert g.n_edges == 4 * 1 + 3 + 4 * 4 + 6 + 7
    chosen = g.mask(
        [
            (("embed",), ("head", 0, 0), "q"),  # embed -> 0.0 -> MLP1 -> logits: a path
            (("head", 0, 0), ("mlp", 1), "mlp"),
            (("mlp", 1), ("logits",), "logits"),
            (("head", 0, 1), ("logits",), "logits"),  # 0.1 reads nothing: no path from the embeddings
            (("embed",), ("kv", 1, 0), "v"),  # 1.x write nowhere: no path to the logits
        ]
    )
    pruned = g.prune(chosen)
    assert [(s, r, k) for s, r, k in g.edge_keys(pruned)] == [
        (("embed",), ("head", 0, 0), "q"),
        (("head", 0, 0), ("mlp", 1), "mlp"),
        (("mlp", 1), ("logits",), "logits"),
    ]
    assert g.nodes(pruned) == [("embed",), ("head", 0, 0), ("mlp", 1)]
    with pytest.raises(ValueError, match="no edge"):
        g.mask([(("mlp", 1), ("head", 0, 0), "q")])


def test_edge_methods_refuse_bad_input_clearly():
    model = _model("gpt2")
    prompts = _prompts()
    with pytest.raises(ValueError, match="method must be one of"):
        edge_attribution(model, prompts, method="acdc")
    with pytest.raises(ValueError, match="steps"):
        edge_attribution(model, prompts, steps=0)
    with pytest.raises(ValueError, match="kept must be"):
        ablate_edges(model, prompts, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ablation method"):
        ablate_edges(model, prompts, Graph.of(model).valid, method="median")
