"""The traced executor: a plan run inside an nnsight trace, and lsa's sites in a trace of yours.

- :class:`Sites` (``model.sites``): every site of :data:`~lsa.engine.plan.SITES` at every layer,
  read, saved and set inside a trace you opened (``with model.trace(tokens):``), heads and key/value
  heads one by one; nnterp's names for the same tensors too.
- :func:`prepare` / :func:`apply`: a plan's edits (the model's active steering first) and reads
  applied inside a trace you opened, site by site in forward order, by the rule both executors
  follow (:class:`~lsa.engine.plan.SiteView`).
- :func:`run`: a plan as one trace of its own, for ``model.remote`` (``True``: NDIF; ``"local"``: its
  simulation here). Every layer runs (a cached start would travel both ways, and gives the same
  values); only the reads (or their reductions), the requested logits (or their reduction) and
  gradients come back.

Gotcha (nnsight): a trace reaches modules in forward order, once. Read or set sites in the order the
forward computes them (:attr:`~lsa.engine.plan.Site.rank` within a block, then the next block), and
call :func:`apply` before touching any site at or after the plan's first one.
"""

from __future__ import annotations

import inspect
import weakref

import nnsight
import torch

from lsa.engine.plan import (
    SITES,
    Capabilities,
    Edit,
    Layout,
    Plan,
    Run,
    SiteView,
    check,
    given_head_edits,
    locate,
    resolve,
    units,
)

__all__ = ["CAPABILITIES", "NNTERP", "Prepared", "SiteAccess", "Sites", "apply", "envoy", "prepare", "run"]

# One trace per forward, every layer computed, nothing kept between traces; on NDIF a GPU's batch.
CAPABILITIES = Capabilities(
    start=False, reuse_cache=False, skip_attention=False, split=False, autograd=False, weights=False, max_tokens=16384
)

# nnterp's names (StandardizedTransformer) for the same tensors. Its ``attentions_output`` / ``mlps_output``
# are the attention / MLP modules' outputs; here they are the writes to the residual stream, which equal
# those outputs except where the family adds the residual inside the module (BLOOM) or normalises the
# output after it (Gemma 3's sandwich norms).
NNTERP = {
    "layers_input": "resid_pre",
    "layers_output": "resid_post",
    "attentions_input": "attn_in",
    "attentions_output": "attn_out",
    "mlps_output": "mlp_out",
    "attention_probabilities": "pattern",
    "token_embeddings": "embed",
}


def envoy(root, adapter, part: str, layer: int | None = None):
    """The envoy of an adapter part (or ``"block"``) at ``layer``, from the nnsight model ``root``."""
    if part == "block":
        adapter.check_layer(layer)
        path = f"{adapter.layout.blocks}.{layer}"
    else:
        path = adapter.path(part, None if part in ("embed", "final_norm", "unembed") else layer)
    return _walk(root, path)


def _walk(root, path: str):
    for piece in path.split("."):
        root = root[int(piece)] if piece.isdigit() else getattr(root, piece)
    return root


class _Point:
    """One module side a trace visits, and the sites there: ``(site, view, edit functions, read)`` in order."""

    def __init__(self, module, layer: int, side: str, index: int):
        self.module, self.layer, self.side, self.index = module, layer, side, index
        self.sites: list[tuple] = []
        self.keeps_block_input = False

    def tensor(self):
        raw = self.module.input if self.side == "input" else self.module.output
        return raw, (raw[self.index] if isinstance(raw, tuple) else raw)

    def put(self, raw, y):
        """Set the module's side to ``raw`` holding ``y``; returns what was set."""
        new = (*raw[: self.index], y, *raw[self.index + 1 :]) if isinstance(raw, tuple) else y
        if self.side == "input":
            self.module.input = new
        else:
            self.module.output = new
        return new


class Prepared:
    """A plan looked up for a trace: its points in forward order, with envoys, tensors and functions only (no lsa
    :class:`~lsa.model.Model` travels with a remote request). :meth:`apply` runs it inside the trace."""

    def __init__(self, model, plan: Plan, layout: Layout):
        edits = resolve(model, [*given_head_edits(plan, layout), *check(model, plan, CAPABILITIES)], layout)
        edits += [Edit("mlp_out", layer, torch.zeros_like) for layer in plan.idle_mlps]
        self.stop_after = plan.stop_after
        fns: dict[tuple[str, int], list] = {}
        for e in edits:
            fns.setdefault((e.site, e.layer), []).append(e.fn)
        reads = {(r.site, r.layer): r for r in plan.reads}
        self.points = self._points(model, fns, reads)
        self.projections = self._projections(model, plan, layout)

    @staticmethod
    def _points(model, fns: dict, reads: dict) -> list[tuple[tuple, _Point]]:
        found: dict[tuple, _Point] = {}
        root, adapter = model.nn, model.adapter
        for site, layer in dict.fromkeys([*fns, *reads]):
            part, side, rank = locate(model, site)
            key = (layer, rank, part, side, SITES[site].index)
            point = found.setdefault(key, _Point(envoy(root, adapter, part, layer), layer, side, SITES[site].index))
            point.sites.append((site, SiteView(model, site), fns.get((site, layer), ()), reads.get((site, layer))))
            if site == "resid_mid":
                block = found.setdefault(
                    (layer, 0, "block", "input", 0), _Point(envoy(root, adapter, "block", layer), layer, "input", 0)
                )
                block.keeps_block_input = True
        return sorted(found.items(), key=lambda item: item[0][:2])

    @staticmethod
    def _projections(model, plan: Plan, layout: Layout) -> list[tuple[tuple, tuple]]:
        """Each projection as ``((layer, rank), (envoy, given, mask))``: between the attention input and the heads'
        outputs, the projections of one layer in the order the model defines (and runs) them."""
        if not plan.projections:
            return []
        names = {id(m): (i, name) for i, (name, m) in enumerate(model.hf.named_modules())}
        out = []
        for p in plan.projections:
            order, name = names[id(p.module)]
            out.append(((p.layer, 1.5 + order * 1e-9), (_walk(model.nn, name), layout.cut(p.given), p.mask)))
        return out

    def apply(self, stop=None, into: dict | None = None) -> dict[tuple[str, int], torch.Tensor]:
        """Inside the trace: every point's edits and reads in forward order; returns the values read (saved).

        ``stop``: called once the plan's ``stop_after`` site is visited (a tracer's ``stop``); ``into``: the
        dict to fill (the caller's own, which a stop leaves filled).
        """
        got, block_input = ({} if into is None else into), {}
        steps = [(key, ("site", point)) for key, point in self.points]
        steps += [(key, ("projection", p)) for key, p in self.projections]
        for _, (what, step) in sorted(steps, key=lambda s: s[0][:2]):
            if what == "projection":
                module, given, mask = step
                module.output = torch.where(mask, module(given), module.output)
                continue
            raw, x = step.tensor()
            y = x
            for site, view, fns, read in step.sites:
                y, value = view.visit(y, fns, block_input.get(step.layer))
                if read is not None:
                    got[(site, step.layer)] = value if read.fn is None else read.fn(value)
            if step.keeps_block_input:
                block_input[step.layer] = y
            if y is not x:
                step.put(raw, y)
            if stop is not None and self.stop_after is not None and self.stop_after[1] == step.layer:
                if any(site == self.stop_after[0] for site, *_ in step.sites):
                    nnsight.save(got)
                    stop()
        return nnsight.save(got)


def prepare(model, plan: Plan | None = None) -> Prepared:
    """A plan (default: no edits of its own, the model's active steering alone) ready for :meth:`Prepared.apply` in a
    trace you open. Build it before the trace: it checks the plan, and a remote trace then carries envoys, tensors
    and functions, not the model.

    >>> steered = prepare(model, Plan(reads=[Read("head", 1)]))      # doctest: +SKIP
    >>> with model.trace(tokens):                                    # doctest: +SKIP
    ...     got = steered.apply()          # {("head", 1): [batch, pos, n_heads * d_head]}
    ...     logits = model.nn.output.logits.save()
    """
    plan = Plan(logits=None) if plan is None else plan
    if plan.split is not None:
        raise ValueError("receivers with their own inputs (plan.split) need the local executor: use a local model")
    return Prepared(model, plan, Layout(None, 0, plan.rows))


def apply(model, plan: Plan | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """Inside a trace you opened: apply ``plan``'s edits, the model's active steering first (inside
    :func:`lsa.steering.steer`), and return its reads (saved). Equals :func:`prepare` then apply; with
    ``remote=True``, prepare before the trace so that the request carries no model.

    >>> with steer(model, deactivate(mask)), model.trace(tokens):  # doctest: +SKIP
    ...     apply(model)                      # the steering edits, in this trace
    ...     logits = model.nn.output.logits.save()
    """
    return prepare(model, plan).apply()


def run(model, tokens: torch.Tensor, plan: Plan) -> Run:
    """Run ``plan`` on ``tokens`` ``[batch, pos]`` as one trace (see :func:`lsa.engine.run`)."""
    prepared = Prepared(model, plan, Layout.of(plan, tokens, first=0))
    unembed, embed = envoy(model.nn, model.adapter, "unembed", 0), envoy(model.nn, model.adapter, "embed", 0)
    rows = torch.arange(tokens.shape[0])
    end = None if plan.end is None else plan.end.cpu()
    mask = None if plan.attention_mask is None else plan.attention_mask.cpu()
    kwargs = {"use_cache": False, **({} if mask is None else {"attention_mask": mask})}
    if plan.logits == "last" and "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
        kwargs["logits_to_keep"] = 1
    weights = None if plan.logit_grad is None else plan.logit_grad.detach().cpu()
    reduce, ids, out = plan.reduce, tokens.cpu(), None
    with torch.set_grad_enabled(weights is not None), model.trace(ids, **kwargs) as tracer:
        if weights is not None:  # a graph to differentiate even where the weights are frozen
            embed.output.requires_grad_(True)
        got = {}
        prepared.apply(stop=tracer.stop, into=got)
        if weights is not None:
            grads = {}
            with (unembed.output[rows, end] * weights).sum().backward():
                for key in reversed(list(got)):  # gradients arrive in reverse forward order
                    grads[key] = got[key].grad
            got = nnsight.save(grads)
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


class Sites:
    """lsa's sites inside a trace you opened: ``sites.<site>[layer]`` reads one, ``sites.<site>[layer] = x`` sets it.

    Every site of :data:`~lsa.engine.plan.SITES` (``resid_pre``, ``attn_in``, ``q``, ``k``, ``v``,
    ``head``, ``attn_out``, ``resid_mid``, ``pattern``, ``mlp_act``, ``neuron``, ``mlp_out``,
    ``resid_post``, ...), with nnterp's names for the same tensors (:data:`NNTERP`: ``layers_output``
    = ``resid_post``, ...). Values are what the engine's reads and edits see, per unit:

    - ``head[layer]`` ``[batch, pos, n_heads, d_head]``, ``head[layer, h]`` ``[batch, pos, d_head]``
      (the output projection's input, split per head); ``q`` likewise; ``k`` and ``v`` per key/value head
      ``[batch, pos, n_kv_heads, d_head]`` (before rotary);
    - ``neuron[layer]`` / ``mlp_act[layer]`` ``[batch, pos, d_mlp]``, ``neuron[layer, i]`` ``[batch, pos]``;
    - ``pattern[layer]`` ``[batch, n_heads, q, k]``, ``pattern[layer, h]`` ``[batch, q, k]`` (read only);
    - the rest ``[batch, pos, d_model]``; ``resid_mid`` is the block's input plus the attention write
      (setting it changes the write).

    Set a whole site or one unit (``sites.head[2, 1] = z``). Read and set in forward order (nnsight reaches
    each module once): what a site read keeps, a set of the same site in the same trace reuses. Take the
    accessor before the trace (``sites = model.sites``): a remote request then carries envoys, not the model.

    >>> sites = model.sites                                          # doctest: +SKIP
    >>> with model.trace(corrupt):                                   # doctest: +SKIP
    ...     donor = sites.head[1].save()                             # [batch, pos, n_heads, d_head]
    >>> with model.trace(clean):                                     # doctest: +SKIP
    ...     sites.head[1, 3] = donor[:, :, 3]                        # head 1.3 patched
    ...     logits = sites.logits.save()
    """

    def __init__(self, model):
        self._root, self._adapter = model.nn, model.adapter
        self._views = {
            name: SiteView(model, name)
            for name in SITES
            if name not in _UNDEFINED.get(model.adapter.parallel_residual, ())
        }
        self._units = {name: units(model, name) for name in SITES}
        self._owner, self._seen = None, {}

    def __getattr__(self, name: str) -> SiteAccess:
        site = NNTERP.get(name, name)
        if site not in SITES or name.startswith("_"):
            raise AttributeError(f"no site {name!r}; sites: {', '.join(SITES)}; nnterp's names: {', '.join(NNTERP)}")
        if site not in self._views:
            raise AttributeError(
                f"{site} is undefined for a parallel-residual model (attention and MLP read one residual)"
            )
        return SiteAccess(self, site)

    @property
    def logits(self) -> torch.Tensor:
        """The model's logits ``[batch, pos, d_vocab]`` (nnterp's ``logits``)."""
        return self._root.output.logits

    def __getstate__(self) -> dict:  # a remote request carries no values of an earlier trace
        return {**self.__dict__, "_owner": None, "_seen": {}}

    def _state(self) -> dict:
        """What this trace's invoke has reached so far, by ``(layer, part, side, index)`` (reset for each invoke)."""
        from nnsight.intervention.interleaver import Mediator

        mediator = Mediator.current("lsa's sites")
        if self._owner is None or self._owner() is not mediator:
            self._owner, self._seen = weakref.ref(mediator), {}
        return self._seen

    def _tensor(self, part: str, side: str, index: int, layer: int):
        """``(envoy, raw input or output, the tensor at index)``, reached once per invoke."""
        seen, key = self._state(), (layer, part, side, index)
        if key not in seen:
            found = envoy(self._root, self._adapter, part, layer)
            raw = found.input if side == "input" else found.output
            seen[key] = (found, raw, raw[index] if isinstance(raw, tuple) else raw)
        return seen[key]

    def _block_input(self, site: str, layer: int):
        return self._tensor("block", "input", 0, layer)[2] if site == "resid_mid" else None


_UNDEFINED = {True: ("resid_mid",)}  # sites a parallel-residual model has no tensor for
_UNIT_SITES = ("head", "q", "k", "v", "neuron", "mlp_act", "pattern")  # sites indexed [layer, unit]


class SiteAccess:
    """One site at every layer inside a trace (:class:`Sites`): ``[layer]``, ``[layer, unit]``, get and set."""

    def __init__(self, sites: Sites, site: str):
        self.sites, self.site = sites, site
        self.n_units, self.width = sites._units[site]
        if site == "pattern":
            self.n_units = sites._adapter.n_heads
        self.has_units = site in _UNIT_SITES

    def __repr__(self) -> str:
        return f"<site {self.site}: {SITES[self.site].doc}>"

    def _where(self, layer: int) -> tuple:
        adapter = self.sites._adapter
        adapter.check_layer(layer)
        wanted = {"first": 0, "last": adapter.n_layers - 1}.get(SITES[self.site].layers)
        if wanted is not None and layer != wanted:
            raise IndexError(f"site {self.site!r} exists at layer {wanted} only, got {layer}")
        part = adapter.resolve_part(SITES[self.site].part)
        return part, SITES[self.site].side, SITES[self.site].index

    def _unit(self, unit: int) -> int:
        if not self.has_units:
            raise IndexError(f"{self.site} has no units: index it by layer alone")
        if not isinstance(unit, int) or not 0 <= unit < self.n_units:
            raise IndexError(f"{self.site} has {self.n_units} unit(s) per layer (0..{self.n_units - 1}); got {unit!r}")
        return unit

    def __getitem__(self, key):
        layer, unit = key if isinstance(key, tuple) else (key, None)
        part, side, index = self._where(layer)
        block_input = self.sites._block_input(self.site, layer)  # reached first: the block's input comes first
        value = self.sites._views[self.site].get(self.sites._tensor(part, side, index, layer)[2], block_input)
        if unit is None:
            return value.unflatten(-1, (self.n_units, self.width)) if self.width > 1 and self.has_units else value
        if self.site == "pattern":
            return value[:, self._unit(unit)]
        return value[..., self._unit(unit) * self.width : (unit + 1) * self.width].squeeze(-1)

    def __setitem__(self, key, new: torch.Tensor) -> None:
        layer, unit = key if isinstance(key, tuple) else (key, None)
        if not SITES[self.site].editable:
            raise ValueError(f"site {self.site!r} can be read, not set")
        part, side, index = self._where(layer)
        view, block_input = self.sites._views[self.site], self.sites._block_input(self.site, layer)
        module, raw, x = self.sites._tensor(part, side, index, layer)
        value = view.get(x, block_input)
        if unit is not None:
            cols = slice(self._unit(unit) * self.width, (unit + 1) * self.width)
            new = torch.cat(
                [value[..., : cols.start], new.reshape(*value.shape[:-1], -1).to(value), value[..., cols.stop :]], -1
            )
        y = view.put(x, new.reshape(value.shape).to(value.dtype), block_input)
        raw = _Point(module, layer, side, index).put(raw, y)
        self.sites._state()[(layer, part, side, index)] = (module, raw, y)
