"""The traced executor: a plan run as one nnsight trace (``model.remote``: NDIF, or ``"local"``, its simulation here).

The same edits and reads at the same sites as the local executor, visited in
the block's forward order inside the trace; only the reads (or their
reductions), the requested logits (or their reduction) and gradients come back.
Every layer runs: a cached start would have to travel both ways, and gives the
same values.
"""

from __future__ import annotations

import inspect
from functools import partial

import nnsight
import torch

from lsa.engine.plan import SITES, Edit, Plan, Run, check, point


def _points(model, edits, reads, projections) -> list[tuple]:
    """``(envoy, layer, kind, index, sites)`` in forward order; ``resid_mid`` also visits its block's input.

    A projection becomes ``(envoy, layer, "proj", 0, [input, mask])`` between the attention input
    and the heads' outputs. Envoys are looked up here, so a request carries them (references to
    the model) rather than the lsa Model.
    """
    found: dict[tuple, list] = {}
    # projections of one layer in the order the model defines them (q, k, v), which is the order they run
    names = {id(m): (i, name) for i, (name, m) in enumerate(model.hf.named_modules())} if projections else {}
    for p in projections:
        order, name = names[id(p.module)]
        found[(p.layer, 1.5 + order * 1e-9, name, "proj", 0)] = [p.given, p.mask]
    keys = [(e.site, e.layer) for e in edits] + [(r.site, r.layer) for r in reads]
    for site, layer in dict.fromkeys(keys):
        part, kind, rank = point(model, site)
        sites = found.setdefault((layer, rank, part, kind, SITES[site].index), [])
        if site not in sites:
            sites.append(site)
        if site == "resid_mid":
            found.setdefault((layer, 0, "block", "pre", 0), [])
    out = []
    for (layer, _, part, kind, index), sites in sorted(found.items(), key=lambda kv: kv[0][:2]):
        if kind == "proj":
            env = model.envoy_at(part)
        elif part == "block":
            env = model.envoy("blocks")[layer]
        elif part in ("embed", "final_norm"):
            env = model.envoy(part)
        else:
            env = model.envoy(part, layer)
        out.append((env, part, layer, kind, index, sites))
    return out


def _given(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return z


def run(model, tokens: torch.Tensor, plan: Plan) -> Run:
    """Run ``plan`` on ``tokens`` ``[batch, pos]`` as one trace (see :func:`lsa.engine.run`)."""
    edits = check(model, plan)
    if plan.split is not None:
        raise ValueError("receivers with their own inputs (plan.split) run locally: use a local model")
    # given heads' outputs as edits replacing the heads' outputs whole (every layer runs in a trace)
    edits += [Edit("head", layer, partial(_given, z=z)) for layer, z in sorted(plan.given_heads.items())]
    edits += [Edit("mlp_out", layer, torch.zeros_like) for layer in plan.idle_mlps]
    fns: dict[tuple[str, int], list] = {}
    for e in edits:
        fns.setdefault((e.site, e.layer), []).append(e.fn)
    reads = {(r.site, r.layer): r for r in plan.reads}
    points = _points(model, edits, plan.reads, plan.projections)
    embed, unembed = model.envoy("embed"), model.envoy("unembed")
    rows = torch.arange(tokens.shape[0])
    end = None if plan.end is None else plan.end.cpu()
    mask = None if plan.attention_mask is None else plan.attention_mask.cpu()
    kwargs = {"use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if plan.logits == "last" and "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
        kwargs["logits_to_keep"] = 1
    weights = None if plan.logit_grad is None else plan.logit_grad.detach().cpu()
    reduce, ids = plan.reduce, tokens.cpu()
    out = None
    with torch.set_grad_enabled(weights is not None), model.trace(ids, **kwargs) as tracer:
        got = {}
        blocks_in = {}
        if weights is not None:  # a graph to differentiate even where the weights are frozen
            embed.output.requires_grad_(True)
        for env, part, layer, kind, index, sites in points:
            if kind == "proj":  # a receiver's q / k / v columns from its patched input
                env.output = torch.where(sites[1], env(sites[0]), env.output)
                continue
            raw = env.input if kind == "pre" else env.output
            x = raw[index] if isinstance(raw, tuple) else raw
            y = x
            for site in sites:
                key = (site, layer)
                if site == "resid_mid":
                    pre = blocks_in[layer]
                    for fn in fns.get(key, ()):
                        y = fn(pre + y) - pre
                    value = pre + y
                else:
                    for fn in fns.get(key, ()):
                        y = fn(y)
                    value = y
                if key in reads:
                    got[key] = value if reads[key].fn is None else reads[key].fn(value)
            if part == "block" and kind == "pre":
                blocks_in[layer] = y
            if y is not x:
                new = (*raw[:index], y, *raw[index + 1 :]) if isinstance(raw, tuple) else y
                if kind == "pre":
                    env.input = new
                else:
                    env.output = new
            if plan.stop_after is not None and plan.stop_after[1] == layer and plan.stop_after[0] in sites:
                nnsight.save(got)
                tracer.stop()
        if weights is not None:
            loss = (unembed.output[rows, end] * weights).sum()
            grads = {}
            with loss.backward():
                for key in reversed(list(got)):  # gradients arrive in reverse forward order
                    grads[key] = got[key].grad
            got = nnsight.save(grads)
        nnsight.save(got)
        if plan.logits is not None and plan.stop_after is None and weights is None:
            logits = unembed.output
            logits = logits[rows, end] if plan.logits == "end" else logits[:, -1:] if plan.logits == "last" else logits
            if plan.columns is not None:
                logits = logits[:, plan.columns.cpu()]
            if reduce is not None:
                logits = reduce(logits, ids, mask if mask is not None else torch.ones_like(ids))
            out = logits.save()
    device = model.device
    return Run(None if out is None else out.to(device), {k: v.detach().to(device) for k, v in got.items()})
