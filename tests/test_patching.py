"""Activation and path patching against hand-written hook references on every family.

Each reference below runs ``model.hf`` in full, once per intervention, with plain
``register_forward_hook`` / ``register_forward_pre_hook`` code and reads the metric
from the full logits: no batching, no skipped layers, no end-only unembedding.
"""

import warnings

import pytest
import torch
from helpers import FAMILIES, gpt2_tokenizer, make_prompts, oriented, tiny_model

from lsa import engine
from lsa.configs import TINY, random_hf_model
from lsa.metrics import logit_diff
from lsa.model import wrap
from lsa.patching import activation_patching, path_patching, path_runs, position_index

TOL = 1e-5


# ----------------------------------------------------------------- reference code
def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _hook(module, kind, fn):
    """kind 'in': fn(input) -> new input; kind 'out': fn(output tensor) -> new tensor."""
    if kind == "in":

        def pre(m, args, kwargs):
            new = fn(_first(args, kwargs))
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    return module.register_forward_hook(post)


def _point(model, site, layer):
    if site == "resid_pre":
        return model.adapter.block(model.hf, layer), "in"
    if site == "resid_post":
        return model.adapter.block(model.hf, layer), "out"
    if site == "attn_out":  # the write: what joins the residual (a sandwich norm's output in Gemma 3)
        return model.module("attn_write", layer), "out"
    if site == "head":
        return model.module("o_proj", layer), "in"
    if site == "mlp_out":
        return model.module("mlp_write", layer), "out"
    if site == "neuron":
        return model.module("mlp_out", layer), "in"
    if site == "resid_mid":  # the mid residual is what the second norm reads
        return model.module("ln2", layer), "in"
    raise ValueError(site)


@torch.no_grad()
def ref_run(model, tokens, hooks=()):
    """Full logits of a plain forward with hooks [(module, kind, fn)]."""
    handles = [_hook(m, k, f) for m, k, f in hooks]
    try:
        return model.hf(tokens).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ref_read(model, tokens, site, layer):
    store = {}
    module, kind = _point(model, site, layer)

    def keep(x):
        store["x"] = x.clone()
        return x

    ref_run(model, tokens, [(module, kind, keep)])
    return store["x"]


def ref_patch_metric(model, prompts, site, layer, unit, pos, direction="noising"):
    """Metric [n] with one component patched, computed with plain hooks."""
    base, donor = (prompts.clean, prompts.corrupt) if direction == "noising" else (prompts.corrupt, prompts.clean)
    a = model.adapter
    n = len(prompts)
    rows = torch.arange(n)
    donor_act = ref_read(model, donor, site, layer)

    def select(x):  # boolean mask of what is replaced, same shape as x
        mask = torch.zeros_like(x, dtype=torch.bool)
        if site == "head":
            cols = slice(unit * a.d_head, (unit + 1) * a.d_head)
        elif site == "neuron":
            cols = slice(unit, unit + 1)
        else:
            cols = slice(None)
        if pos is None:
            mask[:, :, cols] = True
        else:
            p = pos if isinstance(pos, torch.Tensor) else torch.full((n,), pos)
            mask[rows, p, cols] = True
        return mask

    if site == "resid_mid":
        # write the donor mid residual by changing the attention write
        store = {}

        def keep_pre(x):
            store["pre"] = x
            return x

        def write(x):
            mask = select(x)
            return torch.where(mask, donor_act - store["pre"], x)

        hooks = [
            (a.block(model.hf, layer), "in", keep_pre),
            (model.module("attn_write", layer), "out", write),
        ]
    else:
        module, kind = _point(model, site, layer)
        hooks = [(module, kind, lambda x: torch.where(select(x), donor_act, x))]
    return logit_diff(ref_run(model, base, hooks), prompts)


# ----------------------------------------------------------------- activation patching
def _neox_serial():
    spec = dict(TINY["gpt_neox"], use_parallel_residual=False)
    from helpers import word_tokenizer

    return wrap(random_hf_model(spec, seed=1), word_tokenizer(97), name="tiny-neox-serial")


def _sites(model):
    sites = ["resid_pre", "resid_post", "attn_out", "mlp_out", "head", "neuron"]
    return sites + ([] if model.adapter.parallel_residual else ["resid_mid"])


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_neox_serial"])
def test_every_site_matches_reference_hooks(family):
    model = _neox_serial() if family == "gpt_neox_serial" else tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=1)
    for site in _sites(model):
        kw = {"neurons": [0, 5]} if site == "neuron" else {}
        res = activation_patching(model, prompts, site, progress=False, batch_size=3, **kw)
        for row, patched in zip(res.components.to_dict("records"), res.patched):
            unit = row.get("head", row.get("neuron"))
            ref = ref_patch_metric(model, prompts, site, row["layer"], unit, None)
            assert (patched - ref).abs().max() <= TOL, (family, site, row)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_by_position_and_denoising_match_reference_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=2)
    res = activation_patching(
        model, prompts, "head", positions=[1, "mid", "end"], direction="denoising", progress=False
    )
    assert res.array.shape == (model.adapter.n_layers, model.adapter.n_heads, 3)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        pos = (
            row["pos"]
            if isinstance(row["pos"], int)
            else {"mid": prompts.positions["mid"], "end": prompts.end}[row["pos"]]
        )
        ref = ref_patch_metric(model, prompts, "head", row["layer"], row["head"], pos, direction="denoising")
        assert (patched - ref).abs().max() <= TOL, (family, row)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_at_later_positions_recomputes_only_them_and_matches_reference_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=8, lengths=[8, 7, 7], seed=4)
    widths = []
    last = model.adapter.blocks(model.hf)[-1]
    handle = last.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(_first(args, kwargs).shape[1]), with_kwargs=True
    )
    try:
        res = activation_patching(model, prompts, "head", positions=["mid", "end"], progress=False)
    finally:
        handle.remove()
    with engine.without("reuse_cache"):
        old = activation_patching(model, prompts, "head", positions=["mid", "end"], progress=False)
    # the two unpatched runs see all 8 positions; a patched run, prompts whose patched position is p,
    # and recomputes p up to their end only (what follows is padding)
    where = {"mid": prompts.positions["mid"], "end": prompts.end}
    recomputed = {int(n - p) for pos in where.values() for n, p in zip(prompts.lengths, pos)}
    assert widths[:2] == [8, 8] and set(widths[2:]) == recomputed == {1, 4}
    torch.testing.assert_close(res.patched, old.patched, rtol=0, atol=1e-5)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        pos = {"mid": prompts.positions["mid"], "end": prompts.end}[row["pos"]]
        ref = ref_patch_metric(model, prompts, "head", row["layer"], row["head"], pos)
        assert (patched - ref).abs().max() <= TOL, (family, row)


@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2"])
def test_residual_layer_by_position_grid_matches_reference_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=2, pos=5, seed=3)
    prompts = oriented(model, prompts)  # normalising needs a counterfactual that lowers the metric
    res = activation_patching(model, prompts, "resid_pre", positions="each", progress=False)
    assert res.array.shape == (model.adapter.n_layers, 5)
    assert list(res.frame.columns[:3]) == ["site", "layer", "pos"]
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        ref = ref_patch_metric(model, prompts, "resid_pre", row["layer"], None, row["pos"])
        assert (patched - ref).abs().max() <= TOL
    # the frame's normalised column is (patched - clean) / (clean - corrupt) on means
    frame = res.frame
    clean, corrupt = res.clean.mean(), res.corrupt.mean()
    expected = (res.patched.mean(1) - clean) / (clean - corrupt)
    assert torch.allclose(torch.tensor(frame["normalized"].values), expected, atol=1e-6)
    per_prompt = res.to_frame(per_prompt=True)
    assert len(per_prompt) == len(frame) * len(prompts)
    means = per_prompt.groupby(["layer", "pos"], sort=False)["metric"].mean().values
    assert torch.allclose(torch.tensor(means).double(), torch.tensor(frame["metric"].values).double(), atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_by_position_map_patches_only_prompts_whose_named_positions_coincide(family):
    """Equal lengths are not enough: a length group of real prompts mixes templates with IO at other positions."""
    model = tiny_model(family)
    prompts = make_prompts(n=5, pos=6, seed=3)  # named: first (0), mid (3)
    prompts.positions["IO"] = torch.tensor([1, 1, 4, 1, 4])  # two layouts of one length
    prompts = oriented(model, prompts)
    with pytest.warns(UserWarning, match=r"2 such groups \(sizes \[3, 2\]\): patching the largest, 3 prompts"):
        res = activation_patching(model, prompts, "resid_pre", positions="each", progress=False)
    group = prompts.subset([0, 1, 3])
    assert (res.meta["n_prompts"], res.meta["n_given"]) == (3, 5)
    assert res.patched.shape == (model.adapter.n_layers * 6, 3)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        ref = ref_patch_metric(model, group, "resid_pre", row["layer"], None, row["pos"])
        assert (patched - ref).abs().max() <= TOL
    word = lambda p: f"w{int(group.clean[0, p])}"  # noqa: E731
    assert res.meta["pos_labels"] == [
        f"0:{word(0)} (first)",
        f"1:{word(1)} (IO)",
        f"2:{word(2)}",
        f"3:{word(3)} (mid)",
        f"4:{word(4)}",
        f"5:{word(5)} (end)",
    ]
    import matplotlib

    matplotlib.use("Agg")
    from lsa.plotting import patching as patching_plots

    fig = patching_plots.patching_map({"en": res})  # the figure shows those labels and what the map rests on
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == res.meta["pos_labels"]
    assert fig.axes[0].get_title() == "en (3 of 5 prompts)"
    # prompts of different lengths: the largest aligned group too
    ragged = oriented(model, make_prompts(n=3, pos=5, lengths=[5, 3, 5], seed=10))
    with pytest.warns(UserWarning, match="the largest, 2 prompts"):
        res = activation_patching(model, ragged, "resid_pre", positions="each", layers=[1], progress=False)
    assert res.array.shape == (1, 5) and res.meta["n_prompts"] == 2
    # one group already: no warning, every prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = activation_patching(model, group, "resid_pre", positions="each", layers=[0], progress=False)
    assert res.meta["n_prompts"] == res.meta["n_given"] == 3


def test_position_map_groups_real_gpt2_ioi_prompts_by_layout_and_labels_positions_with_their_tokens():
    from lsa import tasks
    from lsa.patching import position_labels, position_map_prompts

    tok = gpt2_tokenizer()
    p = tasks.build("ioi", "en", tok, n=60, seed=0)
    mixed = max(p.by_length(), key=lambda g: len(set(g.positions["IO"].tolist())))
    assert len(set(mixed.positions["IO"].tolist())) > 1  # what the map used to average over
    with pytest.warns(UserWarning, match="largest"):
        g = position_map_prompts(mixed)
    for name in ("IO", "S1", "S2", "end"):
        assert len(set(g.positions[name].tolist())) == 1
    labels = position_labels(g, tok, list(range(g.clean.shape[1])))
    io, s2 = int(g.positions["IO"][0]), int(g.positions["S2"][0])
    io_token = tok.decode([int(g.clean[0, io])]).strip()
    assert labels[io] == f"{io}:{io_token} (IO)" and g.meta["io"].iloc[0].endswith(io_token)  # the name's last token
    assert labels[s2].endswith("(S2)") and labels[-1].endswith("(end)")


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_with_the_runs_own_activations_changes_nothing(family):
    model = tiny_model(family)
    prompts = make_prompts(n=2, pos=5, seed=4)
    prompts.corrupt = prompts.clean.clone()
    clean = logit_diff(model.logits(prompts.clean), prompts)
    for site in _sites(model):
        kw = {"neurons": [1, 2]} if site == "neuron" else {}
        res = activation_patching(model, prompts, site, positions=[None, 2], progress=False, **kw)
        assert (res.patched - clean).abs().max() <= TOL, site


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_final_residual_reproduces_counterfactual_logits(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 4, 5], seed=5)
    seen = []

    def keep_logits(logits, p):
        seen.append(logits.clone())
        return logit_diff(logits, p)

    last = model.adapter.n_layers - 1
    res = activation_patching(model, prompts, "resid_post", layers=[last], metric=keep_logits, progress=False)
    corrupt_logits = model.logits(prompts.corrupt)[torch.arange(3), prompts.end]
    assert (seen[-1] - corrupt_logits).abs().max() <= TOL
    assert torch.allclose(res.patched.mean(1), res.corrupt.mean(), atol=1e-5)  # normalised: -1
    assert (res.patched[0] - logit_diff(model.logits(prompts.corrupt), prompts)).abs().max() <= TOL


# ----------------------------------------------------------------- path patching
def ref_path_to_logits(model, prompts, sender):
    """Sender head's output from the counterfactual run, every other head frozen to its clean output."""
    a = model.adapter
    hooks = []
    for layer in range(a.n_layers):
        clean_z = ref_read(model, prompts.clean, "head", layer)
        value = clean_z.clone()
        if layer == sender[0]:
            corrupt_z = ref_read(model, prompts.corrupt, "head", layer)
            cols = slice(sender[1] * a.d_head, (sender[1] + 1) * a.d_head)
            value[:, :, cols] = corrupt_z[:, :, cols]
        hooks.append((model.module("o_proj", layer), "in", lambda x, v=value: v))
    return logit_diff(ref_run(model, prompts.clean, hooks), prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_to_logits_matches_reference_freezing_hooks(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=6)
    queries = []  # the last layer's query projection runs only in the unpatched runs: its heads are frozen
    q_proj, _ = model.adapter.qkv_columns(model.hf, "q", model.adapter.n_layers - 1, 0)
    handle = q_proj.register_forward_hook(lambda m, a, o: queries.append(o.shape[0]))
    try:
        res = path_patching(model, prompts, receivers="logits", progress=False)
    finally:
        handle.remove()
    assert queries == [3, 3]
    assert res.array.shape == (model.adapter.n_layers, model.adapter.n_heads)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        ref = ref_path_to_logits(model, prompts, (row["layer"], row["head"]))
        assert (patched - ref).abs().max() <= TOL, (family, row)
    with engine.without("skip_attention"):
        recomputed = path_patching(model, prompts, receivers="logits", progress=False)
    torch.testing.assert_close(res.patched, recomputed.patched, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_at_a_position_matches_reference_hooks_and_equals_all_positions_into_logits(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=7, lengths=[7, 6, 6], seed=8)
    to_logits = path_patching(model, prompts, receivers="logits", progress=False)
    at_end = path_patching(model, prompts, receivers="logits", positions="end", progress=False)
    # every other head frozen: a sender reaches the logits only through the end position's residual
    torch.testing.assert_close(at_end.patched, to_logits.patched, rtol=0, atol=1e-5)
    last = model.adapter.n_layers - 1
    receivers = [(last, 0), (last, 1)]
    got = path_patching(
        model, prompts, [(0, 0), (0, 1)], receivers, receiver_input="q", positions="mid", progress=False
    )
    for (layer, head), patched in zip([(0, 0), (0, 1)], got.patched):
        ref = ref_path_to_receivers(model, prompts, (layer, head), receivers, "q", pos=prompts.positions["mid"])
        assert (patched - ref).abs().max() <= TOL, (family, layer, head)


def test_path_patching_last_layer_sender_equals_activation_patching_its_head():
    # With nothing downstream of the last layer's heads but the unembedding, freezing
    # the other heads changes nothing: path patching = activation patching there.
    model = tiny_model("gpt2")
    prompts = make_prompts(n=3, pos=6, seed=7)
    last = model.adapter.n_layers - 1
    path = path_patching(model, prompts, senders=[(last, h) for h in range(4)], progress=False)
    act = activation_patching(model, prompts, "head", layers=[last], progress=False)
    assert (path.patched - act.patched).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2", "mistral", "gpt_neox"])
def test_qkv_columns_touch_only_their_head(family):
    # Independent check of the layout data used for receivers: perturbing a head's
    # q / k / v columns (random noise: a constant
    # shift of keys leaves softmax unchanged) changes that head's output (or its KV group's) and no other.
    model = tiny_model(family)
    a = model.adapter
    tokens = make_prompts(n=2, pos=5, seed=8).clean
    clean_z = ref_read(model, tokens, "head", 1).reshape(2, 5, a.n_heads, a.d_head)
    for kind in "qkv":
        unit = 1 if kind == "q" or a.n_kv_heads > 1 else 0
        module, cols = a.qkv_columns(model.hf, kind, 1, unit)

        def bump(out, cols=cols):
            out = out.clone()
            out[..., cols] += torch.randn(out[..., cols].shape, generator=torch.Generator().manual_seed(0))
            return out

        handle = module.register_forward_hook(lambda m, i, o, bump=bump: bump(o))
        try:
            z = ref_read(model, tokens, "head", 1).reshape(2, 5, a.n_heads, a.d_head)
        finally:
            handle.remove()
        changed = {h for h in range(a.n_heads) if (z[:, :, h] - clean_z[:, :, h]).abs().max() > 1e-5}
        expected = {unit} if kind == "q" else {h for h in range(a.n_heads) if a.kv_head(h) == unit}
        assert changed == expected, (family, kind, changed, expected)


def ref_path_to_receivers(model, prompts, sender, receivers, kinds, pos=None, at_end=False):
    """Wang et al. steps 2-3 with plain hooks, one sender at a time (patched at ``pos`` [n] alone if given).

    ``at_end``: the receivers' heads (every head of a key / value receiver's KV group) give the
    clean run's output at every position but the end.
    """
    a = model.adapter
    n_layers = a.n_layers
    # step 2: sender from the counterfactual run, every other head frozen; record each receiver layer's ln1 output
    hooks = []
    for layer in range(n_layers):
        value = ref_read(model, prompts.clean, "head", layer).clone()
        if layer == sender[0]:
            cols = slice(sender[1] * a.d_head, (sender[1] + 1) * a.d_head)
            at = (slice(None), slice(None), cols) if pos is None else (torch.arange(len(prompts)), pos, cols)
            value[at] = ref_read(model, prompts.corrupt, "head", layer)[at]
        hooks.append((model.module("o_proj", layer), "in", lambda x, v=value: v))
    seen = {}
    for layer in {r[0] for r in receivers}:

        def keep(x, layer=layer):
            seen[layer] = x.clone()
            return x

        hooks.append((model.module("ln1", layer), "out", keep))
    ref_run(model, prompts.clean, hooks)
    # step 3: clean run, only the receivers' q / k / v recomputed from the recorded input
    clean_z = {layer: ref_read(model, prompts.clean, "head", layer) for layer in seen} if at_end else {}
    handles = []
    for layer, head in receivers:
        if layer <= sender[0]:
            continue
        for kind in kinds:
            unit = head if kind == "q" else a.kv_head(head)
            module, cols = a.qkv_columns(model.hf, kind, layer, unit)
            with torch.no_grad():
                patched = module(seen[layer])

            def swap(m, i, out, patched=patched, cols=cols):
                out = out.clone()
                out[..., cols] = patched[..., cols]
                return out

            handles.append(module.register_forward_hook(swap))
    if at_end:
        for layer in {r[0] for r in receivers if r[0] > sender[0]}:
            heads = {
                h
                for rl, rh in receivers
                if rl == layer
                for kind in kinds
                for h in range(a.n_heads)
                if (h == rh if kind == "q" else a.kv_head(h) == a.kv_head(rh))
            }

            def keep_end(m, args, clean_z=clean_z[layer], heads=heads):
                z = args[0].clone()
                for i in range(len(prompts)):
                    other = torch.arange(z.shape[1]) != prompts.end[i]
                    for h in heads:
                        cols = slice(h * a.d_head, (h + 1) * a.d_head)
                        z[i, other, cols] = clean_z[i, other, cols]
                return (z, *args[1:])

            handles.append(model.module("o_proj", layer).register_forward_pre_hook(keep_end))
    try:
        return logit_diff(ref_run(model, prompts.clean), prompts)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_to_receiver_qkv_matches_reference_hooks(family):
    model = _deeper(family)
    prompts = make_prompts(n=2, pos=6, lengths=[6, 5], seed=9)
    receivers = [(2, 0), (2, 3), (1, 1)]
    for kinds in ("q", "k", "v", "kv"):
        senders = [(0, 0), (0, 2), (1, 3), [(0, 1), (1, 0)]]
        res = path_patching(model, prompts, senders=senders, receivers=receivers, receiver_input=kinds, progress=False)
        for sender, patched in zip([(0, 0), (0, 2), (1, 3)], res.patched):
            ref = ref_path_to_receivers(model, prompts, sender, receivers, kinds)
            assert (patched - ref).abs().max() <= TOL, (family, kinds, sender)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_into_keys_and_values_at_a_position_matches_reference_hooks(family):
    """Senders at one position (per prompt, a name with an offset included) into receivers' keys / values.

    The run with every head frozen computes that position alone (nothing else moves); the result
    must still equal plain hooks that patch the senders there and recompute every position.
    """
    model = _deeper(family)
    prompts = make_prompts(n=3, pos=7, lengths=[7, 6, 6], seed=11)
    receivers = [(2, 0), (2, 3), (1, 1)]
    senders = [(0, 0), (0, 2), (1, 3)]
    for kinds, pos in (("kv", "mid"), ("k", "mid+1"), ("v", "first+1"), ("qkv", "end")):
        res = path_patching(model, prompts, senders, receivers, receiver_input=kinds, positions=pos, progress=False)
        where = position_index(prompts, pos)
        for sender, patched in zip(senders, res.patched):
            ref = ref_path_to_receivers(model, prompts, sender, receivers, kinds, pos=where)
            assert (patched - ref).abs().max() <= TOL, (family, kinds, pos, sender)
    assert position_index(prompts, "mid+1").tolist() == [4, 4, 4]
    with pytest.raises(IndexError, match="outside some prompts"):
        position_index(prompts, "end+1")
    with pytest.raises(ValueError, match="unknown position name"):
        position_index(prompts, "S1+1")


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_with_receivers_read_at_the_end_matches_reference_hooks(family):
    """``receivers_at="end"``: senders at a position before the end recompute the end alone
    (the receivers' keys and values at the senders' position from one run of it); at every
    position, or with the prefix recomputed, edits keep the receivers' other positions."""
    model = _deeper(family)
    prompts = make_prompts(n=4, pos=7, lengths=[7, 6, 6, 7], seed=14)
    receivers = [(2, 0), (2, 3), (1, 1)]
    senders = [(0, 0), (0, 2), (1, 3)]
    cases = [("kv", "mid"), ("k", "first+1"), ("v", "first"), ("qkv", "mid"), ("q", "end"), ("kv", None)]
    for kinds, pos in cases:
        where = None if pos is None else position_index(prompts, pos)
        refs = [ref_path_to_receivers(model, prompts, s, receivers, kinds, pos=where, at_end=True) for s in senders]
        for reuse in (True, False):
            with engine.without(*([] if reuse else ["reuse_cache"])):
                res = path_patching(
                    model, prompts, senders, receivers, receiver_input=kinds, positions=pos, receivers_at="end",
                    progress=False,
                )  # fmt: skip
            for sender, patched, ref in zip(senders, res.patched, refs):
                assert (patched - ref).abs().max() <= TOL, (family, kinds, pos, reuse, sender)
    with pytest.raises(ValueError, match="receivers_at"):
        path_patching(model, prompts, receivers="logits", receivers_at="end", progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_into_several_inputs_at_once_matches_reference_hooks_for_each(family):
    """``receiver_input=("k", "v", "q")``: one result per input from one senders' run, each equal to the
    reference hooks patching that input alone (read at the end, or wherever the inputs reach). Five
    layers: one without receivers between theirs (2), one after them (4)."""
    model = _deeper(family, layers=5)
    prompts = make_prompts(n=4, pos=7, lengths=[7, 6, 6, 7], seed=15)
    receivers = [(3, 1), (1, 2)]
    senders = [(0, 1), (0, 3), (1, 0)]
    for pos, at in (("mid", "end"), ("first+1", None), (None, None)):
        where = None if pos is None else position_index(prompts, pos)
        res = path_patching(
            model, prompts, senders, receivers, receiver_input=("k", "v", "q"), positions=pos, receivers_at=at,
            progress=False,
        )  # fmt: skip
        assert list(res) == ["k", "v", "q"]
        for ix, one in res.items():
            assert one.meta["receiver_input"] == ix
            for sender, patched in zip(senders, one.patched):
                ref = ref_path_to_receivers(model, prompts, sender, receivers, ix, pos=where, at_end=at == "end")
                assert (patched - ref).abs().max() <= TOL, (family, ix, pos, at, sender)
    with pytest.raises(ValueError, match="tuple of inputs"):
        path_patching(model, prompts, receivers="logits", receiver_input=("k", "v"), progress=False)


def test_receivers_read_at_the_end_pass_on_less_than_receivers_read_everywhere():
    """A receiver before the last layer (1.1) passes its changed outputs at mid..end-1 on to layer 2's end;
    read at the end alone it does not (8.4e-4 apart on this model)."""
    model = _deeper("llama")
    prompts = make_prompts(n=4, pos=7, lengths=[7, 6, 6, 7], seed=14)
    kw = dict(receiver_input="kv", positions="mid", progress=False)
    every = path_patching(model, prompts, [(0, 0), (0, 2)], [(2, 0), (1, 1)], **kw)
    at_end = path_patching(model, prompts, [(0, 0), (0, 2)], [(2, 0), (1, 1)], receivers_at="end", **kw)
    assert (every.patched - at_end.patched).abs().max() > 1e-4


def test_path_patching_from_shared_unpatched_runs_equals_its_own_and_refuses_other_prompts():
    model = _deeper("llama")
    prompts = make_prompts(n=3, pos=7, lengths=[7, 6, 6], seed=12)
    shared = path_runs(model, prompts)
    for kw in (
        dict(receivers="logits"),
        dict(receivers="logits", positions="end"),
        dict(receivers=[(2, 0), (1, 1)], receiver_input="v"),
        dict(receivers=[(2, 0), (1, 1)], receiver_input="k", positions="mid"),
    ):
        own = path_patching(model, prompts, progress=False, **kw)
        from_shared = path_patching(model, prompts, progress=False, unpatched=shared, **kw)
        torch.testing.assert_close(from_shared.patched, own.patched, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unpatched runs are for"):
        path_patching(model, make_prompts(n=3, pos=7, seed=13), unpatched=shared, progress=False)
    with pytest.raises(ValueError, match="unpatched runs are for"):
        path_patching(model, prompts, direction="denoising", unpatched=shared, progress=False)


def _deeper(family, layers=3):
    from helpers import word_tokenizer

    spec = dict(TINY[family])
    key = "n_layer" if "n_layer" in spec else "num_hidden_layers"
    spec[key] = layers
    if "layer_types" in spec:  # Gemma 3's pattern, repeated
        spec["layer_types"] = [spec["layer_types"][i % len(spec["layer_types"])] for i in range(layers)]
    return wrap(random_hf_model(spec, seed=2), word_tokenizer(97), name=f"tiny{layers}-{family}")


# ----------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    model = tiny_model("gpt2")
    prompts = make_prompts(n=2, pos=5, seed=10)
    with pytest.raises(ValueError, match="one value per prompt"):
        activation_patching(model, prompts, "head", metric=lambda logits, p: logits, progress=False)
    with pytest.raises(IndexError, match="layer 7 out of range"):
        activation_patching(model, prompts, "head", layers=[7], progress=False)
    with pytest.raises(IndexError, match="head 9 out of range"):
        activation_patching(model, prompts, "head", heads=[9], progress=False)
    with pytest.raises(IndexError, match="head 4 out of range"):
        path_patching(model, prompts, senders=[(0, 4)], progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        activation_patching(model, prompts, "z", progress=False)
    with pytest.raises(IndexError, match="position 9 out of range"):
        activation_patching(model, prompts, "head", positions=[9], progress=False)
    with pytest.raises(ValueError, match="unknown position name"):
        activation_patching(model, prompts, "head", positions=["S2"], progress=False)
    uneven = make_prompts(n=2, pos=5, seed=10)
    uneven.corrupt = uneven.corrupt[:, :4]
    with pytest.raises(ValueError, match="different shapes"):
        activation_patching(model, uneven, "head", progress=False)
    ragged = make_prompts(n=2, pos=5, lengths=[5, 3], seed=10)
    with pytest.warns(UserWarning, match="aligned"):  # a position map keeps one layout and says so
        activation_patching(model, ragged, "resid_pre", positions="each", layers=[0], progress=False)
    with pytest.raises(ValueError, match="parallel-residual"):
        activation_patching(tiny_model("gpt_neox"), prompts, "resid_mid", progress=False)
    with pytest.raises(ValueError, match="receiver_input"):
        path_patching(model, prompts, receivers=[(1, 0)], receiver_input="x", progress=False)
    with pytest.raises(ValueError, match="direction"):
        activation_patching(model, prompts, "head", direction="sideways", progress=False)
    with pytest.raises(ValueError, match="kind must be"):
        model.adapter.qkv_columns(model.hf, "x", 0, 0)
    with pytest.raises(IndexError, match="k head 4 out of range"):
        model.adapter.qkv_columns(model.hf, "k", 0, 4)
    model.remote = True  # a model built here cannot go to NDIF
    with pytest.raises(ValueError, match="NDIF cannot run it"):
        activation_patching(model, prompts, "head", progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sweeps_unembed_only_the_metrics_columns_with_the_same_results(family):
    model = tiny_model(family)
    prompts = make_prompts(n=4, pos=6, lengths=[6, 5, 6, 4], seed=8)
    calls = []
    handle = model.module("unembed").register_forward_hook(lambda m, args, out: calls.append(out.shape[-1]))
    try:
        marked = activation_patching(model, prompts, "head", positions=["mid"], progress=False)
        n_marked = len(calls)
        path = path_patching(model, prompts, receivers="logits", progress=False)
        n_path = len(calls) - n_marked
        calls.clear()
        plain = activation_patching(
            model, prompts, "head", positions=["mid"], metric=lambda lg, p: logit_diff(lg, p), progress=False
        )
        plain_path = path_patching(
            model, prompts, receivers="logits", metric=lambda lg, p: logit_diff(lg, p), progress=False
        )
    finally:
        handle.remove()
    # logit_diff reads two columns: the whole unembedding runs in the two unpatched runs alone;
    # an unmarked metric gets the full vocabulary in every patched run too
    assert n_marked == 2 and n_path == 2 and len(calls) > 4 and set(calls) == {model.adapter.d_vocab}
    torch.testing.assert_close(marked.patched, plain.patched, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.patched, plain_path.patched, rtol=0, atol=1e-6)
