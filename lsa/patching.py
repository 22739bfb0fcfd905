"""Activation patching and path patching: which components carry a task's behaviour.

Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024) reruns the
model with one component's activation overwritten by its value from another
run and reads the change in a metric. Path patching (Wang et al. 2022) restricts
that change to one path: a sender head's effect on receivers (the logits, or
the query / key / value input of later heads) with every other head frozen.

Sites (``site=``), each per layer:

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

Cost: a sweep runs the two unpatched forwards once, then for each patched layer
``L`` one forward of the batch expanded by the number of interventions (chunked
to ``max_tokens``) that *starts at block L* from the cached residual stream
(blocks before ``L`` are skipped, their output taken from the cache; masks,
rotary and alibi terms are still built by the model itself; for sites after the
attention, layer ``L``'s queries, keys and values come from the cache too), and
computes logits only at each prompt's end position (final norm + unembedding on
those rows alone). Memory: the residual stream of every
layer for both runs, plus one expanded chunk. Plain torch hooks on ``model.hf``
do the work; results equal a hook-by-hook reference (see ``tests/test_patching.py``).

>>> res = activation_patching(model, prompts, site="head")     # doctest: +SKIP
>>> res.array.shape                                              # [layer, head]  # doctest: +SKIP
>>> res.frame.sort_values("normalized").head()                  # doctest: +SKIP
>>> path = path_patching(model, prompts, receivers="logits")    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import nnsight
import pandas as pd
import torch
from torch import nn

from lsa import metrics as lsa_metrics
from lsa.model import Model
from lsa.tasks import PromptSet

__all__ = [
    "SITES",
    "DIRECTIONS",
    "PatchResult",
    "activation_patching",
    "path_patching",
    "forward",
    "run_metric",
    "check_prompts",
    "position_map_prompts",
    "position_labels",
]

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
DIRECTIONS = ("noising", "denoising")
Metric = Callable[[torch.Tensor, PromptSet], torch.Tensor]
DEFAULT_MAX_TOKENS = {"cpu": 1024, "cuda": 16384}  # rows x positions per expanded forward (CPU: small is faster)


# ============================================================== validation
def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
    return site


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    return direction


def check_prompts(prompts: PromptSet) -> None:
    """Clean and counterfactual prompts must pair up token for token."""
    if prompts.clean.shape != prompts.corrupt.shape:
        raise ValueError(
            f"clean prompts {tuple(prompts.clean.shape)} and counterfactual prompts "
            f"{tuple(prompts.corrupt.shape)} have different shapes; patching needs equal-length pairs"
        )
    if len(prompts) == 0:
        raise ValueError("the prompt set is empty")


def _check_site_for_model(model: Model, site: str) -> None:
    check_site(site)
    if site == "resid_mid" and model.adapter.parallel_residual:
        raise ValueError(
            "resid_mid is undefined for a parallel-residual model (attention and MLP read the same "
            "residual stream); patch resid_pre, resid_post, attn_out or mlp_out instead"
        )


def _units(model: Model, site: str) -> tuple[int, int]:
    """``(units, width)``: how a site's last dimension splits into patchable units."""
    a = model.adapter
    if site == "head":
        return a.n_heads, a.d_head
    if site == "neuron":
        return a.d_mlp, 1
    return 1, a.d_model


def run_metric(metric: Metric, logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """``metric(logits [n, d_vocab], prompts) -> [n]``, with a clear error for any other shape."""
    out = metric(logits, prompts)
    if not isinstance(out, torch.Tensor) or out.shape != (len(prompts),):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the metric must return one value per prompt, shape [{len(prompts)}]; got {shape} "
            f"(it receives end-position logits [n, d_vocab] and the PromptSet)"
        )
    return out.detach().float()


# ============================================================== running the model
class _Stop(Exception):
    """Raised by a hook to end a forward early (nothing after it is needed)."""


_RETURNS_TUPLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _returns_tuple(model: Model, part: str = "blocks") -> bool:
    """Whether this model's blocks (``part="blocks"``) or attention modules (``"attn"``) return a tuple."""
    hf = model.hf
    seen = _RETURNS_TUPLE.setdefault(hf, {})
    if part not in seen:
        module = model.adapter.block(hf, 0) if part == "blocks" else model.adapter.module(hf, part, 0)

        def hook(module, args, output):
            seen[part] = isinstance(output, tuple)
            raise _Stop

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad(), contextlib.suppress(_Stop):
                hf.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
        finally:
            handle.remove()
    return seen[part]


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_in(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden_out(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def _stubbed(stubs: Sequence[tuple[nn.Module, Callable]]):
    """Temporarily replace modules' ``forward`` (their hooks still run)."""
    saved = [(module, module.__dict__.get("forward")) for module, _ in stubs]
    for module, stub in stubs:
        module.forward = stub
    try:
        yield
    finally:
        for module, old in saved:
            if old is None:
                del module.forward
            else:
                module.forward = old


def _skip_stubs(model: Model, start: int) -> list[tuple[nn.Module, Callable]]:
    """Blocks ``< start`` pass their input through untouched (their work is taken from a cache)."""
    if start == 0:
        return []
    blocks = model.adapter.blocks(model.hf)
    as_tuple = _returns_tuple(model, "blocks")

    def stub(*args, **kwargs):
        h = _hidden_in(args, kwargs)
        return (h, None) if as_tuple else h

    return [(blocks[i], stub) for i in range(start)]


def _attn_stub(model: Model, layer: int, attn: torch.Tensor, z: torch.Tensor, o: torch.Tensor):
    """Attention at ``layer`` from a cache: ``attn - o + o_proj(z)`` (o_proj's hooks, hence its edits, still run).

    Valid where the attention input is the same as in the cached run (every
    replica starts at this layer from the cached residual), so only the output
    projection and what follows it can differ. ``attn``: the attention module's
    output (BLOOM's includes the residual), ``z``: the projection's input, ``o``: its output.
    """
    as_tuple = _returns_tuple(model, "attn")
    o_proj = model.module("o_proj", layer)

    def stub(*args, **kwargs):
        out = attn - o + o_proj(z)
        return (out, None) if as_tuple else out

    return model.module("attn", layer), stub


Edit = Callable[[torch.Tensor], torch.Tensor]
# What _attn_stub needs from a cached run: the attention module's output, o_proj's input and output.
ATTN_CACHE = ("attn_full", "head", "attn_proj")


# Where each site lives, in the order a block runs them: (part, "pre" = input / "out" = output, rank).
# attn_write / mlp_write are the adapter's write parts (the projection, or a sandwich norm after
# it, which runs after the attention module returns: rank 4.5). attn_proj and attn_full are the
# projection's and the attention module's outputs, cached so a patched layer can skip its q/k/v.
_SITE_POINTS = {
    "resid_pre": ("block", "pre", 0),
    "attn_in": ("ln1", "out", 1),
    "head": ("o_proj", "pre", 2),
    "attn_proj": ("o_proj", "out", 3),
    "attn_out": ("attn_write", "out", 3),
    "resid_mid": ("attn_write", "out", 3),
    "attn_full": ("attn", "out", 4),
    "neuron": ("mlp_out", "pre", 5),
    "mlp_out": ("mlp_write", "out", 6),
    "resid_post": ("block", "out", 7),
}


def _site_point(site: str, model: Model | None = None) -> tuple[str, str, float]:
    """``(part, kind, rank)`` of a site (see :data:`_SITE_POINTS`); a sandwich norm's write ranks after ``attn``."""
    if site not in _SITE_POINTS:
        raise ValueError(f"unknown site {site!r}")
    part, kind, rank = _SITE_POINTS[site]
    if model is not None:
        part = model.adapter.resolve_part(part)  # attn_write -> o_proj, or its sandwich norm
        rank = 4.5 if part == "attn_post_norm" else rank
    return part, kind, rank


def _hook_point(model: Model, site: str, layer: int) -> tuple[nn.Module, str]:
    """The module and hook kind (``"pre"`` = its input, ``"out"`` = its output) holding a site."""
    part, kind, _ = _site_point(site, model)
    a, hf = model.adapter, model.hf
    return (a.block(hf, layer) if part == "block" else a.module(hf, part, layer)), kind


def forward(
    model: Model,
    tokens: torch.Tensor,
    end: torch.Tensor,
    *,
    edits: dict[tuple[str, int], Edit] | None = None,
    reads: Iterable[tuple[str, int]] = (),
    start: tuple[int, torch.Tensor] | None = None,
    stop_after: tuple[str, int] | None = None,
    projections: Sequence[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] = (),
    attn_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    logits: bool = True,
) -> tuple[torch.Tensor | None, dict[tuple[str, int], torch.Tensor]]:
    """One forward with plain torch hooks: end-position logits ``[batch, d_vocab]`` and read activations.

    ``edits[(site, layer)]`` maps the site's tensor to its replacement (``resid_mid``:
    the edit sees and returns the mid residual; it is written as a change of the
    attention output projection's output). ``reads`` are stored after any edit at
    the same site. ``start=(layer, hidden)`` skips blocks before ``layer`` and feeds
    ``hidden`` ``[batch, pos, d_model]`` to it. ``stop_after`` ends the forward once
    that site is read (then no logits). ``projections`` ``(module, layer, input, column mask)``
    replace the masked output columns of a query / key / value projection in
    ``layer`` by that projection applied to ``input`` (path patching's receivers). ``attn_cache``
    ``(attention output, o_proj input, o_proj output)`` of the start layer lets its
    attention skip recomputing queries, keys and values (see :func:`_attn_stub`).
    Gradients follow the
    caller's grad mode. No attention mask is passed: prompt sets are right-padded,
    so no real position attends to padding (padded positions hold junk, never read).
    """
    if getattr(model, "remote", False):
        return _forward_traced(
            model, tokens, end, edits=edits, reads=reads, stop_after=stop_after, projections=projections, logits=logits
        )
    if start is not None:  # probe once, before any hook is in place
        _returns_tuple(model, "blocks")
        _returns_tuple(model, "attn")
    edits = dict(edits or {})
    reads = set(reads)
    cache: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    start_layer = start[0] if start else 0
    for site, layer in list(edits) + sorted(reads - set(edits)):
        if layer < start_layer:
            raise ValueError(f"{site} at layer {layer} lies before the start layer {start_layer}")
    pre_needed = {layer for site, layer in list(edits) + list(reads) if site == "resid_mid"}
    pre_cache: dict[int, torch.Tensor] = {}
    blocks = model.adapter.blocks(model.hf)

    def make_hook(site: str, layer: int, kind: str):
        edit = edits.get((site, layer))
        read = (site, layer) in reads
        stop = stop_after == (site, layer)

        def apply(x: torch.Tensor) -> torch.Tensor:
            if site == "resid_mid":
                pre = pre_cache[layer]
                if edit is not None:
                    x = edit(pre + x) - pre
                if read:
                    cache[(site, layer)] = pre + x
            else:
                if edit is not None:
                    x = edit(x)
                if read:
                    cache[(site, layer)] = x
            if stop:
                raise _Stop
            return x

        if kind == "pre":
            is_block = site == "resid_pre"

            def pre_hook(module, args, kwargs):
                x = _hidden_in(args, kwargs) if is_block else args[0]
                y = apply(x)
                if y is x:
                    return None
                return _with_hidden_in(args, kwargs, y) if is_block else ((y, *args[1:]), kwargs)

            return pre_hook

        def out_hook(module, args, output):
            x = _hidden_out(output)
            y = apply(x)
            return None if y is x else _with_hidden_out(output, y)

        return out_hook

    try:
        if start is not None:  # first in line, so edits at the start block see the fed input
            handles.append(
                blocks[start_layer].register_forward_pre_hook(
                    lambda m, args, kwargs: _with_hidden_in(args, kwargs, start[1]), with_kwargs=True
                )
            )
        for site, layer in list(edits) + sorted(reads - set(edits)):
            module, kind = _hook_point(model, site, layer)
            hook = make_hook(site, layer, kind)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
        for layer in sorted(pre_needed):  # after any resid_pre edit of the same block

            def record(module, args, kwargs, layer=layer):
                pre_cache[layer] = _hidden_in(args, kwargs)

            handles.append(blocks[layer].register_forward_pre_hook(record, with_kwargs=True))
        for module, _, given, colmask in projections:
            proj = module(given)  # before the hook is in place

            def replace(m, args, out, proj=proj, colmask=colmask):
                return torch.where(colmask, proj, out)

            handles.append(module.register_forward_hook(replace))
        out = None
        stubs = _skip_stubs(model, start_layer)
        if attn_cache is not None:
            stubs.append(_attn_stub(model, start_layer, *attn_cache))
        with _stubbed(stubs):
            try:
                hidden = model.hf.base_model(input_ids=tokens, use_cache=False)[0]
            except _Stop:
                return None, cache
        if logits:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            out = model.module("unembed")(hidden[rows, end.to(hidden.device)])
        return out, cache
    finally:
        for h in handles:
            h.remove()


def _trace_plan(model: Model, edits, reads, projections=()) -> list[tuple[str, int, str, list]]:
    """Hook points ``(part, layer, kind, sites)`` in forward order; ``resid_mid`` also reads its block's input.

    A projection ``(module, layer, input, mask)`` becomes the point ``(dotted path, layer, "proj", [input, mask])``
    between the attention input and the heads' outputs.
    """
    points: dict[tuple, list] = {}
    names = {id(m): name for name, m in model.hf.named_modules()} if projections else {}
    for module, layer, given, colmask in projections:
        points[(layer, 1.5, names[id(module)], "proj")] = [given, colmask]
    for site, layer in list(edits) + sorted(set(reads) - set(edits)):
        part, kind, rank = _site_point(site, model)
        model.adapter.check_layer(layer)
        points.setdefault((layer, rank, part, kind), [])
        if site not in points[(layer, rank, part, kind)]:
            points[(layer, rank, part, kind)].append(site)
        if site == "resid_mid":
            points.setdefault((layer, 0, "block", "pre"), [])
    return [(part, layer, kind, sites) for (layer, _, part, kind), sites in sorted(points.items())]


def _envoy(model: Model, part: str, layer: int):
    return model.envoy("blocks")[layer] if part == "block" else model.envoy(part, layer)


def _forward_traced(
    model: Model,
    tokens: torch.Tensor,
    end: torch.Tensor,
    *,
    edits: dict[tuple[str, int], Edit] | None = None,
    reads: Iterable[tuple[str, int]] = (),
    stop_after: tuple[str, int] | None = None,
    projections: Sequence[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] = (),
    logits: bool = True,
    logit_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, dict[tuple[str, int], torch.Tensor]]:
    """:func:`forward` as one nnsight trace (``model.remote``: NDIF, or ``"local"``, its simulation here).

    The same edits and reads at the same sites, applied in the block's forward
    order inside the trace; only the read sites and the end-position logits come
    back. Every layer runs (no cached start: on a remote model the cache would
    have to travel both ways), which gives the same values as a cached start.

    ``logit_grad`` ``[batch, d_vocab]``: also run the backward pass of
    ``sum(end logits * logit_grad)`` inside the trace and return, instead of the
    read sites' values, their gradients. With ``logit_grad`` = d metric / d end
    logits, these are d metric / d site (the metric depends on the sites only
    through the end logits), so no metric code has to travel.
    """
    edits, reads = dict(edits or {}), set(reads)
    # envoys are looked up here, so the request carries them (references to the model) rather than the Model
    plan = [
        (model.envoy_at(part) if kind == "proj" else _envoy(model, part, layer), part, layer, kind, sites)
        for part, layer, kind, sites in _trace_plan(model, edits, reads, projections)
    ]
    embed, unembed = model.envoy("embed"), model.envoy("unembed")
    rows = torch.arange(tokens.shape[0])
    end = end.cpu()
    out = None
    weights = None if logit_grad is None else logit_grad.detach().cpu()
    with torch.set_grad_enabled(weights is not None), model.trace(tokens.cpu(), use_cache=False) as tracer:
        got = {}
        blocks_in = {}
        if weights is not None:  # a graph to differentiate even where the weights are frozen
            embed.output.requires_grad_(True)
        for env, part, layer, kind, sites in plan:
            if kind == "proj":  # a receiver's q / k / v columns from its patched input
                env.output = torch.where(sites[1], env(sites[0]), env.output)
                continue
            raw = env.input if kind == "pre" else env.output
            x = raw[0] if isinstance(raw, tuple) else raw
            y = x
            for site in sites:
                edit = edits.get((site, layer))
                if site == "resid_mid":
                    pre = blocks_in[layer]
                    if edit is not None:
                        y = edit(pre + y) - pre
                    value = pre + y
                else:
                    if edit is not None:
                        y = edit(y)
                    value = y
                if (site, layer) in reads:
                    got[(site, layer)] = value
            if part == "block" and kind == "pre":
                blocks_in[layer] = y
            if y is not x:
                new = (y, *raw[1:]) if isinstance(raw, tuple) else y
                if kind == "pre":
                    env.input = new
                else:
                    env.output = new
            if stop_after is not None and stop_after[1] == layer and stop_after[0] in sites:
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
        if logits and stop_after is None and weights is None:
            out = unembed.output[rows, end].save()
    device = model.device
    return (None if out is None else out.to(device)), {k: v.detach().to(device) for k, v in got.items()}


# ============================================================== results
@dataclass
class PatchResult:
    """The outcome of a patching sweep.

    ``components``: one row per intervention (``site``, ``layer``, and where they
    apply ``head`` / ``neuron`` / ``pos``); ``patched``: ``[n_components, n_prompts]``
    metric with that intervention; ``clean`` / ``corrupt``: ``[n_prompts]`` unpatched
    metrics; ``dims`` / ``axes``: the grid the components fill (``("layer", "head")``
    with the labels of each axis), so :attr:`array` is e.g. ``[layer, head]``.
    """

    components: pd.DataFrame
    patched: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    dims: tuple[str, ...]
    axes: dict[str, list]
    direction: str = "noising"
    method: str = "activation patching"
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        n_comp, n = self.patched.shape
        grid = " x ".join(f"{d} {len(self.axes[d])}" for d in self.dims)
        return (
            f"PatchResult({self.method}, {self.direction}, {self.meta.get('site', '')}: {n_comp} components "
            f"[{grid}] x {n} prompts; clean {self.clean.mean():.3f}, counterfactual {self.corrupt.mean():.3f})"
        )

    @property
    def base(self) -> torch.Tensor:
        """Metric of the run that was patched (clean for noising, counterfactual for denoising): ``[n]``."""
        return self.clean if self.direction == "noising" else self.corrupt

    @property
    def effect(self) -> torch.Tensor:
        """Mean patched metric minus mean unpatched metric: ``[n_components]``."""
        return self.patched.mean(1) - self.base.mean()

    @property
    def normalized(self) -> torch.Tensor:
        """``(patched - clean) / (clean - corrupt)`` on means: ``[n_components]``.

        All NaN, with a warning that says what to do, when :func:`lsa.metrics.normalized` refuses (the
        counterfactual does not clearly lower the metric); ``effect`` and ``metric`` stay defined.
        """
        try:
            return lsa_metrics.normalized(self.patched.mean(1), self.clean.mean(), self.corrupt.mean())
        except ValueError as refusal:
            warnings.warn(f"{self.method} ({self.direction}): {refusal}", stacklevel=2)
            return torch.full((self.patched.shape[0],), float("nan"))

    def to_frame(self, per_prompt: bool = False) -> pd.DataFrame:
        """Tidy table: one row per component (means), or per component x prompt."""
        comp = self.components.reset_index(drop=True)
        if not per_prompt:
            frame = comp.copy()
            frame["metric"] = self.patched.mean(1).numpy()
            frame["effect"] = self.effect.numpy()
            frame["normalized"] = self.normalized.numpy()
            return frame
        n_comp, n = self.patched.shape
        frame = comp.loc[comp.index.repeat(n)].reset_index(drop=True)
        frame["prompt"] = list(range(n)) * n_comp
        patched = self.patched.reshape(-1)
        clean = self.clean.repeat(n_comp)
        corrupt = self.corrupt.repeat(n_comp)
        frame["metric"] = patched.numpy()
        frame["effect"] = (patched - self.base.repeat(n_comp)).numpy()
        denom = clean - corrupt
        frame["normalized"] = torch.where(denom != 0, (patched - clean) / denom, torch.nan).numpy()
        return frame

    @property
    def frame(self) -> pd.DataFrame:
        """One row per component: its labels, ``metric``, ``effect``, ``normalized``."""
        return self.to_frame()

    def grid(self, value: str = "normalized") -> torch.Tensor:
        """A per-component value (``"normalized"``, ``"effect"``, ``"metric"``) laid out on :attr:`dims`."""
        values = {"normalized": self.normalized, "effect": self.effect, "metric": self.patched.mean(1)}[value]
        shape = [len(self.axes[d]) for d in self.dims]
        out = torch.full(shape, float("nan"))
        index = {d: {label: i for i, label in enumerate(self.axes[d])} for d in self.dims}
        for row, v in zip(self.components.to_dict("records"), values.tolist()):
            out[tuple(index[d][row[d]] for d in self.dims)] = v
        return out

    @property
    def array(self) -> torch.Tensor:
        """Normalised effects on the sweep's grid, e.g. ``[layer, head]`` or ``[layer, pos]``."""
        return self.grid("normalized")


# ============================================================== interventions
@dataclass(frozen=True)
class _Spec:
    """One intervention: a site at a layer, one unit (head / neuron) or all, one position per prompt or all."""

    site: str
    layer: int
    unit: int | None = None
    pos: str | int | None = None  # None = all positions; int = absolute; str = a named position


def _position_index(prompts: PromptSet, pos: str | int | None) -> torch.Tensor | None:
    """Per-prompt position ``[n]`` of a spec (None = every position)."""
    if pos is None:
        return None
    if isinstance(pos, str):
        if pos == "end":
            return prompts.end
        if pos not in prompts.positions:
            raise ValueError(
                f"unknown position name {pos!r}; this prompt set has {sorted(prompts.positions)} and 'end'"
            )
        return prompts.positions[pos]
    width = prompts.clean.shape[1]
    if not isinstance(pos, int) or not 0 <= pos < width:
        raise IndexError(f"position {pos!r} out of range: prompts are {width} tokens wide (0..{width - 1})")
    return torch.full((len(prompts),), pos, dtype=torch.long)


def _mask(
    specs: Sequence[_Spec], prompts: PromptSet, width: int, units: int, device
) -> torch.Tensor:  # [k * n, pos, units]
    n = len(prompts)
    mask = torch.zeros(len(specs) * n, width, units, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    for j, spec in enumerate(specs):
        unit = slice(None) if spec.unit is None else spec.unit
        pos = _position_index(prompts, spec.pos)
        if pos is None:
            mask[j * n : (j + 1) * n, :, unit] = True
        else:
            mask[j * n + rows, pos.to(device), unit] = True
    return mask


def _replace(mask: torch.Tensor, donor: torch.Tensor, units: int, width: int) -> Edit:
    """An edit putting ``donor`` (``[batch, pos, units * width]``) where ``mask`` ``[batch, pos, units]`` is set."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xv = x.reshape(*shape[:-1], units, width)
        dv = donor.reshape(*shape[:-1], units, width).to(x.dtype)
        return torch.where(mask[..., None], dv, xv).reshape(shape)

    return edit


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _chunk_size(prompts: PromptSet, batch_size: int | None, max_tokens: int | None, model: Model | None = None) -> int:
    """Interventions per expanded forward: ``batch_size``, else as many as fit ``max_tokens`` rows x positions.

    Default budget: :func:`auto_max_tokens` for the model's device.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size
    width = prompts.clean.shape[1]
    if max_tokens is None:
        max_tokens = auto_max_tokens(model, width) if model is not None else DEFAULT_MAX_TOKENS["cpu"]
    return max(1, max_tokens // (len(prompts) * width))


def auto_max_tokens(model: Model, width: int) -> int:
    """Rows x positions per expanded forward on this model's device.

    CPU: :data:`DEFAULT_MAX_TOKENS` (on one CPU thread batching gains nothing and
    big batches leave the cache). Remote: the GPU budget. CUDA: half of the free
    memory over an estimate of one token's live activations in a block (residual
    copies, MLP hidden, eager attention scores over ``width`` keys); a chunk
    that still runs out of memory is split in two and retried (:func:`_halving`).
    """
    if model.remote:
        return DEFAULT_MAX_TOKENS["cuda"]
    device = model.device
    if device.type != "cuda":
        return DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    free, _ = torch.cuda.mem_get_info(device)
    a = model.adapter
    size = next(model.hf.parameters()).element_size()
    per_token = size * (8 * a.d_model + 2 * a.d_mlp + 3 * a.n_heads * width)
    return max(width, int(0.5 * free / per_token))


def _halving(run: Callable[[list[int]], None], chunk: list[int]) -> None:
    """``run(chunk)``; on an out-of-memory error split the chunk in two and run the halves."""
    try:
        run(chunk)
    except torch.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(chunk) // 2
        _halving(run, chunk[:half])
        _halving(run, chunk[half:])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _runs(model: Model, prompts: PromptSet, direction: str):
    """``(base tokens, donor tokens)``: the run that is patched and the run patched from."""
    clean, corrupt = prompts.clean.to(model.device), prompts.corrupt.to(model.device)
    return (clean, corrupt) if direction == "noising" else (corrupt, clean)


@torch.no_grad()
def run_specs(
    model: Model,
    prompts: PromptSet,
    specs: Sequence[_Spec],
    donor_cache: dict[tuple[str, int], torch.Tensor],
    base_tokens: torch.Tensor,
    base_cache: dict[tuple[str, int], torch.Tensor],
    *,
    metric: Metric,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "patching",
) -> torch.Tensor:
    """Metric ``[len(specs), n]`` with each spec's site set to ``donor_cache`` values, batched by layer.

    ``base_cache`` is the unpatched run's :func:`baseline` cache: ``("resid_pre", layer)``
    (the block input ``[n, pos, d_model]``) for every patched layer, and where
    present ``("attn_full" | "head" | "attn_proj", layer)``, which let the patched
    layer's attention skip its queries, keys and values (sites after them only).
    """
    n, width = base_tokens.shape
    out = torch.empty(len(specs), n)
    k = _chunk_size(prompts, batch_size, max_tokens, model)
    order: dict[tuple[int, str], list[int]] = {}
    for i, spec in enumerate(specs):
        order.setdefault((spec.layer, spec.site), []).append(i)
    groups = [chunk for key in sorted(order) for chunk in _chunks(order[key], k)]
    end = prompts.end.to(model.device)
    bar = _progress(len(specs), desc, progress)

    def run(chunk: list[int]) -> None:
        chunk_specs = [specs[i] for i in chunk]
        site, layer = chunk_specs[0].site, chunk_specs[0].layer
        m = len(chunk)
        units, w = _units(model, site)
        mask = _mask(chunk_specs, prompts, width, units, model.device)
        donor = donor_cache[(site, layer)]
        donor = donor.repeat(m, *([1] * (donor.ndim - 1)))
        edits = {(site, layer): _replace(mask, donor, units, w)}
        tokens = base_tokens.repeat(m, 1)
        start = _start(base_cache, layer, m)
        attn = None
        if site != "resid_pre" and all((key, layer) in base_cache for key in ATTN_CACHE):
            attn = tuple(base_cache[(key, layer)].repeat(m, 1, 1) for key in ATTN_CACHE)
        logits, _ = forward(model, tokens, end.repeat(m), edits=edits, start=start, attn_cache=attn)
        for j, i in enumerate(chunk):
            out[i] = run_metric(metric, logits[j * n : (j + 1) * n], prompts).cpu()
        bar.update(m)

    for chunk in groups:
        _halving(run, chunk)
    bar.close()
    return out


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer (``nn.Linear``, or GPT-2's transposed ``Conv1D``)."""
    return module.out_features if hasattr(module, "out_features") else module.nf


def _start(base_cache: dict, layer: int, m: int) -> tuple[int, torch.Tensor] | None:
    """Start a forward of ``m`` replicas at ``layer`` from the cached block input (None when not cached)."""
    hidden = base_cache.get(("resid_pre", layer))
    return None if hidden is None else (layer, hidden.repeat(m, 1, 1))


def _layers(model: Model, layers) -> list[int]:
    if layers is None:
        return list(range(model.adapter.n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        model.adapter.check_layer(layer)
    return layers


def _heads(model: Model, heads, layer: int | None = None) -> list[int]:
    if heads is None:
        return list(range(model.adapter.n_heads))
    heads = [heads] if isinstance(heads, int) else list(heads)
    for head in heads:
        model.adapter.check_head(head, layer)
    return heads


def position_map_prompts(prompts: PromptSet) -> PromptSet:
    """The prompts a position-by-position sweep (``positions="each"``) patches.

    Patching absolute positions one at a time compares prompts position by
    position, so every prompt needs the same length *and* the same named positions
    (IO, S1, S2, verb, ...): one group of :meth:`lsa.tasks.PromptSet.aligned`. On
    real tokenizers a length group mixes templates whose names sit at different
    positions, and a name or verb of another token length moves the positions after
    it. All the prompts when they form one group; else the largest group, with a
    warning that says how many prompts it keeps (map each group with
    ``for group in prompts.aligned(): ...``).
    """
    groups = prompts.aligned()
    if len(groups) <= 1:
        return prompts
    kept = groups[0]
    templates = sorted(set(kept.meta["template"])) if "template" in kept.meta else []
    which = (
        f" (template {', '.join(map(str, templates[:3]))}{', ...' if len(templates) > 3 else ''})" if templates else ""
    )
    warnings.warn(
        f"positions='each' patches absolute positions, which mean the same thing only where the prompts' lengths "
        f"and named positions coincide; these {len(prompts)} prompts form {len(groups)} such groups "
        f"(sizes {[len(g) for g in groups]}): patching the largest, {len(kept)} prompts{which}. "
        "To map every group: [activation_patching(model, g, site, positions='each') for g in prompts.aligned()]",
        stacklevel=3,
    )
    return kept


def _token_label(tokenizer, token: int) -> str:
    """A short display form of one token: its text, or its vocabulary entry when it is a byte piece."""
    text = tokenizer.decode([token])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = str(tokenizer.convert_ids_to_tokens(token))
    text = text.strip().replace("\n", "\\n") or repr(text)
    return text if len(text) <= 12 else text[:11] + "…"


def position_labels(prompts: PromptSet, tokenizer, positions: Sequence) -> list[str]:
    """Display labels of a sweep's positions: ``"3:Mary (IO)"``.

    An absolute position gets its index, the first prompt's token there and the
    named positions that every prompt has there (``IO``, ``S1``, ``S2``, ``end``);
    a name stays its name; ``None`` (all positions) is ``"all"``. Without a
    tokenizer, the index and names alone.
    """
    named = {**prompts.positions, "end": prompts.end}
    labels = []
    for pos in positions:
        if pos is None or isinstance(pos, str):
            labels.append("all" if pos is None else pos)
            continue
        names = [name for name, at in named.items() if len(at) and bool((at == pos).all())]
        label = str(pos)
        if tokenizer is not None and len(prompts) and pos < int(prompts.lengths[0]):
            label += f":{_token_label(tokenizer, int(prompts.clean[0, pos]))}"
        labels.append(label + (f" ({'/'.join(names)})" if names else ""))
    return labels


def _positions(prompts: PromptSet, positions) -> list:
    """``None`` -> [None] (all at once); ``"each"`` -> every position; a list of ints / names."""
    if positions is None or positions == "all":
        return [None]
    if positions == "each":
        if not prompts.same_length:
            raise ValueError(
                "positions='each' patches absolute positions, which differ between prompts of different "
                "lengths; split the set with prompts.aligned() (groups whose length and named positions coincide) "
                "or pass named positions (e.g. ['S2', 'end'])"
            )
        return list(range(prompts.clean.shape[1]))
    positions = [positions] if isinstance(positions, (int, str)) else list(positions)
    for pos in positions:
        _position_index(prompts, pos)  # validates
    return positions


def sweep_specs(
    model: Model, prompts: PromptSet, site: str, *, layers=None, heads=None, neurons=None, positions=None
) -> tuple[list[_Spec], tuple[str, ...], dict[str, list]]:
    """The interventions of a sweep plus its grid (dims and axis labels)."""
    _check_site_for_model(model, site)
    layer_list = _layers(model, layers)
    pos_list = _positions(prompts, positions)
    by_pos = pos_list != [None]
    if site == "head":
        head_list = _heads(model, heads)
        specs = [_Spec(site, layer, h, p) for layer in layer_list for h in head_list for p in pos_list]
        dims, axes = ("layer", "head"), {"layer": layer_list, "head": head_list}
    elif site == "neuron":
        if neurons is None:
            neurons = list(range(model.adapter.d_mlp))
        neurons = [neurons] if isinstance(neurons, int) else list(neurons)
        for i in neurons:
            model.adapter.check_neuron(i)
        specs = [_Spec(site, layer, i, p) for layer in layer_list for i in neurons for p in pos_list]
        dims, axes = ("layer", "neuron"), {"layer": layer_list, "neuron": neurons}
    else:
        if heads is not None or neurons is not None:
            raise ValueError(f"site {site!r} has no heads or neurons; use site='head' or site='neuron'")
        specs = [_Spec(site, layer, None, p) for layer in layer_list for p in pos_list]
        dims, axes = ("layer",), {"layer": layer_list}
    if by_pos:
        dims, axes = (*dims, "pos"), {**axes, "pos": pos_list}
    return specs, dims, axes


def specs_frame(specs: Sequence[_Spec], dims: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for s in specs:
        row = {"site": s.site, "layer": s.layer}
        if "head" in dims:
            row["head"] = s.unit
        if "neuron" in dims:
            row["neuron"] = s.unit
        if "pos" in dims:
            row["pos"] = s.pos
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def baseline(
    model: Model,
    prompts: PromptSet,
    tokens: torch.Tensor,
    sites: Iterable[tuple[str, int]] = (),
    attn_layers: Iterable[int] = (),
):
    """Unpatched run: end logits ``[n, d_vocab]`` plus the read sites and every block input (``resid_pre``).

    ``attn_layers``: also read the attention output and the output projection's
    input and output there (for :func:`run_specs` to reuse).
    """
    reads = set(sites)
    if not model.remote:  # remote forwards start at layer 0: no cache to send back and forth
        reads |= {("resid_pre", layer) for layer in range(model.adapter.n_layers)}
        reads |= {(key, layer) for layer in attn_layers for key in ATTN_CACHE}
    return forward(model, tokens.to(model.device), prompts.end.to(model.device), reads=reads)


def activation_patching(
    model: Model,
    prompts: PromptSet,
    site: str = "head",
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    neurons: int | Iterable[int] | None = None,
    positions=None,
    direction: str = "noising",
    metric: Metric | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch one component at a time from the other run and measure the metric.

    Args:
        site: one of :data:`SITES`.
        layers, heads, neurons: which components (default: every layer, every head /
            neuron); ``neurons`` only with ``site="neuron"``.
        positions: ``None`` (all positions at once), ``"each"`` (every position
            separately, for a layer x position map: on the prompts whose length and
            named positions coincide, :func:`position_map_prompts`, which warns when
            it keeps only the largest such group), or a list of absolute
            positions and/or names in ``prompts.positions`` (``"S2"``, ``"end"``),
            each patched on its own (``None`` in the list = all positions).
        direction: ``"noising"`` (clean run, counterfactual activations) or ``"denoising"``.
        metric: ``metric(logits [n, d_vocab], prompts) -> [n]`` at the end position
            (default :func:`lsa.metrics.logit_diff`).
        batch_size: interventions per forward (default: as many as fit ``max_tokens``).

    Returns a :class:`PatchResult` whose ``array`` is ``[layer, head]`` for heads,
    ``[layer, neuron]`` for neurons, ``[layer]`` otherwise, with a trailing
    ``pos`` axis when positions are patched one at a time; then ``meta["pos_labels"]``
    labels that axis with tokens (:func:`position_labels`, e.g. ``"3:Mary (IO)"``)
    and ``meta["n_prompts"]`` / ``meta["n_given"]`` say how many prompts it rests on.

    >>> res = activation_patching(model, prompts, "resid_pre", positions="each")  # doctest: +SKIP
    >>> res.array.shape   # [layer, pos]                                           # doctest: +SKIP
    """
    check_prompts(prompts)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    n_given = len(prompts)
    if positions == "each":
        prompts = position_map_prompts(prompts)
    specs, dims, axes = sweep_specs(
        model, prompts, site, layers=layers, heads=heads, neurons=neurons, positions=positions
    )
    base_tokens, donor_tokens = _runs(model, prompts, direction)
    sites = {(s.site, s.layer) for s in specs}
    attn_layers = {s.layer for s in specs if s.site != "resid_pre"}
    base_logits, base_cache = baseline(model, prompts, base_tokens, attn_layers=attn_layers)
    donor_logits, donor_cache = baseline(model, prompts, donor_tokens, sites)
    base_metric = run_metric(metric, base_logits, prompts).cpu()
    donor_metric = run_metric(metric, donor_logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)
    patched = run_specs(
        model,
        prompts,
        specs,
        donor_cache,
        base_tokens,
        base_cache,
        metric=metric,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc=f"patching {site}",
    )
    return PatchResult(
        components=specs_frame(specs, dims),
        patched=patched,
        clean=clean,
        corrupt=corrupt,
        dims=dims,
        axes=axes,
        direction=direction,
        meta=_sweep_meta(model, prompts, site, axes, n_given),
    )


def _sweep_meta(model: Model, prompts: PromptSet, site: str, axes: dict, n_given: int) -> dict:
    """A sweep's ``meta``: its site, and with a position axis the token labels and the prompts it rests on."""
    meta = {"site": site}
    if "pos" in axes:
        tokenizer = getattr(model, "tokenizer", None)
        meta["pos_labels"] = position_labels(prompts, tokenizer, axes["pos"])
        meta["n_prompts"], meta["n_given"] = len(prompts), n_given
    return meta


# ============================================================== path patching
def _sender_groups(model: Model, senders) -> list[tuple[tuple[int, int], ...]]:
    """Normalise senders: ``(layer, head)`` or a list of them (patched together) per entry."""
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


def _receiver_sites(model: Model, receivers, receiver_input: str) -> dict[int, dict[str, list[int]]]:
    """``{layer: {"q": [heads], "k": [kv heads], "v": [kv heads]}}`` (keys and values per KV group)."""
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(k not in "qkv" for k in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv' (e.g. 'q', 'kv', 'qkv'), got {receiver_input!r}")
    sites: dict[int, dict[str, list[int]]] = {}
    for entry in receivers:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"a receiver head is (layer, head), got {entry!r}")
        layer, head = entry
        model.adapter.check_head(head, layer)
        for kind in kinds:
            unit = head if kind == "q" else model.adapter.kv_head(head)
            units = sites.setdefault(layer, {}).setdefault(kind, [])
            if unit not in units:
                units.append(unit)
    return sites


@torch.no_grad()
def path_patching(
    model: Model,
    prompts: PromptSet,
    senders=None,
    receivers="logits",
    *,
    receiver_input: str = "q",
    direction: str = "noising",
    metric: Metric | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PatchResult:
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

    Steps (noising; denoising swaps the two runs):
      1) run clean and counterfactual prompts, caching every head's output;
      2) rerun the clean prompts with the sender heads' outputs taken from the
         counterfactual run and every other head frozen to its clean output
         (MLPs and norms recomputed); for ``"logits"`` this run's metric is the result;
      3) otherwise record the receiver layers' attention input (``ln1`` output) in
         run 2 and rerun the clean prompts with only the receivers' q / k / v
         computed from it (their projection's output columns replaced).

    Returns a :class:`PatchResult` with one row per sender (``layer``, ``head``;
    ``array`` ``[layer, head]`` when every sender is a single head).
    """
    check_prompts(prompts)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    a = model.adapter
    n_layers, n = a.n_layers, len(prompts)
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ValueError(f"receivers must be 'logits' or a list of (layer, head), got {receivers!r}")
    rsites = {} if to_logits else _receiver_sites(model, receivers, receiver_input)
    last_receiver = n_layers if to_logits else max(rsites)
    if senders is None:
        senders = [(layer, h) for layer in range(last_receiver) for h in range(a.n_heads)]
    groups = _sender_groups(model, senders)

    base_tokens, donor_tokens = _runs(model, prompts, direction)
    width = base_tokens.shape[1]
    head_sites = {("head", layer) for layer in range(n_layers)}
    attn_in = {("attn_in", layer) for layer in rsites}
    base_logits, base_cache = baseline(model, prompts, base_tokens, head_sites | attn_in)
    donor_logits, donor_cache = baseline(model, prompts, donor_tokens, head_sites)
    base_metric = run_metric(metric, base_logits, prompts).cpu()
    donor_metric = run_metric(metric, donor_logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)
    end = prompts.end.to(model.device)
    H, dh = a.n_heads, a.d_head

    k = _chunk_size(prompts, batch_size, max_tokens, model)
    order: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        order.setdefault(min(layer for layer, _ in group), []).append(i)
    chunks = [c for layer in sorted(order) for c in _chunks(order[layer], k)]
    out = torch.empty(len(groups), n)
    bar = _progress(len(groups), "path patching", progress)

    def run(chunk: list[int]) -> None:
        m = len(chunk)
        start = min(layer for layer, _ in groups[chunk[0]])
        tokens = base_tokens.repeat(m, 1)
        ends = end.repeat(m)
        # 2) senders from the donor run, every other head frozen to the base run.
        edits: dict[tuple[str, int], Edit] = {}
        stop = last_receiver if not to_logits else n_layers
        for layer in range(start, min(stop, n_layers)):
            z = base_cache[("head", layer)].reshape(n, width, H, dh).repeat(m, 1, 1, 1)
            dz = donor_cache[("head", layer)].reshape(n, width, H, dh)
            for j, gi in enumerate(chunk):
                for sl, sh in groups[gi]:
                    if sl == layer:
                        z[j * n : (j + 1) * n, :, sh] = dz[:, :, sh]
            frozen = z.reshape(m * n, width, H * dh)
            edits[("head", layer)] = lambda x, frozen=frozen: frozen
        base_start = _start(base_cache, start, m)
        if to_logits:
            logits, _ = forward(model, tokens, ends, edits=edits, start=base_start)
        else:
            reads = [("attn_in", layer) for layer in rsites if layer > start]
            if not reads:  # no receiver after the senders: no path, the base run's metric
                out[chunk] = base_metric
                bar.update(m)
                return
            _, seen = forward(
                model,
                tokens,
                ends,
                edits=edits,
                reads=reads,
                start=base_start,
                stop_after=max(reads),
                logits=False,
            )
            # 3) receivers' q / k / v from the recorded attention inputs; all else recomputed.
            projections = []
            first = min(layer for _, layer in reads)
            for _, layer in reads:
                patched_in = seen[("attn_in", layer)]
                by_module: dict[nn.Module, list[slice]] = {}
                for kind, units in rsites[layer].items():
                    for unit in units:
                        module, cols = a.qkv_columns(model.hf, kind, layer, unit)
                        by_module.setdefault(module, []).append(cols)
                for module, cols_list in by_module.items():
                    # every head's q / k / v from the patched input; only the receivers' columns are used
                    colmask = torch.zeros(_out_features(module), dtype=torch.bool, device=patched_in.device)
                    for cols in cols_list:
                        colmask[cols] = True
                    projections.append((module, layer, patched_in, colmask))
            logits, _ = forward(
                model,
                tokens,
                ends,
                projections=projections,
                start=_start(base_cache, first, m),
            )
        for j, gi in enumerate(chunk):
            out[gi] = run_metric(metric, logits[j * n : (j + 1) * n], prompts).cpu()
        bar.update(m)

    for chunk in chunks:
        _halving(run, chunk)
    bar.close()
    single = all(len(g) == 1 for g in groups)
    if single:
        components = pd.DataFrame([{"site": "head", "layer": g[0][0], "head": g[0][1]} for g in groups])
        dims = ("layer", "head")
        axes = {"layer": sorted({g[0][0] for g in groups}), "head": sorted({g[0][1] for g in groups})}
    else:
        components = pd.DataFrame(
            [{"site": "heads", "senders": ", ".join(f"{lh[0]}.{lh[1]}" for lh in g)} for g in groups]
        )
        dims, axes = ("senders",), {"senders": components["senders"].tolist()}
    return PatchResult(
        components=components,
        patched=out,
        clean=clean,
        corrupt=corrupt,
        dims=dims,
        axes=axes,
        direction=direction,
        method="path patching",
        meta={"site": "head", "receivers": receivers, "receiver_input": None if to_logits else receiver_input},
    )
