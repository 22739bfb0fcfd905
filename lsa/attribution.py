"""Attribution patching: a first-order estimate of every patching effect from one backward pass.

For a site activation ``a`` (one head's output, a neuron, a residual vector) the
effect of patching it from the other run is estimated as

    effect(a) ~ (a_donor - a_base) . dM/da  at the base run,

summed over the positions patched (Nanda 2023; Syed et al. 2023). Cost: two
forwards (the donor one without gradients) and one backward, for every
component at once, versus one forward per component for exact patching; memory:
the site activations and their gradients for the layers swept. The estimate is
exact where the metric is linear in the activation and drifts where attention
patterns or norms react strongly, so report it beside exact patching
(:func:`compare`) before trusting it. Measured on the toy zoo's bilingual model
(IOI, 64 prompts, head effects): denoising r = 0.99 (EN) / 0.99 (ZH); noising,
where a name mover's removal shrinks the final norm's input, r = 0.53 / 0.60
with the plain estimate and 0.98 / 0.95 with ``steps=2`` (integrated gradients).

>>> approx = attribution_patching(model, prompts, "head")          # doctest: +SKIP
>>> exact = lsa.patching.activation_patching(model, prompts, "head")  # doctest: +SKIP
>>> compare(exact, approx).attrs["correlation"]                        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from lsa import engine
from lsa import metrics as lsa_metrics
from lsa.engine import Edit, Plan, Read
from lsa.graph import Graph, ReceiverInputs, SenderWrites, interpolation, read_writes, split, swap_changes
from lsa.model import Model
from lsa.patching import activation_patching
from lsa.sweeps import (
    Metric,
    PatchResult,
    base_donor_tokens,
    check_direction,
    check_prompts,
    position_index,
    position_map_prompts,
    run_metric,
    specs_frame,
    sweep_meta,
    sweep_specs,
)
from lsa.tasks import PromptSet

__all__ = [
    "EDGE_METHODS",
    "RANKS",
    "EdgeScores",
    "attribution_patching",
    "attribution_vs_exact",
    "compare",
    "correlation",
    "edge_attribution",
]


def attribution_patching(
    model: Model,
    prompts: PromptSet,
    site: str = "head",
    *,
    layers=None,
    heads=None,
    neurons=None,
    positions=None,
    direction: str = "noising",
    metric: Metric | None = None,
    steps: int = 1,
) -> PatchResult:
    """Estimate :func:`lsa.patching.activation_patching` for every component from gradients.

    Same arguments and result shape as exact patching (``patched`` holds
    ``base metric + estimated effect``), so the two line up row for row.

    Steps: 1) run the donor prompts without gradients, reading the site at every
    swept layer; 2) run the base prompts with gradients and read the same sites;
    3) differentiate the summed metric with respect to those activations (prompts
    are independent rows, so each prompt gets its own gradient); 4) per
    component and prompt, sum ``(donor - base) * grad`` over its units' width and
    the positions patched.

    ``steps > 1``: integrated gradients along the input path (as in EAP-IG,
    Hanna et al. 2024): the gradient is averaged over ``steps`` runs whose input
    embeddings are ``base + k / steps * (donor - base)``, ``k = 0 .. steps - 1``
    (``k = 0`` is the plain estimate). It follows saturating nonlinearities
    (softmax, the final norm) better, at ``steps`` forward-backward passes.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_prompts(prompts, model)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    n_given = len(prompts)
    if positions == "each":  # as exact patching: one group whose lengths and named positions coincide
        prompts = position_map_prompts(prompts)
    specs, dims, axes = sweep_specs(
        model, prompts, site, layers=layers, heads=heads, neurons=neurons, positions=positions
    )
    base_tokens, donor_tokens = base_donor_tokens(model, prompts, direction)
    end = prompts.end.to(model.device)
    value_sites = sorted({(s.site, s.layer) for s in specs})
    # d M / d mid = d M / d (attention output): mid = block input + attention output.
    grad_site = {key: ("attn_out", key[1]) if key[0] == "resid_mid" else key for key in value_sites}

    with torch.no_grad():
        donor = engine.run(model, donor_tokens, Plan(reads=[Read(*key) for key in value_sites], end=end))
    wrt = sorted(set(grad_site.values()))
    if engine.can(model, "autograd"):
        base_acts, values, grads = _local_gradients(
            model, prompts, base_tokens, donor_tokens, end, value_sites, wrt, metric, steps
        )
    else:
        base_acts, values, grads = _remote_gradients(model, prompts, base_tokens, end, value_sites, wrt, metric, steps)

    base_metric = values.detach().float().cpu()
    donor_metric = run_metric(metric, donor.logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)
    changes = {key: (donor.values[key] - base_acts[key].detach(), grads[grad_site[key]]) for key in value_sites}
    return PatchResult(
        components=specs_frame(specs, dims),
        patched=base_metric[None, :] + _estimates(model, prompts, specs, changes),
        clean=clean,
        corrupt=corrupt,
        dims=dims,
        axes=axes,
        direction=direction,
        method="attribution patching" if steps == 1 else f"attribution patching (IG, {steps} steps)",
        meta={**sweep_meta(model, prompts, site, axes, n_given), "steps": steps},
    )


def _estimates(model, prompts: PromptSet, specs, changes: dict) -> torch.Tensor:
    """Step 4: per spec and prompt, ``(donor - base) . grad`` summed over its units' width and the positions
    patched: ``[len(specs), n]``. ``changes[(site, layer)] = (donor - base, grad)``, each ``[n, pos, width]``."""
    n = len(prompts)
    rows = torch.arange(n)
    contrib: dict[tuple[str, int], torch.Tensor] = {}
    for key, (delta, grad) in changes.items():
        n_units, width = engine.units(model, key[0])
        prod = (delta.float() * grad.float()).reshape(*delta.shape[:-1], n_units, width).sum(-1)  # [n, pos, units]
        contrib[key] = prod.cpu()
    est = torch.empty(len(specs), n)
    for i, s in enumerate(specs):
        prod = contrib[(s.site, s.layer)]
        prod = prod if s.unit is None else prod[:, :, s.unit : s.unit + 1]
        pos = position_index(prompts, s.pos)
        est[i] = prod.sum((1, 2)) if pos is None else prod[rows, pos].sum(-1)
    return est


def _local_gradients(model, prompts, base_tokens, donor_tokens, end, value_sites, wrt, metric, steps):
    """Base activations, base metric and d metric / d site by torch autograd (``steps`` > 1: along the input path)."""
    embed = model.module("embed")
    with torch.no_grad():
        base_emb, donor_emb = embed(base_tokens), embed(donor_tokens)
    reads = [Read(*key) for key in sorted(set(value_sites) | set(wrt))]
    grads: dict = {}
    with torch.enable_grad():
        for k in range(steps):

            def interpolate(out, alpha=k / steps):
                if steps > 1:
                    out = base_emb + alpha * (donor_emb - base_emb)
                return out if out.requires_grad else out.detach().requires_grad_()

            run = engine.run(model, base_tokens, Plan(edits=[Edit("embed", 0, interpolate)], reads=reads, end=end))
            logits, acts = run.logits, run.values
            values_k = metric(logits, prompts)
            run_metric(lambda *_, v=values_k: v, logits, prompts)  # shape check
            step_grads = torch.autograd.grad(values_k.sum(), [acts[key] for key in wrt])
            for key, g in zip(wrt, step_grads):
                grads[key] = g / steps if k == 0 else grads[key] + g / steps
            if k == 0:
                base_acts, values = {key: v.detach() for key, v in acts.items()}, values_k.detach()
    return base_acts, values, grads


def _remote_gradients(model, prompts, base_tokens, end, value_sites, wrt, metric, steps):
    """The same from two traces: the base run, then its backward from d metric / d end logits (computed here)."""
    if steps != 1:
        raise ValueError("integrated gradients (steps > 1) interpolate input embeddings locally; use steps=1 remotely")
    with torch.no_grad():
        base = engine.run(model, base_tokens, Plan(reads=[Read(*key) for key in value_sites], end=end))
    logits, base_acts = base.logits, base.values
    end_logits = logits.detach().float().requires_grad_()
    values = metric(end_logits, prompts)
    run_metric(lambda *_: values, end_logits, prompts)  # shape check
    (logit_grad,) = torch.autograd.grad(values.sum(), end_logits)
    plan = Plan(reads=[Read(*key) for key in wrt], end=end, logit_grad=logit_grad.to(logits.dtype))
    grads = engine.run(model, base_tokens, plan).values
    return base_acts, values.detach(), grads


def correlation(exact: PatchResult, approx: PatchResult, value: str = "effect") -> float:
    """Pearson correlation of two results' per-component ``value`` (rows must line up)."""
    a, b = _aligned(exact, approx, value)
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    if denom == 0:
        raise ValueError("a result has the same value for every component: correlation undefined")
    return float((a @ b) / denom)


def _aligned(exact: PatchResult, approx: PatchResult, value: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not exact.components.reset_index(drop=True).equals(approx.components.reset_index(drop=True)):
        raise ValueError("the two results cover different components; run both with the same sweep arguments")
    get = {"effect": lambda r: r.effect, "normalized": lambda r: r.normalized, "metric": lambda r: r.patched.mean(1)}
    if value not in get:
        raise ValueError(f"value must be one of {sorted(get)}, got {value!r}")
    return get[value](exact).double(), get[value](approx).double()


def compare(exact: PatchResult, approx: PatchResult, value: str = "effect") -> pd.DataFrame:
    """Exact and attribution effects side by side, one row per component.

    Columns: the component labels, ``exact``, ``attribution``, ``error``;
    ``frame.attrs["correlation"]`` holds their Pearson correlation.
    """
    a, b = _aligned(exact, approx, value)
    frame = exact.components.reset_index(drop=True).copy()
    frame["exact"], frame["attribution"] = a.numpy(), b.numpy()
    frame["error"] = frame["attribution"] - frame["exact"]
    frame.attrs["correlation"] = correlation(exact, approx, value)
    frame.attrs["value"] = value
    return frame


def attribution_vs_exact(
    model: Model, prompts: PromptSet, site: str = "head", *, max_tokens: int | None = None, progress=True, **kw
) -> pd.DataFrame:
    """Run both methods on one sweep and return :func:`compare`'s table (correlation in ``.attrs``)."""
    exact = activation_patching(model, prompts, site, max_tokens=max_tokens, progress=progress, **kw)
    approx = attribution_patching(model, prompts, site, **kw)
    return compare(exact, approx)


# ============================================================== edges
EDGE_METHODS = ("eap", "eap-ig")
RANKS = ("signed", "absolute")  # how edges are ranked into circuits (EdgeScores.values)
EDGE_TOKENS = 1024  # prompts x positions per forward and backward of edge attribution


@dataclass
class EdgeScores:
    """Edge attribution scores on a model's :class:`lsa.graph.Graph`.

    ``per_prompt`` ``[n, senders, receivers]``: each prompt's estimated change of the metric when the
    edge alone carries the donor run's value (0 off the graph's edges); :attr:`scores` is their mean.
    Noising: negative = the edge carries the clean behaviour.
    """

    graph: Graph
    per_prompt: torch.Tensor
    method: str
    direction: str
    steps: int
    meta: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor:
        """``[senders, receivers]``: the mean over prompts."""
        return self.per_prompt.mean(0)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per edge (``sender``, ``receiver``, ``input``, ``score``), largest ``|score|`` first, with its ``rank``."""
        frame = self.graph.frame(self.scores)
        frame = frame.iloc[frame["score"].abs().sort_values(ascending=False, kind="stable").index]
        return frame.reset_index(drop=True).assign(rank=lambda f: range(1, len(f) + 1))

    def values(self, rank: str = "absolute", rows=None) -> torch.Tensor:
        """``[senders, receivers]``: what ranks the edges, from the mean score over the prompts ``rows`` (default all):
        ``"absolute"``, its size, whichever way the edge acts (Hanna et al. 2024); ``"signed"``, how far the edge
        carries the behaviour (noising: minus the score; denoising: the score), so that edges working
        against it come last."""
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
        mean = self.scores if rows is None else self.per_prompt[rows].mean(0)
        if rank == "absolute":
            return mean.abs()
        return -mean if self.direction == "noising" else mean

    def circuit(self, size: int, rank: str = "absolute", rows=None) -> torch.Tensor:
        """The top ``size`` edges by :meth:`values`, pruned to the paths from the embeddings to the logits
        (:meth:`lsa.graph.Graph.prune`): ``[senders, receivers]`` bool."""
        return self.graph.prune(self.graph.top(self.values(rank, rows), size))

    def subset(self, rows) -> EdgeScores:
        """The scores of some prompts only (``rows``: indices or a boolean mask)."""
        return EdgeScores(self.graph, self.per_prompt[rows], self.method, self.direction, self.steps, self.meta)

    def save(self, path) -> Path:
        """Save to ``path`` (``torch.save``; the graph's edges alone, ``[n, edges]``)."""
        g = self.graph
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "graph": [g.n_layers, g.n_heads, g.n_kv_heads, g.parallel],
                "edges": self.per_prompt[:, g.valid].clone(),
                **{k: getattr(self, k) for k in ("method", "direction", "steps", "meta")},
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path) -> EdgeScores:
        data = torch.load(path, weights_only=True)
        graph = Graph(*data.pop("graph"))
        per_prompt = torch.zeros(len(data["edges"]), *graph.valid.shape)
        per_prompt[:, graph.valid] = data.pop("edges")
        return cls(graph, per_prompt, **data)


def edge_attribution(
    model: Model,
    prompts: PromptSet,
    *,
    method: str = "eap-ig",
    steps: int = 5,
    direction: str = "noising",
    metric: Metric | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of the residual graph (:mod:`lsa.graph`) by edge attribution patching.

    ``score(s -> r) = delta_s . mean_k dM/dx_r`` summed over positions, per prompt: how the residual
    stream changes when the sender alone takes its donor-run value in the base run (noising: its
    counterfactual write minus its clean one; a head under a sandwich norm through the norm of its
    layer: :func:`lsa.graph.swap_changes`), times the gradient of the metric by the receiver's own
    input ``x_r``. ``"eap"`` takes
    the gradient at the base run (Syed et al. 2023); ``"eap-ig"`` (Hanna et al. 2024) averages it over
    ``steps`` runs whose block-0 input is ``base + k / steps * (donor - base)``, ``k = 0 .. steps - 1``
    (``k = 0`` is EAP's point).

    Steps, per chunk of prompts: 1) read every sender's write in the base and donor runs; 2) per
    step, run the interpolated input with each receiver reading its own copy of the residual stream
    (:class:`lsa.engine.Split`) and differentiate the summed metric by those copies (prompts are
    independent rows, so each gets its own gradient); 3) per receiver, contract the writes' difference
    with the mean gradient over positions and width.

    Cost: two forwards, then ``steps`` forwards and backwards per chunk; memory: the writes,
    ``batch * pos * senders * d_model`` floats per chunk. Local models only.

    >>> found = edge_attribution(model, prompts, method="eap-ig", steps=5)   # doctest: +SKIP
    >>> found.frame.head()          # sender, receiver, input, score, rank      # doctest: +SKIP
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"method must be one of {', '.join(EDGE_METHODS)}, got {method!r}")
    if method == "eap":
        steps = 1
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    engine.require(model, "split", "edge attribution")
    check_prompts(prompts, model)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    graph = Graph.of(model)
    size = max(1, (max_tokens or EDGE_TOKENS) // prompts.clean.shape[1])
    chunks = [torch.arange(len(prompts))[i : i + size] for i in range(0, len(prompts), size)]
    out = torch.zeros(len(prompts), *graph.valid.shape)
    bar = tqdm(total=len(chunks) * steps, desc=f"edge attribution ({method})", disable=not progress, leave=False)
    for rows in chunks:
        part = prompts.subset(rows)
        out[rows] = _edge_scores(model, graph, part, direction, metric, steps, bar).cpu()
    bar.close()
    meta = {"model": model.name, "task": prompts.task, "language": prompts.language, "n_prompts": len(prompts)}
    return EdgeScores(graph, out, method, direction, steps, meta)


def _edge_scores(model, graph, prompts, direction, metric, steps, bar) -> torch.Tensor:
    """``[n, senders, receivers]`` for one chunk (see :func:`edge_attribution`)."""
    base_tokens, donor_tokens = base_donor_tokens(model, prompts, direction)
    donor = read_writes(model, graph, donor_tokens)
    base = SenderWrites(model, graph, *base_tokens.shape)  # read in the first step, whose input is the base run's
    columns, compact = lsa_metrics.answer_columns(metric, prompts)
    grads = None
    for k in range(steps):
        inputs = ReceiverInputs()
        plan = Plan(
            edits=[interpolation(donor, k / steps)],
            reads=base.reads() if k == 0 else [],
            split=split(model, inputs),
            end=prompts.end,
            columns=columns,
        )
        with torch.enable_grad():
            logits = engine.run(model, base_tokens, plan).logits
            values = metric(logits, compact)
            run_metric(lambda *_, v=values: v, logits, compact)  # shape check
            got = torch.autograd.grad(values.sum(), list(inputs.kept.values()))
        step = torch.zeros(*base_tokens.shape, len(graph.receivers), model.adapter.d_model, device=model.device)
        for (layer, kind), g in zip(inputs.kept, got):
            step[:, :, graph.span(layer, kind)] = g
        grads = step / steps if grads is None else grads + step / steps
        bar.update(1)
    delta = swap_changes(base, donor).float()
    return torch.einsum("bpsd,bprd->bsr", delta, grads.float()) * graph.valid.to(delta.device)
