"""What one forward does: the sites, and the plan of edits and reads that both executors run.

A :class:`Plan` lists :class:`Edit` s (replace a site's tensor) and :class:`Read` s
(keep it, or a reduction of it) at named sites of named layers, plus how the
forward starts (:class:`Start`: fed at a block from a cache, the blocks before
it skipped), where it may stop, path patching's :class:`Projection` s, and which
logits come back. :func:`lsa.engine.run` gives it to the local executor (torch
hooks) or the traced one (one nnsight trace) and returns a :class:`Run`.

Sites (:data:`SITES`) are named once here, with the module and the side of it
(input or output) that holds them. Two of them are easy to confuse in gated
MLPs (Llama, Qwen2, Gemma), where ``mlp_out(act(gate(x)) * up(x))``:

- ``mlp_act``: the activation function's output, ``act(gate(x))`` ``[batch, pos, d_mlp]``:
  the unit that neuron statistics, LAPE and steering speak of;
- ``neuron``: the MLP output projection's input, ``act(gate(x)) * up(x)``: the
  unit that patching, ablation, flow and circuits speak of.

In ungated MLPs (GPT-2, BLOOM, GPT-NeoX) the two are the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Fn = Callable[[torch.Tensor], torch.Tensor]
LOGITS = ("end", "all", "last", None)


@dataclass(frozen=True)
class Site:
    """A named tensor of the forward: ``part`` (an adapter part, or ``"block"``) and its side.

    ``kind``: ``"pre"`` = the module's (first) input, ``"out"`` = its output
    (``index`` picks an element of a tuple output). ``rank`` orders sites within
    a block as its forward reaches them (the traced executor must visit them in
    that order). ``layers``: ``"each"`` (every layer), ``"first"`` (layer 0 only)
    or ``"last"`` (the last layer only). ``editable``: whether an :class:`Edit`
    may replace it.
    """

    name: str
    part: str
    kind: str
    rank: float
    doc: str
    index: int = 0
    layers: str = "each"
    editable: bool = True


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("embed", "embed", "out", -1, "token embeddings [batch, pos, d_model]", layers="first"),
        Site("resid_pre", "block", "pre", 0, "block input, the residual stream before the layer [batch, pos, d_model]"),
        Site("attn_in", "ln1", "out", 1, "attention input, the first norm's output [batch, pos, d_model]"),
        Site(
            "head", "o_proj", "pre", 2, "heads' outputs, the output projection's input [batch, pos, n_heads * d_head]"
        ),
        Site("attn_proj", "o_proj", "out", 3, "the attention output projection's output [batch, pos, d_model]"),
        Site("attn_out", "attn_write", "out", 3, "the attention write to the residual [batch, pos, d_model]"),
        Site("resid_mid", "attn_write", "out", 3, "block input + attention write [batch, pos, d_model]"),
        Site("attn_full", "attn", "out", 4, "the attention module's output (BLOOM's includes the residual)"),
        Site("pattern", "attn", "out", 4, "attention pattern [batch, n_heads, q, k]", index=1, editable=False),
        Site("mlp_act", "mlp_act", "out", 4.8, "the MLP activation's output: act(gate) if gated [batch, pos, d_mlp]"),
        Site("neuron", "mlp_out", "pre", 5, "the MLP output projection's input: act(gate) * up if gated [.., d_mlp]"),
        Site("mlp_proj", "mlp_out", "out", 5.5, "the MLP output projection's output [batch, pos, d_model]"),
        Site("mlp_out", "mlp_write", "out", 6, "the MLP write to the residual [batch, pos, d_model]"),
        Site("resid_post", "block", "out", 7, "block output [batch, pos, d_model]"),
        Site("resid_final", "final_norm", "pre", 8, "the final norm's input [batch, pos, d_model]", layers="last"),
    )
}


@dataclass
class Edit:
    """Replace ``site`` at ``layer`` by ``fn(value)`` (same shape). At ``resid_mid`` ``fn`` sees and returns the mid
    residual; it is applied as a change of the attention write. Edits at one site run in plan order."""

    site: str
    layer: int
    fn: Fn


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
    the output projection's input ``z`` and output ``proj`` (each ``[batch, pos, ...]``).

    With it the start layer's attention is ``full - proj + o_proj(z')``: no queries, keys or values
    are recomputed, and edits of ``z`` (or of the projection's output) still apply.
    """

    full: torch.Tensor
    z: torch.Tensor
    proj: torch.Tensor


@dataclass
class Start:
    """Feed ``hidden`` ``[batch, pos, d_model]`` to block ``layer`` and pass the blocks before it through.

    ``prefix`` > 0 with ``kv`` (the keys and values of a run whose positions ``< prefix`` are the
    same as this one's at every layer: :attr:`Run.kv` of the unpatched run, or some of its rows;
    batch ``n`` with this run's batch ``m * n`` made of ``m`` replicas, read at ``layer``; the layers
    before it are never read, so any batch will do there): only positions ``>= prefix`` are recomputed,
    attending to the cached keys and values before them. Every site then holds those positions
    alone (edits see and return ``[batch, pos - prefix, ...]``, reads return them), and
    ``logits="end"`` still takes the plan's ``end`` as absolute positions (all ``>= prefix``).
    ``hidden`` and ``attn`` may then hold the positions ``>= prefix`` alone; ``rows``: the rows of
    ``kv`` whose replicas this run's batch holds (default: every row). Only the layers whose
    attention the run computes get their keys and values copied.

    ``prefix`` may also be a tensor ``[batch]``, one per row of the run: each row then runs its
    position ``prefix[b]`` alone (rows of different lengths in one forward). Sites hold
    ``[batch, 1, ...]``; ``hidden``, ``attn`` and given heads may be given at that position
    alone or at every position; ``end``, if given, must equal ``prefix``. Without ``rows``, a
    layer of ``kv`` may hold the run's batch itself or rows the batch replicates.
    """

    layer: int
    hidden: torch.Tensor
    attn: AttnCache | None = None
    prefix: int | torch.Tensor = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    rows: torch.Tensor | None = None


@dataclass
class Projection:
    """Replace the ``mask`` ed output columns ``[out_features]`` of a query / key / value projection ``module``
    of ``layer`` by that projection applied to ``given`` ``[batch, pos, d_model]`` (path patching's receivers)."""

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
    are then the tensors to differentiate for each receiver's gradient. Local executor only, in a
    whole forward (no start, given heads, idle MLPs or projections).
    """

    inputs: Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass
class Plan:
    """One forward: edits, reads, and what comes back.

    ``logits``: ``"end"`` (``[batch, d_vocab]`` at each row's ``end`` position: the
    final norm and unembedding run on those rows alone; with ``columns``, vocabulary ids
    ``[k]``, only those columns are computed: ``[batch, k]``, equal to the same columns of the
    full logits), ``"all"`` (``[batch, pos, d_vocab]``),
    ``"last"`` (``[batch, 1, d_vocab]``, the last position) or ``None``. ``attention_mask``
    ``[batch, pos]`` is passed to the model (without one, prompts must be right-padded:
    no real position then attends to padding). ``reduce(logits, tokens, attention_mask)``
    replaces the logits by its result, computed where the model runs. ``logit_grad``
    ``[batch, d_vocab]`` (with ``logits="end"``): the values of the reads become their
    gradients of ``sum(end logits * logit_grad)``. ``kv``: also keep every layer's keys and
    values (:attr:`Run.kv`, local executor only) for a later :class:`Start` with a prefix
    (with ``stop_after``: this run's up to the stop, the start's prefix after it).
    ``given_heads[layer]`` ``[batch, pos, n_heads * d_head]``: every head's output at that
    layer, as an edit of ``head`` replacing it whole would give (with a start's prefix, positions
    from the prefix on may be given alone: ``[batch, pos - prefix, ...]``); locally the attention module
    then computes no queries, keys, values or pattern, only ``o_proj`` of them (path
    patching's frozen heads). ``attention``: the attention implementation of a local run:
    ``"eager"``, ``"sdpa"``, or ``None`` (``"sdpa"`` on a CUDA device when the plan reads no
    ``pattern``, where it is faster; else the model's own, eager as loaded: on the CPU at
    these lengths sdpa saved 1.6% of a SmolLM2 forward and moved its hidden states by 3e-5). ``steered``: the model's active
    steering edits (:func:`lsa.steering.steer`) run first at their sites; they are part
    of every plan unless this is ``False``. ``idle_mlps``: layers whose MLP writes nothing to the
    residual stream (locally it does not run; for runs whose residual stream after those layers
    is of no use, such as path patching's run for its receivers' keys and values, which come from
    given inputs). The traced executor runs every layer: it ignores ``start`` (a cached start
    gives the same values) and zeroes the idle MLPs' writes. ``split``: receivers that read their
    own copy of the residual stream (:class:`Split`; local executor only).
    """

    edits: list[Edit] = field(default_factory=list)
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
    kv: bool = False
    given_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: str | None = None
    columns: torch.Tensor | None = None
    idle_mlps: tuple[int, ...] = ()
    split: Split | None = None


# the sites an idle MLP (Plan.idle_mlps) does not compute
MLP_SITES = ("mlp_act", "neuron", "mlp_proj", "mlp_out")


@dataclass
class Run:
    """A plan's result: ``logits`` (as the plan asked, or its ``reduce``'s result) and ``values[(site, layer)]``;
    ``kv``: when the plan asked for them, every layer's ``(keys, values)``, each ``[batch, n_kv_heads, pos, d_head]``."""

    logits: torch.Tensor | None
    values: dict[tuple[str, int], torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self.values[key]


def has_prefix(start: Start) -> bool:
    """Whether a start reuses a prefix (an int ``> 0``, or one per row)."""
    return isinstance(start.prefix, torch.Tensor) or start.prefix > 0


def check(model, plan: Plan) -> list[Edit]:
    """The plan's edits with the model's active steering edits first; every site and layer checked.

    Steering edits before a cached start are left out: the cached block input already holds their effect
    (the cache comes from a run under the same steering).
    """
    steering = model.steering if plan.steered else []
    if plan.start is not None:
        steering = [e for e in steering if e.layer >= plan.start.layer]
    edits = [*steering, *plan.edits]
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
    if plan.start is not None and has_prefix(plan.start):
        if plan.start.kv is None:
            raise ValueError("a start with a prefix needs the keys and values of the unpatched run (start.kv)")
        per_row = isinstance(plan.start.prefix, torch.Tensor)  # its ends are checked where it runs
        if not per_row and plan.end is not None and int(plan.end.min()) < plan.start.prefix:
            raise ValueError(f"end positions must lie at or after the reused prefix ({plan.start.prefix})")
    if plan.split is not None and (plan.start or plan.given_heads or plan.idle_mlps or plan.projections):
        raise ValueError(
            "a split of the receivers' inputs runs a whole forward: no start, given heads, idle MLPs or projections"
        )
    n_layers = model.adapter.n_layers
    for item in [*edits, *plan.reads]:
        site = SITES.get(item.site)
        if site is None:
            raise ValueError(f"unknown site {item.site!r}; sites: {sorted(SITES)}")
        model.adapter.check_layer(item.layer)
        wanted = {"first": 0, "last": n_layers - 1}.get(site.layers)
        if wanted is not None and item.layer != wanted:
            raise ValueError(f"site {item.site!r} exists at layer {wanted} only, got {item.layer}")
        if isinstance(item, Edit) and not site.editable:
            raise ValueError(f"site {item.site!r} can be read, not edited")
        check_defined(model, item.site)
        if item.site in MLP_SITES and item.layer in plan.idle_mlps:
            raise ValueError(f"{item.site} at layer {item.layer}: that layer's MLP is idle (plan.idle_mlps)")
        if plan.start is not None and item.layer < plan.start.layer:
            raise ValueError(f"{item.site} at layer {item.layer} lies before the start layer {plan.start.layer}")
    return edits


def check_defined(model, site: str) -> None:
    """Raise where ``site`` does not exist in this model's architecture."""
    if site == "resid_mid" and model.adapter.parallel_residual:
        raise ValueError(
            "resid_mid is undefined for a parallel-residual model (attention and MLP read the same "
            "residual stream); patch resid_pre, resid_post, attn_out or mlp_out instead"
        )


def point(model, site: str) -> tuple[str, str, float]:
    """``(part, kind, rank)`` where ``site`` lives in this model (a sandwich norm's write ranks after ``attn``)."""
    s = SITES[site]
    part = model.adapter.resolve_part(s.part)  # attn_write -> o_proj, or its sandwich norm
    rank = 4.5 if part == "attn_post_norm" else s.rank
    return part, s.kind, rank
