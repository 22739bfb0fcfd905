"""What one forward does: the sites, and the plan of edits and reads that every executor runs.

Glossary (one name per concept; the code uses these names and no others for them):

- **site**: a named tensor of the forward at a layer, one module's input or output seen one way
  (:class:`Site`; every site: :data:`SITES`). **side**: ``"input"`` or ``"output"``, which side of its
  module holds it. **unit**: one head, key/value head or neuron, a slice of a site's last axis.
- **edit**: replace a site's value by ``fn(value)`` (:class:`Edit`); a **patch** is the edit that puts
  another run's values into some units at some positions (:class:`Patch`). **read**: keep a site's
  value, or a reduction of it (:class:`Read`).
- **plan**: one forward's edits and reads and what comes back (:class:`Plan`). **run**: one forward of
  a plan (:func:`lsa.engine.run`, or :func:`lsa.engine.apply` inside a trace of yours); its result is
  a :class:`Run`.
- **executor**: what runs a plan, the local one (torch hooks) or the traced one (one nnsight trace),
  with its **capabilities** (:class:`Capabilities`): what a method may ask of it.
- **base run** / **donor run**: the run that is patched / the run whose values are patched in.
- **cached run**: an earlier run whose residual stream, attention and keys and values a **start**
  reuses (:class:`Start`: feed a block, skip the blocks before it). A run's batch is ``replicas``
  copies of ``rows`` of the cached run, replica-major (:class:`Layout`).
- **first**: the first position a run recomputes (an int, or one per row ``[batch]``); positions
  before it come from the cached run's **cache**, its keys and values per layer. Sites then hold the
  recomputed positions alone. **positions** ``None`` means every position, everywhere in lsa.
- **given heads**: every head's output at a layer given whole (path patching's frozen heads).
- **write**: what a sublayer adds to the residual stream (``attn_out``, ``mlp_out``).

Tensors from the cached run (a start's block input and attention, given heads, a patch's donor) are
given at every position of the cached run's rows; tensors of the run itself (a patch's mask) at every
position of its batch. :class:`Layout` takes the rows, replicas and recomputed positions of both, the
one place positions are sliced.

Two sites are easy to confuse in gated MLPs (Llama, Qwen2, Gemma), where ``mlp_out(act(gate(x)) * up(x))``:
``mlp_act``, ``act(gate(x))`` ``[batch, pos, d_mlp]``, the unit of neuron statistics, LAPE and steering;
``neuron``, the MLP output projection's input ``act(gate(x)) * up(x)``, the unit of patching, ablation,
flow and circuits. In ungated MLPs (GPT-2, BLOOM, GPT-NeoX) they are the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "LOGITS",
    "MLP_SITES",
    "SITES",
    "AttnCache",
    "Capabilities",
    "Edit",
    "Layout",
    "Patch",
    "Plan",
    "Projection",
    "Read",
    "Run",
    "Site",
    "SiteView",
    "Split",
    "Start",
    "check",
    "check_defined",
    "given_head_edits",
    "locate",
    "replace_units",
    "resolve",
    "spliced",
    "units",
]

Fn = Callable[[torch.Tensor], torch.Tensor]
LOGITS = ("end", "all", "last", None)


@dataclass(frozen=True)
class Site:
    """A named tensor of the forward: a side of an adapter part (or of ``"block"``), seen as ``view``.

    ``side``: ``"input"`` (the module's first input) or ``"output"`` (its output; ``index`` picks an
    element of a tuple output). ``view``: ``"plain"`` (the tensor itself), ``"mid"`` (the block's
    input plus it: the mid residual) or ``"columns"`` (one kind's columns of a fused query / key /
    value output). ``rank`` orders sites within a block as its forward reaches them (a trace must
    visit them in that order). ``layers``: ``"each"``, ``"first"`` (layer 0 only) or ``"last"``.
    ``editable``: whether an :class:`Edit` may replace it.
    """

    name: str
    part: str
    side: str
    rank: float
    doc: str
    index: int = 0
    layers: str = "each"
    editable: bool = True
    view: str = "plain"


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("embed", "embed", "output", -1, "token embeddings [batch, pos, d_model]", layers="first"),
        Site(
            "resid_pre", "block", "input", 0, "block input, the residual stream before the layer [batch, pos, d_model]"
        ),
        Site("attn_in", "ln1", "output", 1, "attention input, the first norm's output [batch, pos, d_model]"),
        Site("q", "q_proj", "output", 1.5, "queries before rotary [batch, pos, n_heads * d_head]", view="columns"),
        Site("k", "k_proj", "output", 1.6, "keys before rotary [batch, pos, n_kv_heads * d_head]", view="columns"),
        Site("v", "v_proj", "output", 1.7, "values [batch, pos, n_kv_heads * d_head]", view="columns"),
        Site(
            "head", "o_proj", "input", 2, "heads' outputs, the output projection's input [batch, pos, n_heads * d_head]"
        ),
        Site("attn_proj", "o_proj", "output", 3, "the attention output projection's output [batch, pos, d_model]"),
        Site("attn_out", "attn_write", "output", 3, "the attention write to the residual [batch, pos, d_model]"),
        Site("resid_mid", "attn_write", "output", 3, "block input + attention write [batch, pos, d_model]", view="mid"),
        Site("attn_full", "attn", "output", 4, "the attention module's output (BLOOM's includes the residual)"),
        Site("pattern", "attn", "output", 4, "attention pattern [batch, n_heads, q, k]", index=1, editable=False),
        Site(
            "mlp_act", "mlp_act", "output", 4.8, "the MLP activation's output: act(gate) if gated [batch, pos, d_mlp]"
        ),
        Site("neuron", "mlp_out", "input", 5, "the MLP output projection's input: act(gate) * up if gated [.., d_mlp]"),
        Site("mlp_proj", "mlp_out", "output", 5.5, "the MLP output projection's output [batch, pos, d_model]"),
        Site("mlp_out", "mlp_write", "output", 6, "the MLP write to the residual [batch, pos, d_model]"),
        Site("resid_post", "block", "output", 7, "block output [batch, pos, d_model]"),
        Site("resid_final", "final_norm", "input", 8, "the final norm's input [batch, pos, d_model]", layers="last"),
    )
}
MLP_SITES = ("mlp_act", "neuron", "mlp_proj", "mlp_out")  # the sites an idle MLP (Plan.idle_mlps) does not compute


def units(model, site: str) -> tuple[int, int]:
    """``(units, width)``: how a site's last axis splits into units (heads, key/value heads, neurons; else one)."""
    a = model.adapter
    if site in ("head", "q"):
        return a.n_heads, a.d_head
    if site in ("k", "v"):
        return a.n_kv_heads, a.d_head
    if site in ("neuron", "mlp_act"):
        return a.d_mlp, 1
    return 1, a.d_model


@dataclass
class Edit:
    """Replace ``site`` at ``layer`` by ``fn(value)`` (same shape). Edits at one site run in plan order."""

    site: str
    layer: int
    fn: Fn


@dataclass
class Patch:
    """Put ``donor``'s values into ``site`` at ``layer`` where ``mask`` is set, unit by unit.

    ``donor``: ``[rows, pos, units * width]`` from a run of the cached run's rows (the donor run, an
    ablation's values, the base run itself), at every position; ``mask``: ``[batch, pos, units]``
    (bool) of this run's batch, at every position. :class:`Layout` takes both to the positions the
    run recomputes.
    """

    site: str
    layer: int
    donor: torch.Tensor
    mask: torch.Tensor


@dataclass
class Read:
    """Keep ``site`` at ``layer`` after the edits there: the tensor, or ``fn(tensor)`` computed where the model runs
    (inside the trace for a remote model, so only the reduction travels)."""

    site: str
    layer: int
    fn: Fn | None = None


@dataclass
class AttnCache:
    """What a run with the same attention input at a layer gives: the attention module's output ``full``,
    the output projection's input ``z`` and output ``proj`` (each ``[rows, pos, ...]`` of the cached run).

    With it the start layer's attention is ``full - proj + o_proj(z')``: no queries, keys or values
    are recomputed, and edits of ``z`` (or of the projection's output) still apply.
    """

    full: torch.Tensor
    z: torch.Tensor
    proj: torch.Tensor


@dataclass
class Start:
    """Feed ``hidden`` (the cached run's block input ``[rows, pos, d_model]``) to block ``layer``; pass the blocks
    before it through.

    ``first`` > 0 with ``cache`` (the cached run's keys and values, :attr:`Run.cache`, read at the layers
    whose attention this run computes): only positions ``>= first`` are recomputed, attending to the
    cached keys and values before them; ``logits="end"`` still takes the plan's ``end`` as absolute
    positions (all ``>= first``). ``first`` may be a tensor ``[batch]``, one per row of the run: each
    row then runs its position ``first[b]`` alone (rows of different lengths in one forward; ``end``,
    if given, must equal it). ``attn``: the cached run's attention at ``layer`` (:class:`AttnCache`).
    """

    layer: int
    hidden: torch.Tensor
    attn: AttnCache | None = None
    first: int | torch.Tensor = 0
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def reuses_cache(self) -> bool:
        """Whether positions before ``first`` come from the cache (an int ``> 0``, or one per row)."""
        return isinstance(self.first, torch.Tensor) or self.first > 0


@dataclass
class Projection:
    """Replace the ``mask`` ed output columns ``[out_features]`` of a query / key / value projection ``module``
    of ``layer`` by that projection applied to ``given`` (path patching's receivers).

    ``given``: ``[batch, pos, d_model]`` of the run's batch, at every position or at the recomputed ones
    (what a read of a run with the same start gives)."""

    module: nn.Module
    layer: int
    given: torch.Tensor
    mask: torch.Tensor


@dataclass
class Split:
    """Receivers that each read their own copy of the residual stream (edge attribution and edge ablation).

    ``inputs(layer, kind, x)`` returns the inputs ``[batch, pos, n, d_model]`` of layer ``layer``'s
    receivers of ``kind``, given the residual stream ``x`` ``[batch, pos, d_model]`` they read in
    this run:

    - ``"q"`` (``n = n_heads``), ``"k"`` and ``"v"`` (``n = n_kv_heads``, one per key/value head)
      from the block's input: each head's query, key and value are then made from its own input,
      through the block's first norm and that head's columns of the projection;
    - ``"mlp"`` (``n = 1``) from the MLP's input residual (the mid residual; the block's input where
      attention and MLP run in parallel): the MLP's norm then reads it;
    - ``"logits"`` (``layer = n_layers``, ``n = 1``) from the final norm's input.

    Returning ``x`` itself for every receiver leaves the forward's values unchanged, and the inputs
    are then the tensors to differentiate for each receiver's gradient. Needs the ``split`` capability,
    in a whole forward (no start, given heads, idle MLPs or projections).
    """

    inputs: Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass
class Plan:
    """One forward: edits, reads, and what comes back.

    ``logits``: ``"end"`` (``[batch, d_vocab]`` at each row's ``end`` position: the final norm and
    unembedding run on those rows alone; with ``columns``, vocabulary ids ``[k]``, only those columns:
    ``[batch, k]``), ``"all"`` (``[batch, pos, d_vocab]``), ``"last"`` (``[batch, 1, d_vocab]``) or
    ``None``. ``attention_mask`` ``[batch, pos]`` is passed to the model (without one, prompts must be
    right-padded). ``reduce(logits, tokens, attention_mask)`` replaces the logits by its result,
    computed where the model runs. ``logit_grad`` ``[batch, d_vocab]`` (with ``logits="end"``): the
    values of the reads become their gradients of ``sum(end logits * logit_grad)``.

    ``start`` (:class:`Start`), ``rows`` (the cached run's rows this run's batch replicates, default
    every row), ``stop_after`` (end the forward once that ``(site, layer)`` is reached) and
    ``keep_cache`` (also return every layer's keys and values, :attr:`Run.cache`; with ``stop_after``:
    this run's up to the stop, the start's cache after it). ``given_heads[layer]``: every head's
    output at that layer (the cached run's rows, :class:`Layout`), as an edit of ``head`` replacing it
    whole would give; with the ``skip_attention`` capability the attention module then computes no
    queries, keys, values or pattern. ``idle_mlps``: layers whose MLP writes nothing to the residual
    stream (with ``start`` they do not run). ``projections``: path patching's receivers
    (:class:`Projection`). ``split``: receivers that read their own copy of the residual stream
    (:class:`Split`). ``attention``: the attention implementation of a local run (``"eager"``,
    ``"sdpa"``, or ``None``: ``"sdpa"`` on CUDA when no ``pattern`` is read, else the model's own).
    ``steered``: the model's active steering edits (:func:`lsa.steering.steer`) run first at their
    sites, unless this is ``False``. An executor without a capability a plan element needs refuses
    it, except ``start``, which the traced executor ignores (every layer runs: the same values).
    """

    edits: list[Edit | Patch] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    start: Start | None = None
    stop_after: tuple[str, int] | None = None
    projections: list[Projection] = field(default_factory=list)
    logits: str | None = "end"
    end: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    reduce: Callable | None = None
    logit_grad: torch.Tensor | None = None
    steered: bool = True
    keep_cache: bool = False
    given_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: str | None = None
    columns: torch.Tensor | None = None
    idle_mlps: tuple[int, ...] = ()
    split: Split | None = None
    rows: torch.Tensor | None = None


@dataclass
class Run:
    """A plan's result: ``logits`` (as the plan asked, or its ``reduce``'s result) and ``values[(site, layer)]``;
    ``cache``: when the plan kept it, every layer's ``(keys, values)``, each ``[batch, n_kv_heads, pos, d_head]``."""

    logits: torch.Tensor | None
    values: dict[tuple[str, int], torch.Tensor]
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self.values[key]


@dataclass(frozen=True)
class Capabilities:
    """What an executor can do, so that a method asks for it rather than for the model's kind.

    ``start``: a run starts at a block from the cached run (:class:`Start`, :class:`AttnCache`);
    ``reuse_cache``: from the cached run's keys and values, recomputing positions ``>= first`` alone;
    ``skip_attention``: given heads spare their attention its queries, keys and values;
    ``split``: receivers read their own inputs (:class:`Split`); ``autograd``: a run's values carry
    their graph to the caller (gradients of any function of them); ``weights``: the model's weights
    are in this process (methods that compute with them); ``max_tokens``: rows x positions per forward
    it prefers (``None``: as the device allows).
    """

    start: bool
    reuse_cache: bool
    skip_attention: bool
    split: bool
    autograd: bool
    weights: bool
    max_tokens: int | None = None


class Layout:
    """Which rows and positions a run computes: the one place positions are sliced.

    The run's batch is ``replicas`` copies of ``rows`` of the cached run (replica-major; ``rows``
    ``None``: every row), and it recomputes positions ``first`` to ``width - 1`` (``first`` one per
    row ``[batch]``: each row its position ``first[b]`` alone). ``batch=None`` (a trace of yours,
    whose batch lsa does not see): tensors are given for the run's batch itself.
    """

    def __init__(self, batch: int | None, width: int, rows: torch.Tensor | None = None, first: int | torch.Tensor = 0):
        self.batch, self.width, self.rows, self.first = batch, width, rows, first
        if isinstance(first, torch.Tensor) and first.shape != (batch,):
            raise ValueError(f"a per-row first position has one position per row: ({batch},), got {tuple(first.shape)}")

    @classmethod
    def of(cls, plan: Plan, tokens: torch.Tensor, first: int | torch.Tensor | None = None) -> Layout:
        """The layout of ``plan`` run on ``tokens`` ``[batch, width]`` (``first``: the start's, unless given)."""
        if first is None:
            first = plan.start.first if plan.start is not None else 0
        return cls(tokens.shape[0], tokens.shape[1], plan.rows, first)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A cached-run tensor ``[rows, pos, ...]`` (every position) -> ``[batch, recomputed, ...]``."""
        if self.rows is not None:
            x = x[self.rows.to(x.device)]
        if self.batch is None:
            return x
        replicas, rest = divmod(self.batch, x.shape[0])
        if rest:
            raise ValueError(f"a run of {self.batch} rows cannot replicate {x.shape[0]} rows of the cached run")
        x = self._positions(x, x.shape[0])
        return x.repeat(replicas, *([1] * (x.ndim - 1))) if replicas > 1 else x

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor of this run's batch ``[batch, pos, ...]`` at every position (or at the recomputed ones already)
        -> ``[batch, recomputed, ...]``."""
        return x if self.batch is None else self._positions(x, self.batch)

    def _positions(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        first = self.first
        if isinstance(first, torch.Tensor):
            if x.shape[1] == 1:  # given at the position alone
                return x.contiguous()
            at = first[:rows].to(x.device)  # replicas share their rows' positions
            return x[torch.arange(rows, device=x.device), at][:, None]
        if x.shape[1] == self.width - first:  # given at the recomputed positions alone, or at every position
            return x.contiguous()
        return x[:, first : self.width].contiguous()


def replace_units(mask: torch.Tensor, donor: torch.Tensor, n_units: int, width: int) -> Fn:
    """An edit function putting ``donor`` ``[batch, pos, n_units * width]`` where ``mask`` ``[batch, pos, n_units]`` is set."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xv = x.reshape(*shape[:-1], n_units, width)
        dv = donor.reshape(*shape[:-1], n_units, width).to(x.dtype)
        return torch.where(mask[..., None], dv, xv).reshape(shape)

    return edit


class SiteView:
    """How one site's value is made from its module's tensor and put back: the rule both executors and
    the accessors follow (:meth:`visit`).

    ``plain``: the tensor itself; ``mid``: the block's input plus it (an edit of the mid residual is a
    change of the attention write); ``columns``: one kind's columns of a query / key / value projection's
    output, ``[..., n * d_head]``.
    """

    def __init__(self, model, site: str):
        self.site = SITES[site]
        self.columns = None
        if self.site.view == "columns":
            self.columns = model.adapter.qkv_index(site).flatten()

    def get(self, x: torch.Tensor, block_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.site.view == "mid":
            return block_input + x
        if self.columns is not None:
            return x.index_select(-1, self.columns.to(x.device))
        return x

    def put(self, x: torch.Tensor, value: torch.Tensor, block_input: torch.Tensor | None = None) -> torch.Tensor:
        """The module's tensor ``x`` holding ``value`` at this site."""
        if self.site.view == "mid":
            return value - block_input
        if self.columns is not None:
            return x.index_copy(-1, self.columns.to(x.device), value.to(x.dtype))
        return value

    def visit(self, x: torch.Tensor, fns, block_input: torch.Tensor | None = None):
        """``(x after the site's edits fns, in order, the site's value after them)``; ``x`` itself when no edit ran."""
        value = self.get(x, block_input)
        for fn in fns:
            value = fn(value)
        return (self.put(x, value, block_input) if fns else x), value


def check(model, plan: Plan, can: Capabilities) -> list[Edit | Patch]:
    """The plan's edits with the model's active steering edits first; every site, layer and capability checked.

    Steering edits before a cached start are left out: the cached block input already holds their effect
    (the cache comes from a run under the same steering).
    """
    steering = model.steering if plan.steered else []
    if plan.start is not None and can.start:
        steering = [e for e in steering if e.layer >= plan.start.layer]
    _check_outputs(plan)
    _check_start(plan, can)
    if plan.split is not None and not can.split:
        raise ValueError("receivers with their own inputs (plan.split) need the local executor: use a local model")
    if plan.split is not None and (plan.start or plan.given_heads or plan.idle_mlps or plan.projections):
        raise ValueError(
            "a split of the receivers' inputs runs a whole forward: no start, given heads, idle MLPs or projections"
        )
    edits = [*steering, *plan.edits]
    for item in [*edits, *plan.reads]:
        _check_item(model, plan, item)
    return edits


def _check_outputs(plan: Plan) -> None:
    if plan.logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {plan.logits!r}")
    if plan.logits == "end" and plan.end is None and plan.stop_after is None:
        raise ValueError("logits='end' needs the end positions (plan.end)")
    if plan.logit_grad is not None and plan.logits != "end":
        raise ValueError("logit_grad needs logits='end'")
    if plan.columns is not None and (plan.logits != "end" or plan.logit_grad is not None or plan.columns.ndim != 1):
        raise ValueError("columns (vocabulary ids [k]) go with logits='end' and no logit_grad")
    if plan.attention not in (None, "eager", "sdpa"):
        raise ValueError(f"attention must be None, 'eager' or 'sdpa', got {plan.attention!r}")
    if plan.attention == "sdpa" and any(r.site == "pattern" for r in plan.reads):
        raise ValueError("attention patterns are read from the eager implementation: use attention='eager'")


def _check_start(plan: Plan, can: Capabilities) -> None:
    start = plan.start
    if start is None or not can.start:
        return
    if start.reuses_cache():
        if start.cache is None:
            raise ValueError("a start with a first position > 0 needs the cached run's keys and values (start.cache)")
        per_row = isinstance(start.first, torch.Tensor)  # its ends are checked where it runs
        if not per_row and plan.end is not None and int(plan.end.min()) < start.first:
            raise ValueError(f"end positions must lie at or after the first recomputed position ({start.first})")


def _check_item(model, plan: Plan, item) -> None:
    site = SITES.get(item.site)
    if site is None:
        raise ValueError(f"unknown site {item.site!r}; sites: {sorted(SITES)}")
    model.adapter.check_layer(item.layer)
    wanted = {"first": 0, "last": model.adapter.n_layers - 1}.get(site.layers)
    if wanted is not None and item.layer != wanted:
        raise ValueError(f"site {item.site!r} exists at layer {wanted} only, got {item.layer}")
    if not isinstance(item, Read) and not site.editable:
        raise ValueError(f"site {item.site!r} can be read, not edited")
    check_defined(model, item.site)
    if item.site in MLP_SITES and item.layer in plan.idle_mlps:
        raise ValueError(f"{item.site} at layer {item.layer}: that layer's MLP is idle (plan.idle_mlps)")
    if plan.start is not None and item.layer < plan.start.layer:
        raise ValueError(f"{item.site} at layer {item.layer} lies before the start layer {plan.start.layer}")


def resolve(model, edits: list[Edit | Patch], layout: Layout) -> list[Edit]:
    """The edits as functions of the site's value: each :class:`Patch` with its donor and mask taken to the run's
    rows and positions."""
    out = []
    for e in edits:
        if isinstance(e, Patch):
            fn = replace_units(layout.cut(e.mask), layout.take(e.donor), *units(model, e.site))
            e = Edit(e.site, e.layer, fn)
        out.append(e)
    return out


def given_head_edits(plan: Plan, layout: Layout) -> list[Edit]:
    """The plan's given heads as edits of ``head`` replacing the heads' outputs whole (an executor that computes
    the attention anyway runs them before the plan's own edits)."""
    return [Edit("head", layer, _given(layout.take(z))) for layer, z in sorted(plan.given_heads.items())]


def _given(z: torch.Tensor) -> Fn:
    return lambda x: z.to(x.dtype)


def spliced(cache, moved, first: torch.Tensor, heads: dict, rows: torch.Tensor, replicas: int) -> list[tuple]:
    """The cached run's keys and values for a run of ``replicas`` copies of its batch, with some key/value heads'
    at each row's position ``first`` ``[batch]`` taken from ``moved``, the cache of a run of that position alone
    (its last slot).

    ``heads``: ``{layer: {"k": [key/value heads], "v": [...]}}``; ``rows`` ``[batch]`` (bool): the rows that take them.
    """
    out = list(cache)
    take = rows.nonzero().flatten()
    for layer, kinds in heads.items():
        pair = list(out[layer])
        for slot, kind in enumerate("kv"):
            if kinds.get(kind):
                store = pair[slot].repeat(replicas, 1, 1, 1)
                new = moved[layer][slot][:, :, -1]  # [batch, kv heads, d_head]: the run's own position
                for unit in kinds[kind]:
                    store[take, unit, first[take]] = new[take, unit]
                pair[slot] = store
        out[layer] = tuple(pair)
    return out


def check_defined(model, site: str) -> None:
    """Raise where ``site`` does not exist in this model's architecture."""
    if site == "resid_mid" and model.adapter.parallel_residual:
        raise ValueError(
            "resid_mid is undefined for a parallel-residual model (attention and MLP read the same "
            "residual stream); patch resid_pre, resid_post, attn_out or mlp_out instead"
        )


def locate(model, site: str) -> tuple[str, str, float]:
    """``(part, side, rank)`` where ``site`` lives in this model (a sandwich norm's write ranks after ``attn``)."""
    s = SITES[site]
    part = model.adapter.resolve_part(s.part)  # attn_write -> o_proj, or its sandwich norm
    rank = 4.5 if part == "attn_post_norm" else s.rank
    return part, s.side, rank
