"""Activation patching and path patching: which components carry a task's behaviour.

Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024) reruns the
model with one component's activation overwritten by its value from another
run and reads the change in a metric. Path patching (Wang et al. 2022) restricts
that change to one path: a sender head's effect on receivers (the logits, or
the query / key / value input of later heads) with every other head frozen.

Sites (``site=``, :data:`lsa.sweeps.SITES`), each per layer:

- ``resid_pre`` (block input), ``resid_mid`` (block input + attention write;
  undefined for parallel-residual models), ``resid_post`` (block output):
  ``[batch, pos, d_model]``;
- ``attn_out`` / ``mlp_out``: the attention / MLP *write*, what the sublayer
  adds to the residual stream (the output projection's output; with sandwich
  norms, as in Gemma 3, the output of the norm after it): ``[batch, pos, d_model]``;
- ``head``: one head's output, its slice of the attention output projection's
  *input* viewed ``[batch, pos, n_heads, d_head]``;
- ``neuron``: one MLP neuron, the MLP output projection's input ``[batch, pos, d_mlp]``.

Directions: ``"noising"`` runs the clean prompts and patches in activations of
the counterfactual run (the IOI paper's convention); ``"denoising"`` runs the
counterfactual prompts and patches in the clean run's activations. Either way
``normalized = (patched - clean) / (clean - corrupt)`` on the mean metric: 0 =
clean behaviour, -1 = counterfactual behaviour.

Cost: activation patching is :func:`lsa.sweeps.sweep` (its docstring gives the cost); path
patching runs the two unpatched runs once (or shares them, :func:`path_runs`), then per chunk of
senders one run of the senders (every other head frozen: their attention computes nothing) and,
for head receivers, one run of the receivers per input; each starts at the earliest sender's
layer and recomputes only the positions from the patched one on. Results equal a hook-by-hook
reference (``tests/test_patching.py``).

>>> res = activation_patching(model, prompts, site="head")     # doctest: +SKIP
>>> res.array.shape                                              # [layer, head]  # doctest: +SKIP
>>> res.frame.sort_values("normalized").head()                  # doctest: +SKIP
>>> path = path_patching(model, prompts, receivers="logits")    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from lsa import engine
from lsa import metrics as lsa_metrics
from lsa.engine import Layout, Patch, Plan, Projection, Read, Start
from lsa.sweeps import (
    DIRECTIONS,
    SITES,
    Chunking,
    Metric,
    PatchResult,
    base_donor_tokens,
    baseline,
    cached_start,
    check_direction,
    check_prompts,
    chunks,
    halving,
    position_index,
    position_labels,
    position_map_prompts,
    row_groups,
    run_metric,
    sweep,
    sweep_specs,
)
from lsa.tasks import PromptSet

# Re-exported from lsa.sweeps (the machinery every sweep shares), where they are defined: the names a
# patching user reaches for (the sites, directions, result, positions) and the sweep's pieces.
__all__ = [
    "DIRECTIONS",
    "SITES",
    "PatchResult",
    "PathPatching",
    "PathRuns",
    "activation_patching",
    "check_prompts",
    "path_patching",
    "path_runs",
    "position_index",
    "position_labels",
    "position_map_prompts",
    "run_metric",
    "baseline",
    "sweep_specs",
]


def activation_patching(
    model,
    prompts: PromptSet,
    site: str = "head",
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    neurons: int | Iterable[int] | None = None,
    positions=None,
    direction: str = "noising",
    metric: Metric | None = None,
    **chunking,
) -> PatchResult:
    """Patch one component at a time from the other run and measure the metric (:func:`lsa.sweeps.sweep`).

    Args:
        site: one of :data:`lsa.sweeps.SITES`.
        layers, heads, neurons: which components (default: every layer, every head /
            neuron); ``neurons`` only with ``site="neuron"``.
        positions: ``None`` (every position at once), ``"each"`` (every position
            separately, for a layer x position map: on the prompts whose length and
            named positions coincide, :func:`position_map_prompts`, which warns when
            it keeps only the largest such group), or a list of absolute
            positions and/or names in ``prompts.positions`` (``"S2"``, ``"end"``),
            each patched on its own (``None`` in the list = every position).
            An intervention at positions ``>= p`` recomputes only those, attending to the
            base run's keys and values before ``p`` (exact; ``lsa.engine.without("reuse_cache")``
            recomputes every position, for comparison).
        direction: ``"noising"`` (clean run, counterfactual activations) or ``"denoising"``.
        metric: ``metric(logits [n, d_vocab], prompts) -> [n]`` at the end position
            (default :func:`lsa.metrics.logit_diff`).
        chunking: ``batch_size``, ``max_tokens``, ``progress`` (:class:`lsa.sweeps.Chunking`).

    Returns a :class:`PatchResult` whose ``array`` is ``[layer, head]`` for heads,
    ``[layer, neuron]`` for neurons, ``[layer]`` otherwise, with a trailing
    ``pos`` axis when positions are patched one at a time; then ``meta["pos_labels"]``
    labels that axis with tokens (:func:`position_labels`, e.g. ``"3:Mary (IO)"``)
    and ``meta["n_prompts"]`` / ``meta["n_given"]`` say how many prompts it rests on.

    >>> res = activation_patching(model, prompts, "resid_pre", positions="each")  # doctest: +SKIP
    >>> res.array.shape   # [layer, pos]                                           # doctest: +SKIP
    """

    def donor_run(swept: PromptSet, sites: set, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
        run = baseline(model, swept, tokens, sites)
        return run.values, run.logits

    select = dict(layers=layers, heads=heads, neurons=neurons, positions=positions)
    return sweep(
        model,
        prompts,
        site,
        select,
        donor=donor_run,
        direction=direction,
        metric=metric,
        method="activation patching",
        chunking=Chunking(**chunking),
    )


# ============================================================== path patching
@dataclass
class PathRuns:
    """Path patching's two unpatched runs of ``prompts`` (:func:`path_runs`), shared by several calls.

    ``base``: every head's output and attention input, keys and values (locally); ``donor``: every
    head's output. Valid for the same ``prompts`` object and ``direction`` alone.
    """

    prompts: PromptSet
    direction: str
    base: engine.Run
    donor: engine.Run


@torch.no_grad()
def path_runs(model, prompts: PromptSet, direction: str = "noising") -> PathRuns:
    """The unpatched runs that :func:`path_patching` calls on the same prompts can share (``unpatched=``).

    Iterated path patching calls it once per receiver set and input; sharing spares two forwards
    of the prompts per call.
    """
    check_prompts(prompts, model)
    check_direction(direction)
    base_tokens, donor_tokens = base_donor_tokens(model, prompts, direction)
    n_layers = model.adapter.n_layers
    heads = {("head", layer) for layer in range(n_layers)}
    attn_in = {("attn_in", layer) for layer in range(n_layers)}
    base = baseline(model, prompts, base_tokens, heads | attn_in, keep_cache=True)
    return PathRuns(prompts, direction, base, baseline(model, prompts, donor_tokens, heads))


@torch.no_grad()
def path_patching(
    model,
    prompts: PromptSet,
    senders=None,
    receivers="logits",
    *,
    receiver_input: str | tuple[str, ...] = "q",
    direction: str = "noising",
    metric: Metric | None = None,
    positions: str | int | None = None,
    unpatched: PathRuns | None = None,
    receivers_at: str | None = None,
    **chunking,
) -> PatchResult | dict[str, PatchResult]:
    """Path patching (Wang et al. 2022): each sender's effect through its direct path to the receivers.

    Args:
        senders: ``(layer, head)`` entries, each patched on its own; an entry may
            be a list of heads patched together. Default: every head (for
            ``receivers="logits"``) or every head in a layer before the last
            receiver layer.
        receivers: ``"logits"`` (the final residual stream) or a list of
            ``(layer, head)`` whose ``receiver_input`` (``"q"``, ``"k"``, ``"v"`` or
            a combination such as ``"kv"``) takes the patched path. Under
            grouped-query attention a key / value receiver is the head's KV group
            (every query head of the group sees the patched keys / values).
            A tuple of inputs, such as ``("k", "v")``, patches each on its own and returns
            ``{input: PatchResult}``, equal to one call per input; the inputs share the senders' run
            (step 2) and, with ``receivers_at="end"``, the run of the receivers' keys and values.
        positions: where the senders' outputs are patched: ``None`` (every position), or one
            named (``"end"``, a name of ``prompts.positions``) or absolute position. With every
            other head frozen, a sender reaches the logits only through the end position's
            residual, so ``positions="end"`` gives the same result as ``None`` for
            ``receivers="logits"``, and it means "the receivers' queries at the end" for ``"q"``.
            With a position, only the positions from it on are recomputed (the base run's keys and
            values before it reused; exact); where that is one position per prompt (senders at the
            end, or receivers read at the end alone: the senders' position, then the end), every
            prompt runs in one forward at its own position.
        unpatched: the two unpatched runs from :func:`path_runs` of these ``prompts`` and this
            ``direction`` (default: run them here).
        receivers_at: where the receivers' outputs take the patched path: ``None`` (wherever their
            patched inputs reach them, Wang et al.'s step 3) or ``"end"`` (at the end position
            alone; at every other position they give the base run's output, so that position is
            the base run's at every layer). With senders at one position ``p`` before the end,
            only the end is then recomputed: one run of position ``p`` through the receiver layers
            gives the receivers' keys and values there, the base run's the rest.
        chunking: ``batch_size``, ``max_tokens``, ``progress`` (:class:`lsa.sweeps.Chunking`).

    Frozen heads' attention computes no queries, keys or values (their outputs are given:
    :class:`lsa.engine.Plan`'s ``given_heads``); ``lsa.engine.without("skip_attention")`` computes
    and overwrites them, for comparison. The steps are :class:`PathPatching`'s.

    Returns a :class:`PatchResult` with one row per sender (``layer``, ``head``;
    ``array`` ``[layer, head]`` when every sender is a single head).
    """
    check_prompts(prompts, model)
    check_direction(direction)
    inputs = (receiver_input,) if isinstance(receiver_input, str) else tuple(receiver_input)
    paths = PathPatching(model, prompts, receivers, inputs, direction, metric or lsa_metrics.logit_diff)
    paths.patch_at(positions, receivers_at)
    groups = _sender_groups(model, senders, paths.last_receiver)
    paths.unpatched_runs(unpatched)
    outs = paths.sweep(groups, Chunking(**chunking))
    results = {ix: paths.result(groups, ix, out, positions) for ix, out in outs.items()}
    return results[inputs[0]] if isinstance(receiver_input, str) else results


class PathPatching:
    """Path patching of one prompt set into one set of receivers, as Wang et al.'s three steps.

    1) :meth:`unpatched_runs`: run the base and donor prompts (clean and counterfactual for noising),
       keeping every head's output (and the receivers' attention inputs);
    2) :meth:`senders_run`: rerun the base prompts with the senders' outputs taken from the donor run
       and every other head frozen to its base output (MLPs and norms recomputed); for
       ``"logits"`` this run's metric is the result;
    3) :meth:`receivers_run`: otherwise record the receiver layers' attention input (``ln1`` output) in
       run 2 and rerun the base prompts with only the receivers' query / key / value computed from
       it (their projections' output columns replaced).

    The state of the runs (the unpatched runs, where senders are patched, the results) lives here;
    :meth:`sweep` runs steps 2 and 3 for every chunk of sender groups.
    """

    def __init__(self, model, prompts: PromptSet, receivers, inputs: tuple[str, ...], direction: str, metric):
        self.model, self.prompts, self.direction, self.metric = model, prompts, direction, metric
        self.receivers, self.inputs = receivers, inputs
        self.to_logits = isinstance(receivers, str)
        if self.to_logits and receivers != "logits":
            raise ValueError(f"receivers must be 'logits' or a list of (layer, head), got {receivers!r}")
        if not inputs or (self.to_logits and len(inputs) > 1):
            raise ValueError(f"receiver_input must be an input or a tuple of inputs for head receivers, got {inputs!r}")
        # the receivers' units: {input: {layer: {"q" | "k" | "v": heads}}}, and every input's together (for the runs)
        self.units = {} if self.to_logits else {ix: _receiver_units(model, receivers, ix) for ix in inputs}
        self.all_units = {} if self.to_logits else _receiver_units(model, receivers, "".join(inputs))
        self.last_receiver = model.adapter.n_layers if self.to_logits else max(self.all_units)
        self.base_tokens, self.donor_tokens = base_donor_tokens(model, prompts, direction)
        self.columns, self.scored = lsa_metrics.answer_columns(metric, prompts)  # vocabulary ids patched runs compute

    def patch_at(self, positions, receivers_at) -> None:
        """Where senders are patched (``where`` ``[n]``, ``None``: every position) and receivers read."""
        if receivers_at not in (None, "end") or (receivers_at and self.to_logits):
            raise ValueError(f"receivers_at must be None or 'end' (for head receivers), got {receivers_at!r}")
        self.where, self.receivers_at = position_index(self.prompts, positions), receivers_at

    # ---------------------------------------------------------------- step 1
    def unpatched_runs(self, unpatched: PathRuns | None) -> None:
        """Step 1: the base and donor runs (or those of :func:`path_runs`), and their metrics."""
        model, prompts = self.model, self.prompts
        keep = self.where is not None and engine.can(model, "reuse_cache")
        if unpatched is None:
            heads = {("head", layer) for layer in range(model.adapter.n_layers)}
            attn_in = {("attn_in", layer) for layer in self.all_units}
            base = baseline(model, prompts, self.base_tokens, heads | attn_in, keep_cache=keep)
            donor = baseline(model, prompts, self.donor_tokens, heads)
        elif unpatched.prompts is not prompts or unpatched.direction != self.direction:
            raise ValueError(
                "unpatched runs are for the prompts and direction they were made from "
                f"(path_runs(model, prompts, {self.direction!r}))"
            )
        else:
            base, donor = (unpatched.base if keep else replace(unpatched.base, cache=None)), unpatched.donor
        self.base, self.donor = base, donor
        self.base_metric = run_metric(self.metric, base.logits, prompts).cpu()
        self.donor_metric = run_metric(self.metric, donor.logits, prompts).cpu()
        # each prompt runs one position, every prompt together: the senders' position for the run into the
        # receivers, the end for the logits (senders at the end, or receivers read at the end alone)
        where, end = self.where, prompts.end.cpu()
        self.alone = base.cache is not None and where is not None
        if self.alone:
            self.alone = bool((where.cpu() >= end).all()) or (self.receivers_at == "end" and not self.to_logits)
        self.at = None if where is None else torch.minimum(where.cpu(), end)  # the senders' position in each prompt

    def sweep(self, groups: list[tuple], chunking: Chunking) -> dict[str, torch.Tensor]:
        """Steps 2 and 3 for every sender group: the metric ``{input: [groups, n]}``."""
        prompts, n = self.prompts, len(self.prompts)
        recomputed = None
        if self.base.cache is not None and self.receivers_at:  # each run recomputes one position per prompt
            recomputed = n
        elif self.base.cache is not None:  # each replica recomputes its prompts from the patched position to their end
            recomputed = int((prompts.lengths - self.at).sum())
        size = chunking.size(self.model, prompts, recomputed)
        order: dict[int, list[int]] = {}
        for i, group in enumerate(groups):
            order.setdefault(min(layer for layer, _ in group), []).append(i)
        self.groups, self.outs = groups, {ix: torch.empty(len(groups), n) for ix in self.inputs}
        self.bar = chunking.bar(len(groups), "path patching")
        for chunk in [c for layer in sorted(order) for c in chunks(order[layer], size)]:
            halving(self._chunk, chunk)
        self.bar.close()
        return self.outs

    def _chunk(self, chunk: list[int]) -> None:
        start = min(layer for layer, _ in self.groups[chunk[0]])
        reads = [("attn_in", layer) for layer in self.all_units if layer > start]
        if not self.to_logits and not reads:  # no receiver after the senders: no path, the base run's metric
            for out in self.outs.values():
                out[chunk] = self.base_metric
        elif self.alone:
            self._alone(chunk, start, reads)
        else:
            # rows that share the patched position run together, from it to their last end (the cache reused)
            for rows, p in row_groups(self.prompts, self.where if self.base.cache is not None else None):
                self._rows(chunk, start, reads, rows, p)
        self.bar.update(len(chunk))

    # ---------------------------------------------------------------- step 2
    def senders_run(
        self, chunk: list[int], start: int, reads: list, begin: Start | None, rows, width: int, ends
    ) -> Plan:
        """Step 2's plan: the chunk's senders from the donor run, every other head frozen to the base run (given
        heads from the senders' earliest layer to the last receiver's); the logits, or the receivers' inputs."""
        batch = len(chunk) * (len(self.prompts) if rows is None else len(rows))
        given, edits = {}, []
        for layer in range(start, self.last_receiver):
            given[layer] = self.base.values[("head", layer)]
            mask = self._sender_mask(chunk, layer, rows, width, batch)
            if mask is not None:
                edits.append(Patch("head", layer, self.donor.values[("head", layer)], mask))
        if self.to_logits:
            return Plan(edits=edits, given_heads=given, start=begin, rows=rows, end=ends, columns=self.columns)
        reads = [Read(*key) for key in reads]
        stop = max((r.site, r.layer) for r in reads)
        return Plan(edits=edits, given_heads=given, reads=reads, start=begin, rows=rows, stop_after=stop, logits=None)

    def _sender_mask(self, chunk: list[int], layer: int, rows, width: int, batch: int) -> torch.Tensor | None:
        """``[batch, width, n_heads]``: where each replica (sender group) patches its heads of ``layer``."""
        found = [(j, h) for j, gi in enumerate(chunk) for sl, h in self.groups[gi] if sl == layer]
        if not found:
            return None
        r = batch // len(chunk)
        mask = torch.zeros(batch, width, self.model.adapter.n_heads, dtype=torch.bool, device=self.model.device)
        if self.where is None:
            for j, h in found:
                mask[j * r : (j + 1) * r, :, h] = True
            return mask
        where = self.where.cpu() if rows is None else self.where.cpu()[rows]
        inside = (where < width).nonzero().flatten()
        for j, h in found:
            mask[j * r + inside.to(mask.device), where[inside].to(mask.device), h] = True
        return mask

    # ---------------------------------------------------------------- step 3
    def receivers_run(self, ix: str, seen: dict, begin: Start | None, rows, ends, edits=()) -> Plan:
        """Step 3's plan for input ``ix``: the receivers' query / key / value from their inputs ``seen`` in step 2."""
        projections = _receiver_projections(self.model, self.units[ix], seen)
        return Plan(projections=projections, edits=list(edits), start=begin, rows=rows, end=ends, columns=self.columns)

    def _at_end(self, ix: str, layers: list[int], rows, width: int, batch: int, p: int) -> list[Patch]:
        """Patches that give the receivers' heads of ``layers`` the base run's output at every position but each
        row's end (``receivers_at="end"``)."""
        ends = (self.prompts.end if rows is None else self.prompts.end[rows]).to(self.model.device)
        other = torch.arange(width, device=self.model.device)[None, :] != ends[:, None]  # [r, width]
        other = other.repeat(batch // len(ends), 1)
        patches = []
        for layer in layers:
            heads = _receiver_heads(self.model, self.units[ix], layer).to(self.model.device)
            mask = other[:, :, None] & heads[None, None, :]
            patches.append(Patch("head", layer, self.base.values[("head", layer)], mask))
        return patches

    def _rows(self, chunk: list[int], start: int, reads: list, rows, p: int) -> None:
        """Steps 2 and 3 for the prompts ``rows`` whose senders are patched at ``p`` (recomputed from it on)."""
        m, cached = len(chunk), self.base.cache is not None
        sub = self.scored if rows is None else self.scored.subset(rows)
        r, width = len(sub), sub.clean.shape[1]
        take = slice(None) if rows is None else rows.to(self.base_tokens.device)
        tokens = self.base_tokens[take, :width].repeat(m, 1)
        ends = sub.end.repeat(m)
        # With every head frozen nothing moves between positions, so a run into receivers, whose senders are
        # patched at p alone, changes position p alone: it runs p by itself (the base run gives the rest).
        upto = p + 1 if cached and not self.to_logits else width
        plan = self.senders_run(chunk, start, reads, cached_start(self.base, start, first=p), rows, upto, ends)
        if self.to_logits:
            return self._score({self.inputs[0]: plan}, tokens, chunk, rows, sub)
        seen = engine.run(self.model, tokens[:, :upto], plan).values
        if upto < width:  # the positions after p as in the base run
            after = Layout(m * r, width, rows, upto)
            seen = {key: torch.cat([x, after.take(self.base.values[key]).to(x)], 1) for key, x in seen.items()}
        first = min(layer for _, layer in reads)
        begin = cached_start(self.base, first, first=p)
        plans = {}
        for ix in self.inputs:
            at_end = self._at_end(ix, [la for _, la in reads], rows, width, m * r, p) if self.receivers_at else []
            plans[ix] = self.receivers_run(ix, seen, begin, rows, ends, at_end)
        self._score(plans, tokens, chunk, rows, sub)

    def _alone(self, chunk: list[int], start: int, reads: list) -> None:
        """Steps 2 and 3 where each prompt runs one position: the senders' (into receivers), then its end."""
        model, m, n = self.model, len(chunk), len(self.prompts)
        end = self.prompts.end.cpu()
        at, ends = self.at.repeat(m).to(model.device), end.repeat(m).to(model.device)  # per row of the run
        tokens = self.base_tokens.repeat(m, 1)
        plan = self.senders_run(
            chunk, start, reads, cached_start(self.base, start, first=at), None, self.prompts.clean.shape[1], ends
        )
        if self.to_logits:
            return self._score({self.inputs[0]: plan}, tokens, chunk, None, self.scored)
        seen = engine.run(model, tokens, plan).values  # the receivers' inputs at the senders' position
        first = min(layer for _, layer in reads)
        later = (self.at < end).repeat(m).to(model.device)  # rows whose receivers read at a later end
        moved = self._moved_cache(seen, first, at, m) if bool(later.any()) else None
        end_alone = Layout(m * n, self.prompts.clean.shape[1], None, ends)
        plans = {}
        for ix in self.inputs:
            cache = self.base.cache
            if moved is not None:
                heads = {layer: self.units[ix][layer] for _, layer in seen}
                cache = engine.plan.spliced(cache, moved, at, heads, later, m)
            given = {
                key: torch.where(later[:, None, None], end_alone.take(self.base.values[key]).to(x), x)
                for key, x in seen.items()
            }
            begin = replace(cached_start(self.base, first, first=ends), cache=cache)
            plans[ix] = self.receivers_run(ix, given, begin, None, ends)
        self._score(plans, tokens, chunk, None, self.scored)

    def _moved_cache(self, seen: dict, first: int, at: torch.Tensor, m: int):
        """The receivers' keys and values at the senders' position, from their patched inputs ``seen``: one run of
        that position alone through the receiver layers (heads of other layers idle, MLPs idle)."""
        model, last = self.model, max(self.all_units)
        heads = self.base.values[("head", first)]
        idle = heads.new_zeros(()).expand_as(heads)  # every head's output zero (its attention never runs)
        plan = Plan(
            projections=_receiver_projections(model, self.all_units, seen),
            given_heads={layer: idle for layer in range(first, last) if ("attn_in", layer) not in seen},
            idle_mlps=tuple(range(first, last)),
            start=cached_start(self.base, first, first=at),
            stop_after=("head", last),
            logits=None,
            keep_cache=True,
        )
        return engine.run(model, self.base_tokens.repeat(m, 1), plan).cache

    def _score(self, plans: dict, tokens, chunk: list[int], rows, sub: PromptSet) -> None:
        r = len(sub)
        for ix, plan in plans.items():
            logits = engine.run(self.model, tokens, plan).logits
            for j, gi in enumerate(chunk):
                self.outs[ix][gi, slice(None) if rows is None else rows] = run_metric(
                    self.metric, logits[j * r : (j + 1) * r], sub
                ).cpu()

    def result(self, groups: list[tuple], ix: str, out: torch.Tensor, positions) -> PatchResult:
        """One input's :class:`PatchResult`: one row per sender group (``[layer, head]`` when each is one head)."""
        clean, corrupt = (self.base_metric, self.donor_metric)
        if self.direction != "noising":
            clean, corrupt = corrupt, clean
        if all(len(g) == 1 for g in groups):
            components = pd.DataFrame([{"site": "head", "layer": g[0][0], "head": g[0][1]} for g in groups])
            dims = ("layer", "head")
            axes = {"layer": sorted({g[0][0] for g in groups}), "head": sorted({g[0][1] for g in groups})}
        else:
            labels = [", ".join(f"{lh[0]}.{lh[1]}" for lh in g) for g in groups]
            components = pd.DataFrame([{"site": "heads", "senders": s} for s in labels])
            dims, axes = ("senders",), {"senders": labels}
        meta = {"site": "head", "receivers": self.receivers, "receiver_input": None if self.to_logits else ix}
        return PatchResult(
            components=components,
            patched=out,
            clean=clean,
            corrupt=corrupt,
            dims=dims,
            axes=axes,
            direction=self.direction,
            method="path patching",
            meta={**meta, **({} if positions is None else {"positions": positions})},
        )


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer (``nn.Linear``, or GPT-2's transposed ``Conv1D``)."""
    return module.out_features if hasattr(module, "out_features") else module.nf


def _receiver_projections(model, units: dict, seen: dict) -> list[Projection]:
    """Each receiver layer's q / k / v projections applied to its recorded attention input ``seen[("attn_in", layer)]``.

    Every head's q / k / v comes from the patched input; only the receivers' columns are used.
    """
    projections = []
    for (_, layer), patched_in in sorted(seen.items()):
        by_module: dict[nn.Module, list[slice]] = {}
        for kind, heads in units[layer].items():
            for unit in heads:
                module, cols = model.adapter.qkv_columns(model.hf, kind, layer, unit)
                by_module.setdefault(module, []).append(cols)
        for module, cols_list in by_module.items():
            colmask = torch.zeros(_out_features(module), dtype=torch.bool, device=patched_in.device)
            for cols in cols_list:
                colmask[cols] = True
            projections.append(Projection(module, layer, patched_in, colmask))
    return projections


def _receiver_heads(model, units: dict, layer: int) -> torch.Tensor:
    """The query heads whose outputs the receivers' patched inputs reach at ``layer`` ``[n_heads]`` (bool):
    a query receiver's head, every head of a key / value receiver's KV group."""
    a = model.adapter
    mask = torch.zeros(a.n_heads, dtype=torch.bool)
    for kind, heads in units[layer].items():
        for h in range(a.n_heads):
            mask[h] |= (h if kind == "q" else a.kv_head(h)) in heads
    return mask


def _sender_groups(model, senders, last_receiver: int) -> list[tuple[tuple[int, int], ...]]:
    """Normalise senders: ``(layer, head)`` or a list of them (patched together) per entry; default: every head
    before the last receiver's layer."""
    if senders is None:
        senders = [(layer, h) for layer in range(last_receiver) for h in range(model.adapter.n_heads)]
    groups = []
    for entry in senders:
        if isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, int) for x in entry):
            entry = [entry]
        group = tuple(tuple(h) for h in entry)
        if not group:
            raise ValueError("an empty sender group")
        for layer, head in group:
            model.adapter.check_head(head, layer)
        groups.append(group)
    return groups


def _receiver_units(model, receivers, receiver_input: str) -> dict[int, dict[str, list[int]]]:
    """``{layer: {"q": [heads], "k": [kv heads], "v": [kv heads]}}`` (keys and values per KV group)."""
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(k not in "qkv" for k in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv' (e.g. 'q', 'kv', 'qkv'), got {receiver_input!r}")
    found: dict[int, dict[str, list[int]]] = {}
    for entry in receivers:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"a receiver head is (layer, head), got {entry!r}")
        layer, head = entry
        model.adapter.check_head(head, layer)
        for kind in kinds:
            unit = head if kind == "q" else model.adapter.kv_head(head)
            units = found.setdefault(layer, {}).setdefault(kind, [])
            if unit not in units:
                units.append(unit)
    return found
