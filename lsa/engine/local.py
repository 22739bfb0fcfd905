"""The local executor: a plan run as one forward of ``model.hf`` with plain torch hooks.

This module is the package's one place that registers hooks (:func:`attach`). Speed:
a :class:`~lsa.engine.plan.Start` skips the blocks before it (their ``forward`` is
replaced by a pass-through for the run; masks, rotary and alibi terms are still
built by the model itself), an :class:`~lsa.engine.plan.AttnCache` spares the start
layer's queries, keys and values, ``stop_after`` ends the forward once its site is
read, and ``logits="end"`` runs the final norm and unembedding on the end rows alone.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from lsa.engine.plan import (
    SITES,
    AttnCache,
    Capabilities,
    Layout,
    Plan,
    Run,
    SiteView,
    check,
    given_head_edits,
    locate,
    resolve,
)

__all__ = ["CAPABILITIES", "LocalRun", "attach", "attached", "hidden_in", "returns_tuple", "run"]

# The local executor can do everything a plan asks; its batches fit the device (lsa.sweeps.auto_max_tokens).
CAPABILITIES = Capabilities(start=True, reuse_cache=True, skip_attention=True, split=True, autograd=True, weights=True)


class _Stop(Exception):
    """Raised by a hook to end a forward early (nothing after it is needed)."""


def attach(module: nn.Module, side: str, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn`` on a ``side`` of ``module``: ``"input"``: ``fn(module, args, kwargs)`` before its forward
    (returns ``None`` or new ``(args, kwargs)``); ``"output"``: ``fn(module, args, output)`` after it (``None`` or
    a new output)."""
    if side == "input":
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    if side == "output":
        return module.register_forward_hook(fn)
    raise ValueError(f"side must be 'input' or 'output', got {side!r}")


@contextlib.contextmanager
def attached(hooks: Sequence[tuple[nn.Module, str, Callable]]):
    """Hooks ``(module, side, fn)`` in place for the block, removed on exit (also on error)."""
    handles = []
    try:
        for module, side, fn in hooks:
            handles.append(attach(module, side, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def returns_tuple(model, part: str = "blocks") -> bool:
    """Whether this model's blocks (``part="blocks"``) or attention modules (``"attn"``) return a tuple.

    Probed once per model with a one-token forward (kept in ``model.adapter.probed``).
    """
    hf = model.hf
    seen = model.adapter.probed
    if part not in seen:
        module = model.adapter.block(hf, 0) if part == "blocks" else model.adapter.module(hf, part, 0)

        def probe(module, args, output):
            seen[part] = isinstance(output, tuple)
            raise _Stop

        with attached([(module, "output", probe)]), torch.no_grad(), contextlib.suppress(_Stop):
            hf.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
    return seen[part]


def hidden_in(args, kwargs) -> torch.Tensor:
    """A block's (or module's) first input, given positionally or as ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_in(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


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


def _skip_stubs(model, start: int) -> list[tuple[nn.Module, Callable]]:
    """Blocks ``< start`` pass their input through untouched (their work is taken from a cache)."""
    if start == 0:
        return []
    blocks = model.adapter.blocks(model.hf)
    as_tuple = returns_tuple(model, "blocks")

    def stub(*args, **kwargs):
        h = hidden_in(args, kwargs)
        return (h, None) if as_tuple else h

    return [(blocks[i], stub) for i in range(start)]


def _attn_stub(model, layer: int, cache) -> tuple[nn.Module, Callable]:
    """Attention at ``layer`` from a cache: ``full - proj + o_proj(z)`` (o_proj's hooks, hence its edits, still run)."""
    as_tuple = returns_tuple(model, "attn")
    o_proj = model.module("o_proj", layer)

    def stub(*args, **kwargs):
        out = cache.full - cache.proj + o_proj(cache.z)
        return (out, None) if as_tuple else out

    return model.module("attn", layer), stub


def _given_heads_stub(model, layer: int, z: torch.Tensor) -> tuple[nn.Module, Callable]:
    """Attention at ``layer`` from given heads' outputs ``z``: ``o_proj(z)`` (its hooks, hence edits, still run).

    BLOOM's attention module adds the residual (its second input) to the projection's output itself.
    """
    as_tuple = returns_tuple(model, "attn")
    o_proj = model.module("o_proj", layer)
    adds_residual = model.adapter.layout.family == "bloom"

    def stub(*args, **kwargs):
        out = o_proj(z)
        if adds_residual:
            out = (args[1] if len(args) > 1 else kwargs["residual"]) + out
        return (out, None) if as_tuple else out

    return model.module("attn", layer), stub


def _idle_mlp_stub(model, layer: int) -> tuple[nn.Module, Callable]:
    """An MLP that writes nothing: its output is zero (BLOOM's MLP returns the residual it is given)."""
    adds_residual = model.adapter.layout.family == "bloom"

    def stub(*args, **kwargs):
        if adds_residual:
            return args[1] if len(args) > 1 else kwargs["residual"]
        return torch.zeros_like(hidden_in(args, kwargs))

    return model.module("mlp", layer), stub


def _split(model, split) -> tuple[list[tuple[nn.Module, str, Callable]], list[tuple[nn.Module, Callable]]]:
    """Hooks and module stubs that give each receiver its own input (:class:`~lsa.engine.plan.Split`).

    The block's input is kept as the forward reaches it; each query / key / value projection is
    replaced for the run by one that makes its output head by head from
    ``ln1(inputs(layer, kind, x))`` and that head's columns of the projection (so the block's own
    norm output is never projected); the MLP's norm and the final norm take their receiver's input
    instead of theirs.
    """
    a, hf = model.adapter, model.hf
    resid: dict[int, torch.Tensor] = {}
    hooks, stubs = [], []
    for layer in range(a.n_layers):
        hooks.append((a.block(hf, layer), "input", partial(_keep_input, resid, layer)))
        norm = a.module(hf, "ln1", layer)
        for module, (width, parts) in _qkv_parts(model, layer).items():
            stubs.append((module, partial(_split_qkv, split, norm, layer, parts, resid, width)))
        hooks.append((a.module(hf, "ln2", layer), "input", partial(_split_input, split, layer, "mlp")))
    hooks.append((model.module("final_norm"), "input", partial(_split_input, split, a.n_layers, "logits")))
    return hooks, stubs


def _keep_input(store: dict, layer: int, module, args, kwargs) -> None:
    store[layer] = hidden_in(args, kwargs)


def _split_input(split, layer: int, kind: str, module, args, kwargs):
    """A norm's input replaced by its one receiver's: ``inputs(layer, kind, x)[:, :, 0]``."""
    return _with_hidden_in(args, kwargs, split.inputs(layer, kind, hidden_in(args, kwargs))[:, :, 0])


def _qkv_parts(model, layer: int) -> dict[nn.Module, tuple[int, list]]:
    """Per query / key / value projection module: its output width and, per kind it makes,
    ``(kind, columns [n, d_head], weight [n, d_head, d_model], bias)``; ``columns`` index the module's
    output, one row per head of that kind (key/value heads for k and v)."""
    a, hf = model.adapter, model.hf
    parts: dict = {}
    for kind in "qkv":
        n = a.n_heads if kind == "q" else a.n_kv_heads
        found = [a.qkv_columns(hf, kind, layer, head) for head in range(n)]
        module = found[0][0]
        cols = torch.stack([torch.arange(s.start, s.stop) for _, s in found]).to(module.weight.device)
        weight = module.weight.T if a.layout.conv1d else module.weight  # [out, d_model]
        bias = None if module.bias is None else module.bias[cols]
        parts.setdefault(module, (weight.shape[0], []))[1].append((kind, cols, weight[cols], bias))
    return parts


def _split_qkv(split, norm: nn.Module, layer: int, parts, resid: dict, width: int, *args, **kwargs):
    """A projection's output ``[batch, pos, width]`` made head by head from each head's own normed input."""
    index, values = [], []
    for kind, cols, weight, bias in parts:
        x = norm.forward(split.inputs(layer, kind, resid[layer]))  # [batch, pos, n, d_model]
        y = torch.einsum("bpnd,ned->bpne", x.to(weight.dtype), weight)
        if bias is not None:
            y = y + bias
        index.append(cols.reshape(-1))
        values.append(y.reshape(*y.shape[:2], -1))
    y = torch.cat(values, -1)
    out = y.new_empty(*y.shape[:2], width)
    return out.index_copy(-1, torch.cat(index), y)


def _module(model, part: str, layer: int) -> nn.Module:
    a, hf = model.adapter, model.hf
    return a.block(hf, layer) if part == "block" else a.module(hf, part, layer)


class LocalRun:
    """One plan run on ``tokens`` with torch hooks: the hooks and module stubs it needs, then one forward.

    State of the run (the values read, each block's input for ``resid_mid``, the sites whose hook
    fired) lives here; :meth:`hooks` and :meth:`stubs` build the pieces, :meth:`forward` runs them.
    """

    def __init__(self, model, tokens: torch.Tensor, plan: Plan, can: Capabilities):
        self.model, self.plan, self.can, self.tokens = model, plan, can, tokens
        edits = check(model, plan, can)
        self.start = plan.start if can.start else None
        self.layout = Layout.of(plan, tokens, self.start.first if self.start is not None else 0)
        given = [] if can.skip_attention else given_head_edits(plan, self.layout)
        self.fns: dict[tuple[str, int], list] = {}
        for e in resolve(model, [*given, *edits], self.layout):
            self.fns.setdefault((e.site, e.layer), []).append(e.fn)
        self.reads = {(r.site, r.layer): r for r in plan.reads}
        self.values: dict[tuple[str, int], torch.Tensor] = {}
        self.block_input: dict[int, torch.Tensor] = {}
        self.fired: set = set()
        # one pair per run: the split's hooks keep each block's input for its stubs
        self.split = _split(model, plan.split) if plan.split is not None else ([], [])

    def hooks(self) -> list[tuple[nn.Module, str, Callable]]:
        """Every hook of the run, in the order they must be registered."""
        model, plan, start = self.model, self.plan, self.start
        blocks = model.adapter.blocks(model.hf)
        hooks = []
        if start is not None:  # first in line, so edits at the start block see the fed input
            fed = self.layout.take(start.hidden)
            hooks.append((blocks[start.layer], "input", lambda m, args, kwargs: _with_hidden_in(args, kwargs, fed)))
        if plan.logit_grad is not None:  # a graph to differentiate even where the weights are frozen
            hooks.append((model.module("embed"), "output", lambda m, args, out: out.detach().requires_grad_()))
        stop = [plan.stop_after] if plan.stop_after and plan.stop_after not in {*self.fns, *self.reads} else []
        for key in [*self.fns, *sorted(set(self.reads) - set(self.fns)), *stop]:  # the stop's site raises from a hook
            part, side, _ = locate(model, key[0])
            module = model.module(part) if part in ("embed", "final_norm") else _module(model, part, key[1])
            hooks.append((module, side, self._site_hook(key, side)))
        for layer in sorted({layer for site, layer in [*self.fns, *self.reads] if site == "resid_mid"}):
            # after the site hooks, so that the kept block input holds any resid_pre edit of the same block
            hooks.append((blocks[layer], "input", partial(_keep_input, self.block_input, layer)))
        hooks += self.split[0]  # after the edits, so that the receivers read the edited residual stream
        for p in plan.projections:
            proj = p.module(self.layout.cut(p.given))  # before the hook is in place
            hooks.append(
                (p.module, "output", lambda m, args, out, proj=proj, mask=p.mask: torch.where(mask, proj, out))
            )
        return hooks

    def _site_hook(self, key: tuple[str, int], side: str) -> Callable:
        """The hook of one ``(site, layer)``: its edits in order, then its read, then maybe the stop."""
        site, layer = key
        view, fns, read = SiteView(self.model, site), self.fns.get(key, ()), self.reads.get(key)
        stop, index, is_block = self.plan.stop_after == key, SITES[site].index, SITES[site].part == "block"

        def apply(x: torch.Tensor) -> torch.Tensor:
            if key in self.fired:
                raise RuntimeError(
                    f"the module holding {site} at layer {layer} ran twice in one forward; the adapter's modules "
                    "must be called exactly once per block (a module shared between layers cannot be hooked per layer)"
                )
            self.fired.add(key)
            y, value = view.visit(x, fns, self.block_input.get(layer))
            if read is not None:
                self.values[key] = value if read.fn is None else read.fn(value)
            if stop:
                raise _Stop
            return y

        if side == "input":

            def input_hook(module, args, kwargs):
                x = hidden_in(args, kwargs) if is_block else args[0]
                y = apply(x)
                if y is x:
                    return None
                return _with_hidden_in(args, kwargs, y) if is_block else ((y, *args[1:]), kwargs)

            return input_hook

        def output_hook(module, args, output):
            as_tuple = isinstance(output, tuple)
            x = output[index] if as_tuple else output
            y = apply(x)
            if y is x:
                return None
            return (*output[:index], y, *output[index + 1 :]) if as_tuple else y

        return output_hook

    def stubs(self) -> list[tuple[nn.Module, Callable]]:
        """Modules whose forward the run replaces: skipped blocks, idle MLPs, split projections, given heads."""
        model, plan, start = self.model, self.plan, self.start
        stubs = _skip_stubs(model, start.layer if start else 0)
        stubs += [_idle_mlp_stub(model, layer) for layer in plan.idle_mlps]
        stubs += self.split[1]
        if self.can.skip_attention:
            for layer, z in sorted(plan.given_heads.items()):
                stubs.append(_given_heads_stub(model, layer, self.layout.take(z)))
        if start is not None and start.attn is not None:
            cached = AttnCache(*(self.layout.take(t) for t in (start.attn.full, start.attn.z, start.attn.proj)))
            stubs.append(_attn_stub(model, start.layer, cached))
        return stubs

    def arguments(self) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The forward's tokens, end positions and keyword arguments (those of the recomputed positions alone
        where the start reuses the cache)."""
        model, plan, start = self.model, self.plan, self.start
        kwargs = {"use_cache": plan.keep_cache}
        if plan.keep_cache:  # full layers, also where the model slides a window: a later run needs every position
            from transformers import DynamicCache

            kwargs[_cache_argument(model)] = DynamicCache()
        if plan.attention_mask is not None:
            kwargs["attention_mask"] = plan.attention_mask.to(self.tokens.device)
        if start is None or not start.reuses_cache():
            return self.tokens, plan.end, kwargs
        if plan.attention_mask is not None:
            raise ValueError("a reused cache needs right-padded prompts without an attention mask")
        last = model.adapter.n_layers - 1 if plan.stop_after is None else plan.stop_after[1]
        attends = [  # the layers whose attention runs, hence reads the cache
            i
            for i in range(start.layer, last + 1)
            if not (i in plan.given_heads and self.can.skip_attention) and not (i == start.layer and start.attn)
        ]
        recompute = _positions_alone if isinstance(start.first, torch.Tensor) else _suffix
        return recompute(model, self.tokens, plan.end, kwargs, start, self.layout, attends)

    def forward(self) -> Run:
        model, plan = self.model, self.plan
        if self.start is not None or (plan.given_heads and self.can.skip_attention):  # probe before any hook
            returns_tuple(model, "blocks")
            returns_tuple(model, "attn")
        hooks, stubs = self.hooks(), self.stubs()
        tokens, end, kwargs = self.arguments()
        grad = plan.logit_grad is not None
        with (
            attached(hooks),
            _stubbed(stubs),
            _attention(model, plan),
            torch.set_grad_enabled(torch.is_grad_enabled() or grad),
        ):
            try:
                logits = _logits(model, plan, tokens, end, kwargs)
            except _Stop:  # with keep_cache: the layers up to the stop hold this run's keys and values
                return Run(None, self.values, _kept(model, plan, kwargs))
        cache = _kept(model, plan, kwargs)
        if plan.keep_cache and logits is not None and plan.logits not in ("end", None):
            raise ValueError("keep_cache=True needs logits='end' or None")
        return self._finish(logits, tokens, cache)

    def _finish(self, logits, tokens, cache) -> Run:
        plan, values = self.plan, self.values
        if plan.logit_grad is not None:
            keys = list(values)
            loss = (logits * plan.logit_grad.to(logits.dtype)).sum()
            grads = torch.autograd.grad(loss, [values[k] for k in keys], allow_unused=True)
            values = {k: g.detach() if g is not None else torch.zeros_like(values[k]) for k, g in zip(keys, grads)}
            logits = logits.detach()
        if plan.reduce is not None and logits is not None:
            mask = plan.attention_mask
            logits = plan.reduce(logits, tokens, mask if mask is not None else torch.ones_like(tokens))
        return Run(logits, values, cache)


def run(model, tokens: torch.Tensor, plan: Plan, can: Capabilities = CAPABILITIES) -> Run:
    """Run ``plan`` on ``tokens`` ``[batch, pos]`` (on ``model.device``) with torch hooks; gradients follow the
    caller's grad mode (see :func:`lsa.engine.run`)."""
    return LocalRun(model, tokens, plan, can).forward()


def _kept(model, plan: Plan, kwargs: dict):
    """The keys and values the forward filled in place, where the plan keeps them."""
    if not plan.keep_cache:
        return None
    return [(layer.keys, layer.values) for layer in kwargs[_cache_argument(model)].layers]


def _logits(model, plan: Plan, tokens: torch.Tensor, end, kwargs: dict):
    """The forward itself, and the logits the plan asks for (``None``: none)."""
    if plan.logits in ("end", None):
        hidden = model.hf.base_model(input_ids=tokens, **kwargs)[0]
        if plan.logits is None:
            return None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last, unembed = hidden[rows, end.to(hidden.device)], model.module("unembed")
        if plan.columns is None:
            return unembed(last)
        ids = plan.columns.to(
            last.device
        )  # those rows of the unembedding alone (a 262k vocabulary costs more than a layer)
        bias = None if unembed.bias is None else unembed.bias[ids]
        return nn.functional.linear(last, unembed.weight[ids], bias)
    if plan.logits == "last":
        try:
            return model.hf(input_ids=tokens, **kwargs, logits_to_keep=1).logits[:, -1:]
        except TypeError:
            return model.hf(input_ids=tokens, **kwargs).logits[:, -1:]
    return model.hf(input_ids=tokens, **kwargs).logits


@contextlib.contextmanager
def _attention(model, plan: Plan):
    """The plan's attention implementation for the run (see :class:`~lsa.engine.plan.Plan`), restored after it."""
    config = model.hf.config
    wanted = plan.attention
    if wanted is None and model.device.type == "cuda" and not any(r.site == "pattern" for r in plan.reads):
        wanted = "sdpa"
    old = getattr(config, "_attn_implementation", None)
    if wanted is None or wanted == old or (wanted == "sdpa" and not getattr(model.hf, "_supports_sdpa", False)):
        yield
        return
    config._attn_implementation = wanted
    try:
        yield
    finally:
        config._attn_implementation = old


def _suffix(model, tokens: torch.Tensor, end, kwargs: dict, start, layout: Layout, attends):
    """Tokens, end positions and forward arguments for a run of positions ``>= start.first`` alone.

    The cache holds the cached run's keys and values of every layer, taken to the run's rows and
    replicas at the layers in ``attends`` (the other layers' caches are never read: one row gives
    their length); the model numbers the new positions from the cache's length (rotary, learned and
    alibi positions alike) and masks causally across the cached and the new positions.
    """
    from transformers import DynamicCache

    first, rows = start.first, layout.rows
    reps = tokens.shape[0] // (start.cache[start.layer][0].shape[0] if rows is None else len(rows))
    attends = set(attends)
    cache = DynamicCache()  # full layers: the model masks sliding-window layers itself
    for i, (keys, values) in enumerate(start.cache):
        if i not in attends:
            keys, values = keys[:1, :, :first], values[:1, :, :first]
        else:
            if rows is not None:
                keys, values = keys[rows.to(keys.device)], values[rows.to(values.device)]
            keys, values = keys[:, :, :first], values[:, :, :first]
            if reps > 1:  # else as given: the cache copies it
                keys, values = keys.repeat(reps, 1, 1, 1), values.repeat(reps, 1, 1, 1)
        cache.update(keys, values, i)
    args = {**kwargs, _cache_argument(model): cache, "use_cache": True}
    return tokens[:, first:], None if end is None else end - first, args


def _row_slots(x: torch.Tensor, b: torch.Tensor, at: torch.Tensor, rows) -> torch.Tensor:
    """Keys or values ``x`` ``[rows, kv heads, pos, d]`` at the positions ``at`` ``[batch, slots]`` of the run's
    rows ``b``: ``[batch, kv heads, slots, d]``. ``x`` holds the cached run's rows, of which the batch replicates
    ``rows`` (where given), or the run's batch itself, or rows that the batch replicates."""
    if rows is not None:
        src = rows.to(b.device)[b % len(rows)]
    else:
        src = b if x.shape[0] == len(b) else b % x.shape[0]
    return x[src[:, None], :, at].transpose(1, 2)  # [batch, slots, kv heads, d] -> heads first


def _positions_alone(model, tokens: torch.Tensor, end, kwargs: dict, start, layout: Layout, attends):
    """:func:`_suffix` for a first position per row ``p`` ``[batch]``: each row runs its position ``p[b]`` alone.

    Each row's cache holds its own positions ``< p[b]``, right-aligned in ``max(p)`` slots (left
    padding, masked out; the slots keep the distances between positions, so causal and
    sliding-window masks hold); the new position is numbered ``p[b]`` (``position_ids``; BLOOM's
    alibi counts the unmasked slots). A layer's cache holds the rows :func:`_row_slots` reads.
    """
    from transformers import DynamicCache

    batch, device = tokens.shape[0], tokens.device
    p = start.first.to(device)
    if end is not None and not torch.equal(end.to(device), p):
        raise ValueError("with a first position per row each row runs one position: the end positions must equal it")
    width = int(p.max())
    slots = torch.arange(width, device=device)
    at = (slots[None, :] - (width - p)[:, None]).clamp(min=0)  # [batch, slots]: the position each slot holds
    attends = set(attends)
    b = torch.arange(batch, device=device)
    cache = DynamicCache()
    for i, (keys, values) in enumerate(start.cache):
        if i not in attends:  # never read: one row gives the length
            keys, values = keys[:1, :, :width], values[:1, :, :width]
        else:
            keys, values = (_row_slots(x, b, at, layout.rows) for x in (keys, values))
        cache.update(keys, values, i)
    mask = torch.ones(batch, width + 1, dtype=torch.long, device=device)
    mask[:, :width] = (slots[None, :] >= (width - p)[:, None]).long()
    out = {**kwargs, _cache_argument(model): cache, "use_cache": True, "attention_mask": mask}
    seen = model.adapter.probed
    if "position_ids" not in seen:
        seen["position_ids"] = "position_ids" in inspect.signature(model.hf.base_model.forward).parameters
    if seen["position_ids"]:  # else (BLOOM) the positions come from the mask
        out["position_ids"] = p[:, None]
    return tokens[b, p][:, None], None if end is None else torch.zeros_like(end), out


def _cache_argument(model) -> str:
    """The name under which this model's forward takes a key / value cache (``cache`` in newer releases)."""
    seen = model.adapter.probed
    if "cache" not in seen:
        params = inspect.signature(model.hf.base_model.forward).parameters
        seen["cache"] = "cache" if "cache" in params else "past_key_values"
    return seen["cache"]
