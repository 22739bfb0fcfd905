"""Ablation: knock components out (zero, mean or resample) and measure what is left.

Components are plain tuples: ``("head", layer, head)``, ``("mlp", layer)``,
``("neuron", layer, index)``. A head is ablated by overwriting its slice of the
attention output projection's input, an MLP by overwriting the MLP output
projection's output, a neuron by overwriting its entry of that projection's input.

Methods (``method``), each replacing a component's activation by one taken from the prompts'
counterfactuals (the builders make them token-aligned with the prompts, the IOI paper's "ABC"
distribution):

- ``"interchange"`` (the default): the prompt's own counterfactual. The default because it is
  what patching effects are normalised by (0 = clean, -1 = counterfactual behaviour) and what
  edge attribution scores estimate, every position holds the same part of the sentence by
  construction, and no reference set is needed;
- ``"mean"``: the mean over the counterfactuals of the prompt's group (one template, the same
  length and named positions: :meth:`lsa.tasks.PromptSet.groups`), so that each position's mean
  is over one part of the sentence;
- ``"resample"``: the counterfactual of another prompt of its group, at random;
- ``"zero"``: zeros.

With a ``reference`` set, ``"mean"`` is its mean per position and ``"resample"`` a random row of
it (:func:`ablation_values`).

Circuit faithfulness (Wang et al. 2022) = the metric with everything outside the
circuit ablated, relative to the full model: ``faithfulness = F(C) / F(M)`` and
``normalized = (F(C) - F(empty)) / (F(M) - F(empty))``.

Cost: one forward of the reference set (mean / resample) plus one forward per
ablation; :func:`ablation_sweep` batches one-component-at-a-time ablations like
:func:`lsa.patching.activation_patching`.

>>> ablate(model, prompts, [("head", 1, 2), ("mlp", 0)], method="zero")     # doctest: +SKIP
>>> faithfulness(model, prompts, [("head", 1, 2), ("head", 1, 3)]).frame   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from lsa import bootstrap, engine
from lsa import metrics as lsa_metrics
from lsa.engine import Patch, Plan, Read
from lsa.graph import AblatedInputs, Graph, read_writes, split
from lsa.model import Model
from lsa.sweeps import Chunking, Metric, PatchResult, check_prompts, position_index, run_metric, sweep
from lsa.tasks import PromptSet

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Faithfulness",
    "ablate",
    "ablate_edges",
    "ablation_sweep",
    "ablation_values",
    "check_method",
    "complement",
    "donors",
    "faithfulness",
    "group_mean",
    "parse_components",
]

METHODS = ("interchange", "mean", "resample", "zero")
DEFAULT_METHOD = "interchange"  # why: module docstring
KINDS = {"head": ("head", 3), "mlp": ("mlp_out", 2), "neuron": ("neuron", 3)}


def parse_components(model: Model, components: Iterable) -> list[tuple]:
    """Validate components: ``("head", layer, head)``, ``("mlp", layer)``, ``("neuron", layer, index)``.

    Objects with a ``kind`` / ``layer`` / ``index`` (or ``head`` / ``neuron``) attribute
    are read as the matching tuple.
    """
    out = []
    for comp in components:
        if not isinstance(comp, tuple):
            kind = getattr(comp, "kind", None)
            unit = getattr(comp, "index", getattr(comp, "head", getattr(comp, "neuron", None)))
            comp = (kind, comp.layer) if unit is None else (kind, comp.layer, unit)
        if not comp or comp[0] not in KINDS or len(comp) != KINDS[comp[0]][1]:
            raise ValueError(
                f"bad component {comp!r}: use ('head', layer, head), ('mlp', layer) or ('neuron', layer, index)"
            )
        kind, layer = comp[0], comp[1]
        if kind == "head":
            model.adapter.check_head(comp[2], layer)
        elif kind == "neuron":
            model.adapter.check_neuron(comp[2], layer)
        else:
            model.adapter.check_layer(layer)
        out.append(tuple(comp))
    return list(dict.fromkeys(out))


def _reference(prompts: PromptSet, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [m, pos], lengths [m])`` of a given reference set."""
    if isinstance(reference, PromptSet):
        return reference.clean, reference.lengths
    tokens = torch.as_tensor(reference)
    if tokens.ndim != 2:
        raise ValueError(f"reference tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    return tokens, torch.full((tokens.shape[0],), tokens.shape[1])


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"ablation method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def donors(prompts: PromptSet, method: str, seed: int = 0) -> torch.Tensor:
    """``[n]``: whose counterfactual each prompt reads: its own (``"interchange"``), or (``"resample"``) another
    prompt's of its group (:meth:`lsa.tasks.PromptSet.groups`), drawn at random; a group of one reads its own."""
    check_method(method)
    n = len(prompts)
    if method != "resample":
        return torch.arange(n)
    groups, g = prompts.groups(), torch.Generator().manual_seed(seed)
    out = torch.arange(n)
    for group in groups.unique():
        rows = (groups == group).nonzero().flatten()
        if len(rows) > 1:  # a random shift of a random order: nobody reads their own
            order = rows[torch.randperm(len(rows), generator=g)]
            shift = 1 + int(torch.randint(len(rows) - 1, (1,), generator=g))
            out[order] = order.roll(shift)
    return out


def group_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean of its group's rows: ``values`` ``[n, ...]``, ``groups`` ``[n]``."""
    sums = torch.zeros(int(groups.max()) + 1, *values.shape[1:], dtype=torch.float64, device=values.device)
    sums.index_add_(0, groups.to(values.device), values.double())
    counts = torch.bincount(groups).to(values.device).double().view(-1, *[1] * (values.ndim - 1))
    return (sums / counts)[groups.to(values.device)].to(values.dtype)


@torch.no_grad()
def ablation_values(
    model: Model,
    prompts: PromptSet,
    sites: Iterable[tuple[str, int]],
    method: str = "interchange",
    *,
    reference=None,
    per_position: bool = True,
    index: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[tuple[str, int], torch.Tensor]:
    """Replacement activations ``[n, pos, width]`` per ``(site, layer)``, aligned with ``prompts.clean``.

    Without ``reference``, from the prompts' own counterfactuals (module docstring); with one
    (a :class:`PromptSet`, whose clean prompts are used, or tokens ``[m, pos]``), ``"mean"`` is the
    mean over it per position (``per_position=False``: over all its real tokens) and ``"resample"``
    a random row of it per prompt (or ``index`` ``[n]``).
    """
    check_method(method)
    sites = sorted(set(sites))
    n, width = prompts.clean.shape
    dev = model.device
    if method == "zero":
        widths = {s: engine.units(model, s[0]) for s in sites}
        return {s: torch.zeros(n, width, u * w, device=dev) for s, (u, w) in widths.items()}
    if reference is not None:
        if method == "interchange":
            raise ValueError("interchange ablation reads each prompt's own counterfactual: pass no reference")
        return _from_reference(model, prompts, sites, method, reference, per_position, index, seed)
    acts = engine.run(model, prompts.corrupt.to(dev), Plan(reads=[Read(*s) for s in sites], logits=None)).values
    if method == "mean":
        return {s: group_mean(acts[s], prompts.groups()) for s in sites}
    rows = donors(prompts, method, seed) if index is None else _checked_index(index, n, n)
    return {s: acts[s][rows.to(dev)] for s in sites}


def _checked_index(index, n: int, m: int) -> torch.Tensor:
    idx = torch.as_tensor(index)
    if idx.shape != (n,) or idx.min() < 0 or idx.max() >= m:
        raise ValueError(f"index must be [n={n}] reference rows in 0..{m - 1}")
    return idx


def _from_reference(model, prompts, sites, method, reference, per_position, index, seed):
    """:func:`ablation_values` from a given reference set (see there)."""
    n, width = prompts.clean.shape
    dev = model.device
    tokens, lengths = _reference(prompts, reference)
    tokens, lengths = tokens.to(dev), lengths.to(dev)
    acts = engine.run(model, tokens, Plan(reads=[Read(*s) for s in sites], logits=None)).values
    m, ref_width = tokens.shape
    real = torch.arange(ref_width, device=dev)[None, :] < lengths[:, None]  # [m, pos]
    keep = min(width, ref_width)
    out = {}
    for s in sites:
        a = acts[s].float()
        overall = (a * real[..., None]).sum((0, 1)) / real.sum()  # [width]
        if method == "mean":
            if per_position:
                count = real.sum(0)  # [pos]
                per_pos = (a * real[..., None]).sum(0) / count.clamp(min=1)[:, None]
                per_pos = torch.where((count > 0)[:, None], per_pos, overall)
                value = overall.expand(width, -1).clone()
                value[:keep] = per_pos[:keep]
            else:
                value = overall.expand(width, -1)
            out[s] = value.expand(n, -1, -1).to(acts[s].dtype)
        else:
            if index is None:
                idx = torch.randint(m, (n,), generator=torch.Generator().manual_seed(seed))
            else:
                idx = _checked_index(index, n, m)
            value = overall.expand(n, width, -1).clone()
            value[:, :keep] = a[idx.to(dev), :keep]
            out[s] = value.to(acts[s].dtype)
    return out


def _edits(
    model: Model, prompts: PromptSet, targets: dict[tuple[str, int], list[int] | None], values, where=None
) -> list[Patch]:
    """Patches putting ``values`` into the listed units (None = the whole site) of each site.

    ``where``: one position per prompt ``[n]`` (default: every position).
    """
    n, width = prompts.clean.shape
    rows = torch.ones(n, width, dtype=torch.bool, device=model.device)
    if where is not None:
        rows = torch.arange(width, device=model.device)[None, :] == where.to(model.device)[:, None]
    edits = []
    for (site, layer), units_sel in targets.items():
        mask = torch.zeros(n, width, engine.units(model, site)[0], dtype=torch.bool, device=model.device)
        if units_sel is None:
            mask[rows] = True
        else:
            mask[..., units_sel] = rows[..., None]
        edits.append(Patch(site, layer, values[(site, layer)], mask))
    return edits


def _targets(components: list[tuple]) -> dict[tuple[str, int], list[int] | None]:
    targets: dict[tuple[str, int], list[int] | None] = {}
    for comp in components:
        site = KINDS[comp[0]][0]
        if comp[0] == "mlp":
            targets[(site, comp[1])] = None
        else:
            targets.setdefault((site, comp[1]), []).append(comp[2])
    return targets


@torch.no_grad()
def ablate(
    model: Model,
    prompts: PromptSet,
    components: Iterable,
    *,
    method: str = DEFAULT_METHOD,
    reference=None,
    metric: Metric | None = None,
    per_position: bool = True,
    index: torch.Tensor | None = None,
    seed: int = 0,
    positions: str | int | None = None,
) -> torch.Tensor:
    """The metric ``[n]`` on the clean prompts with ``components`` ablated together.

    ``positions``: ablate at one position only, a name of ``prompts.positions``, ``"end"``
    or an absolute position (default: every position).
    """
    check_prompts(prompts, model)
    metric = metric or lsa_metrics.logit_diff
    components = parse_components(model, components)
    targets = _targets(components)
    values = ablation_values(
        model, prompts, targets, method, reference=reference, per_position=per_position, index=index, seed=seed
    )
    edits = _edits(model, prompts, targets, values, position_index(prompts, positions))
    logits = engine.run(model, prompts.clean, Plan(edits=edits, end=prompts.end)).logits
    return run_metric(metric, logits, prompts).cpu()


@dataclass
class Faithfulness:
    """Metric per prompt ``[n]`` of the circuit alone (``circuit``), the full model and everything ablated.

    ``method``: the ablation; ``scope``: what it was applied to (e.g. "every edge outside the circuit").
    """

    circuit: torch.Tensor
    full: torch.Tensor
    empty: torch.Tensor
    method: str
    n_components: int
    scope: str = "every head outside the circuit"

    @property
    def faithfulness(self) -> float:
        """``F(circuit) / F(full model)`` on mean metrics (1 = the circuit does it all)."""
        return float(self.circuit.mean() / self.full.mean())

    @property
    def normalized(self) -> float:
        """``(F(circuit) - F(empty)) / (F(full) - F(empty))`` on mean metrics."""
        return float((self.circuit.mean() - self.empty.mean()) / (self.full.mean() - self.empty.mean()))

    @property
    def ci(self) -> tuple[float, float]:
        """95% bootstrap interval of :attr:`normalized` over the prompts (:mod:`lsa.bootstrap`)."""
        idx = bootstrap.resamples(len(self.circuit))
        return bootstrap.interval(bootstrap.normalized_means(self.circuit, self.full, self.empty, idx))

    @property
    def ablation(self) -> str:
        """The ablation in words, as figures and tables name it."""
        return f"{self.method} ablation of {self.scope}"

    @property
    def frame(self) -> pd.DataFrame:
        """One summary row, with the interval (``ci_low``, ``ci_high``) and the ablation named."""
        lo, hi = self.ci
        row = {
            "method": self.method,
            "ablation": self.ablation,
            "components": self.n_components,
            "prompts": len(self.circuit),
            "full": float(self.full.mean()),
            "circuit": float(self.circuit.mean()),
            "empty": float(self.empty.mean()),
            "faithfulness": self.faithfulness,
            "normalized": self.normalized,
            "ci_low": lo,
            "ci_high": hi,
        }
        return pd.DataFrame([row])


def complement(model: Model, components: Iterable, kinds: Iterable[str] | None = None) -> list[tuple]:
    """Every component of ``kinds`` outside the set (neurons: the other neurons of a partly kept MLP).

    ``kinds`` defaults to heads, plus MLPs when the set names an MLP or neuron.
    """
    comps = parse_components(model, components)
    kinds = set(kinds) if kinds is not None else {"head"} | ({"mlp"} if any(c[0] != "head" for c in comps) else set())
    if not kinds <= {"head", "mlp"}:
        raise ValueError(f"kinds must be from 'head', 'mlp'; got {sorted(kinds)}")
    keep = set(comps)
    a = model.adapter
    out = []
    if "head" in kinds:
        out += [("head", la, h) for la in range(a.n_layers) for h in range(a.n_heads) if ("head", la, h) not in keep]
    if "mlp" in kinds:
        for layer in range(a.n_layers):
            if ("mlp", layer) in keep:
                continue
            kept = {c[2] for c in keep if c[0] == "neuron" and c[1] == layer}
            if kept:
                out += [("neuron", layer, i) for i in range(a.d_mlp) if i not in kept]
            else:
                out.append(("mlp", layer))
    return out


@torch.no_grad()
def faithfulness(
    model: Model,
    prompts: PromptSet,
    components: Iterable,
    *,
    method: str = DEFAULT_METHOD,
    reference=None,
    metric: Metric | None = None,
    kinds: Iterable[str] | None = None,
    per_position: bool = True,
    seed: int = 0,
) -> Faithfulness:
    """How much of the behaviour a set of components keeps with everything else ablated.

    ``kinds``: which component kinds outside the set are ablated (default: heads,
    plus MLPs when the set names an MLP or neuron; MLPs are otherwise left intact,
    as in the IOI paper).
    """
    check_prompts(prompts, model)
    metric = metric or lsa_metrics.logit_diff
    comps = parse_components(model, components)
    kinds = set(kinds) if kinds is not None else {"head"} | ({"mlp"} if any(c[0] != "head" for c in comps) else set())
    kw = dict(method=method, reference=reference, metric=metric, per_position=per_position, seed=seed)
    logits = engine.run(model, prompts.clean, Plan(end=prompts.end)).logits
    full = run_metric(metric, logits, prompts).cpu()
    outside = complement(model, comps, kinds)
    circuit = ablate(model, prompts, outside, **kw) if outside else full.clone()
    empty = ablate(model, prompts, complement(model, [], kinds), **kw)
    scope = "every " + " and ".join({"head": "head", "mlp": "MLP"}[k] for k in sorted(kinds)) + " outside the circuit"
    return Faithfulness(circuit, full, empty, method, len(comps), scope)


@torch.no_grad()
def ablation_sweep(
    model: Model,
    prompts: PromptSet,
    site: str = "head",
    *,
    method: str = DEFAULT_METHOD,
    reference=None,
    layers=None,
    heads=None,
    neurons=None,
    metric: Metric | None = None,
    seed: int = 0,
    positions=None,
    **chunking,
) -> PatchResult:
    """Ablate one component at a time (``site`` ``"head"``, ``"mlp_out"`` or ``"neuron"``), batched.

    The template of :func:`lsa.patching.activation_patching` (:func:`lsa.sweeps.sweep`) with the
    ablation's values (:func:`ablation_values`; with a ``reference`` set, ``"mean"`` is its mean per
    position) in place of the counterfactual run's. ``positions`` and ``chunking`` (``batch_size``,
    ``max_tokens``, ``progress``) as there: an ablation at a position ``p`` recomputes positions
    ``>= p`` alone (exact: nothing before ``p`` changes). Returns a :class:`lsa.sweeps.PatchResult`
    on the clean prompts (``corrupt`` holds the counterfactual run's metric, so ``normalized`` reads
    as in patching).
    """
    if site not in ("head", "mlp_out", "neuron"):
        raise ValueError(f"ablation_sweep ablates 'head', 'mlp_out' or 'neuron', got {site!r}")

    def ablated(swept: PromptSet, sites: set, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
        values = ablation_values(model, swept, sites, method, reference=reference, seed=seed)
        return values, engine.run(model, tokens, Plan(end=swept.end)).logits

    select = dict(layers=layers, heads=heads, neurons=neurons, positions=positions)
    return sweep(
        model,
        prompts,
        site,
        select,
        donor=ablated,
        direction="noising",
        metric=metric,
        method=f"{method} ablation",
        chunking=Chunking(**chunking),
    )


# ============================================================== edges
EDGE_BUDGET = 2**30  # bytes of sender writes (reference and difference) per forward of edge ablation


@torch.no_grad()
def ablate_edges(
    model: Model,
    prompts: PromptSet,
    kept: torch.Tensor,
    *,
    method: str = DEFAULT_METHOD,
    metric: Metric | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The metric ``[n]`` with every edge of the residual graph outside ``kept`` ablated.

    ``kept``: ``[senders, receivers]`` bool over :class:`lsa.graph.Graph` (an edge circuit), or a
    stack ``[k, senders, receivers]`` of circuits (then ``[k, n]``, the prompts' reference writes
    read once for all). An ablated edge ``s -> r`` gives the receiver ``r`` the sender's write under
    the ablation (``method``, the module docstring: its write in the prompt's counterfactual run,
    ...) in place of its write in this run; every other edge carries this run's write, which moves
    with what the sender's own inputs read (:class:`lsa.graph.AblatedInputs`). Keeping every edge
    gives the model; keeping none under interchange ablation gives the counterfactual run.

    Cost: per chunk of prompts one forward for the reference writes (mean: one pass over all
    prompts first), then one forward per circuit; memory: two ``[batch, pos, senders, d_model]``
    buffers per chunk (:data:`EDGE_BUDGET`). Local models only.
    """
    check_prompts(prompts, model)
    check_method(method)
    engine.require(model, "split", "edge ablation")
    metric = metric or lsa_metrics.logit_diff
    graph = Graph.of(model)
    stack = kept.bool().cpu()
    single = stack.ndim == 2
    stack = stack[None] if single else stack
    if stack.shape[1:] != graph.valid.shape:
        raise ValueError(
            f"kept must be [senders, receivers] = {tuple(graph.valid.shape)} for this model, got {tuple(kept.shape)}"
        )
    ablated = graph.valid & ~stack
    budget = EDGE_BUDGET // (8 * len(graph.senders) * model.adapter.d_model)
    size = max(1, (max_tokens or budget) // prompts.clean.shape[1])
    chunks = [torch.arange(len(prompts))[i : i + size] for i in range(0, len(prompts), size)]
    reference = _edge_reference(model, graph, prompts, method, seed, chunks)
    out = torch.empty(len(stack), len(prompts))
    bar = tqdm(total=len(chunks) * len(stack), desc=f"{method}-ablating edges", disable=not progress, leave=False)
    for rows in chunks:
        part = prompts.subset(rows)
        ref = reference(rows, part)
        columns, compact = lsa_metrics.answer_columns(metric, part)
        for i, mask in enumerate(ablated):
            inputs = AblatedInputs(model, graph, ref, mask)
            plan = Plan(reads=inputs.reads(), split=split(model, inputs), end=part.end, columns=columns)
            out[i, rows] = run_metric(metric, engine.run(model, part.clean, plan).logits, compact).cpu()
            bar.update(1)
    bar.close()
    return out[0] if single else out


def _edge_reference(model, graph, prompts: PromptSet, method: str, seed: int, chunks):
    """``reference(rows, part)``: the senders' writes under the ablation ``[b, pos, senders, d_model]`` for a chunk."""
    if method == "zero":
        return lambda rows, part: torch.zeros(
            *part.clean.shape, len(graph.senders), model.adapter.d_model, device=model.device
        )
    if method == "mean":
        groups, width = prompts.groups(), prompts.clean.shape[1]
        sums = torch.zeros(int(groups.max()) + 1, width, len(graph.senders), model.adapter.d_model, dtype=torch.float64)
        for rows in chunks:
            part = prompts.subset(rows)
            writes = read_writes(model, graph, part.corrupt.to(model.device)).values.double().cpu()
            sums[:, : writes.shape[1]].index_add_(0, groups[rows], writes)
        means = (sums / torch.bincount(groups).double().view(-1, 1, 1, 1)).float()
        return lambda rows, part: means[groups[rows], : part.clean.shape[1]].to(model.device)
    rows_read = donors(prompts, method, seed)
    return lambda rows, part: read_writes(model, graph, prompts.subset(rows_read[rows]).corrupt.to(model.device)).values
