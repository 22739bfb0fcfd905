"""A plain-hook reference for edges, independent of lsa's engine and of lsa.graph's arithmetic.

Parts are read with torch hooks on the Hugging Face modules (the adapter only names them): the
block-0 input, each head's output through its rows of the output projection (weights read here),
each layer's projection output, each MLP's write. A receiver's input is *built* from parts
(``rest + sum over senders of the part it reads``, ``rest`` = what no sender writes: biases), with
a sandwich-normed layer entering as that norm module applied to the mixed projection output; each
head's query, key and value come from the full projection module applied to its own normed input,
and only that head's columns are kept.
"""

from __future__ import annotations

import torch


class Parts:
    """Parts of one plain run: ``embed [b, p, d]``, ``heads[l] [b, p, H, d]``, ``raw[l]``, ``attn[l]``, ``mlp[l]``."""

    def __init__(self):
        self.embed, self.heads, self.raw, self.attn, self.mlp, self.resid = None, {}, {}, {}, {}, {}


def _hooks(model, parts: Parts):
    a, hf = model.adapter, model.hf
    handles = []

    def keep(store, key):
        return lambda m, args, out: store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    for layer in range(a.n_layers):
        w = a.module(hf, "o_proj", layer).weight
        w_in = w if a.layout.conv1d else w.T  # [H * dh, d]

        def heads(m, args, layer=layer, w_in=w_in):
            z = args[0].reshape(*args[0].shape[:2], a.n_heads, a.d_head)
            parts.heads[layer] = torch.stack(
                [z[:, :, h] @ w_in[h * a.d_head : (h + 1) * a.d_head] for h in range(a.n_heads)], 2
            ).detach()

        handles.append(a.module(hf, "o_proj", layer).register_forward_pre_hook(heads))
        handles.append(a.module(hf, "o_proj", layer).register_forward_hook(keep(parts.raw, layer)))
        handles.append(a.module(hf, "attn_write", layer).register_forward_hook(keep(parts.attn, layer)))
        handles.append(a.module(hf, "mlp_write", layer).register_forward_hook(keep(parts.mlp, layer)))
    return handles


def read_parts(model, tokens: torch.Tensor, embed: torch.Tensor | None = None) -> Parts:
    """The parts of a plain run of ``tokens`` (``embed``: a block-0 input fed instead of the model's)."""
    parts = Parts()
    block0 = model.adapter.block(model.hf, 0)

    def pre(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        parts.embed = (x if embed is None else embed).detach()
        if embed is None:
            return None
        return ((embed, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": embed})

    handles = [block0.register_forward_pre_hook(pre, with_kwargs=True), *_hooks(model, parts)]
    try:
        with torch.no_grad():
            model.hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return parts


def _norm_of_write(model, layer):
    return model.adapter.post_norm(model.hf, "attn", layer)


def swap_change(model, base: Parts, donor: Parts, sender: tuple) -> torch.Tensor:
    """``[b, p, d]``: the residual stream's change when ``sender`` alone takes its donor part in the base run."""
    if sender[0] == "embed":
        return donor.embed - base.embed
    if sender[0] == "mlp":
        return donor.mlp[sender[1]] - base.mlp[sender[1]]
    layer, h = sender[1], sender[2]
    change = donor.heads[layer][:, :, h] - base.heads[layer][:, :, h]
    norm = _norm_of_write(model, layer)
    if norm is None:
        return change
    with torch.no_grad():
        return norm.forward(base.raw[layer] + change) - norm.forward(base.raw[layer])


def receiver_input(model, current: Parts, reference: Parts, x: torch.Tensor, upstream, kept) -> torch.Tensor:
    """A receiver's input built from parts: ``x`` minus every part of this run, plus the parts it reads.

    ``upstream``: the sender keys before it; ``kept(sender)``: whether it reads this run's part
    (else the reference's)."""
    pick = lambda key, cur, ref: cur if kept(key) else ref  # noqa: E731
    out = x - current.embed + pick(("embed",), current.embed, reference.embed)
    layers = sorted({key[1] for key in upstream if key[0] != "embed"})
    for layer in layers:
        heads = [key for key in upstream if key[0] == "head" and key[1] == layer]
        if heads:
            raw = current.raw[layer] - current.heads[layer].sum(2)  # the bias
            for key in heads:
                raw = raw + pick(key, current.heads[layer][:, :, key[2]], reference.heads[layer][:, :, key[2]])
            norm = _norm_of_write(model, layer)
            out = out - current.attn[layer] + (raw if norm is None else norm.forward(raw))  # no hooks: they keep parts
        if ("mlp", layer) in upstream:
            out = out - current.mlp[layer] + pick(("mlp", layer), current.mlp[layer], reference.mlp[layer])
    return out


def run(model, tokens, receivers: dict, embed: torch.Tensor | None = None):
    """End logits ``[b, vocab]`` of a run where each receiver in ``receivers`` reads ``fn(x, current)``.

    ``receivers[(layer, kind, index)] = fn``: kind ``q`` / ``k`` / ``v`` (index: the head, or key/value
    head), ``mlp`` or ``logits`` (layer = n_layers); ``fn(x, current)`` gets the residual stream the
    receiver reads in this run and this run's parts so far. ``embed``: a block-0 input fed instead.
    """
    a, hf = model.adapter, model.hf
    current = Parts()
    handles = _hooks(model, current)
    resid = {}

    def block_pre(m, args, kwargs, layer):
        x = args[0] if args else kwargs["hidden_states"]
        if layer == 0:
            if embed is not None:
                x = embed
            current.embed = x.detach()
        resid[layer] = x
        if layer == 0 and embed is not None:
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return None

    for layer in range(a.n_layers):
        block = a.block(hf, layer)
        handles.insert(
            0,
            block.register_forward_pre_hook(
                lambda m, ar, kw, layer=layer: block_pre(m, ar, kw, layer), with_kwargs=True
            ),
        )
        ln1 = a.module(hf, "ln1", layer)
        for (lay, kind, index), fn in receivers.items():
            if lay != layer or kind not in "qkv":
                continue
            module, cols = a.qkv_columns(hf, kind, layer, index)

            def qkv(m, args, out, fn=fn, cols=cols, layer=layer, ln1=ln1):
                full = m.forward(ln1.forward(fn(resid[layer], current)))
                out = out.clone()
                out[..., cols] = full[..., cols]
                return out

            handles.append(module.register_forward_hook(qkv))
        if (layer, "mlp", 0) in receivers:
            fn = receivers[(layer, "mlp", 0)]
            ln2 = a.module(hf, "ln2", layer)
            handles.append(ln2.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0], current), *args[1:])))
    if (a.n_layers, "logits", 0) in receivers:
        fn = receivers[(a.n_layers, "logits", 0)]
        final = a.module(hf, "final_norm")
        handles.append(final.register_forward_pre_hook(lambda m, args: (fn(args[0], current), *args[1:])))
    try:
        logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits
