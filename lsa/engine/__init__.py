"""One intervention engine: every method of lsa runs the model through :func:`run`.

- :mod:`lsa.engine.plan`: the glossary, the site table (:data:`SITES`), the plan of edits and reads
  (:class:`Plan`, :class:`Edit`, :class:`Patch`, :class:`Read`, :class:`Start`, :class:`AttnCache`,
  :class:`Projection`, :class:`Split`), its result (:class:`Run`), what an executor can do
  (:class:`Capabilities`), the rule every executor follows at a site (:class:`SiteView`) and the one
  place positions are sliced (:class:`Layout`);
- :mod:`lsa.engine.local`: the local executor, torch hooks (cached start, skipped blocks, reused
  keys and values, skipped attention, early stop): the package's one place that registers hooks;
- :mod:`lsa.engine.traced`: the traced executor, one nnsight trace, for ``model.remote`` (``True``:
  NDIF; ``"local"``: its simulation here); and lsa's sites in a trace of yours (:class:`Sites`,
  :func:`apply`).

The model's active steering edits (:func:`lsa.steering.steer` keeps them in ``model.steering``) are
part of every plan, on both executors and in :func:`apply`.

Methods ask what the model's executor can do (:func:`can`, :func:`require`), never which executor it
is. :func:`without` turns capabilities off for a block, to compare a method's shortcuts with the plain
computation (``with engine.without("reuse_cache", "skip_attention"): ...``): every shortcut is exact.

>>> from lsa.engine import Plan, Read, run                                   # doctest: +SKIP
>>> out = run(model, tokens, Plan(reads=[Read("head", 3)], end=end))         # doctest: +SKIP
>>> out.logits.shape, out[("head", 3)].shape   # [batch, d_vocab], [batch, pos, n_heads * d_head]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from lsa.engine import local, traced
from lsa.engine.plan import (
    SITES,
    AttnCache,
    Capabilities,
    Edit,
    Layout,
    Patch,
    Plan,
    Projection,
    Read,
    Run,
    Site,
    SiteView,
    Split,
    Start,
    units,
)
from lsa.engine.traced import NNTERP, Prepared, Sites, apply, prepare

__all__ = [
    "NNTERP",
    "SITES",
    "AttnCache",
    "Capabilities",
    "Edit",
    "Layout",
    "Patch",
    "Plan",
    "Prepared",
    "Projection",
    "Read",
    "Run",
    "Site",
    "SiteView",
    "Sites",
    "Split",
    "Start",
    "apply",
    "can",
    "capabilities",
    "prepare",
    "require",
    "run",
    "units",
    "without",
]

_OFF: list[frozenset] = [frozenset()]  # the shortcuts turned off, innermost without() block last
SHORTCUTS = ("start", "reuse_cache", "skip_attention")  # what without() may turn off: exact speed-ups


def capabilities(model) -> Capabilities:
    """What the executor of ``model`` can do now: the local one's, or for a remote model (``model.remote``) the
    traced one's, less what an enclosing :func:`without` turned off."""
    can = traced.CAPABILITIES if getattr(model, "remote", False) else local.CAPABILITIES
    off = _OFF[-1]
    if "start" in off:  # keys and values are reused by a run that starts at a block
        off = off | {"reuse_cache"}
    return dataclasses.replace(can, **{name: False for name in off}) if off else can


def can(model, what: str) -> bool:
    """Whether the executor of ``model`` can do ``what`` (a field of :class:`Capabilities`)."""
    return bool(getattr(capabilities(model), what))


def require(model, what: str, method: str) -> None:
    """Raise, saying what to do, where the executor of ``model`` cannot do ``what`` that ``method`` needs."""
    if not can(model, what):
        raise ValueError(
            f"{method} needs an executor with {what!r} ({_SAY[what]}), which only the local one has: "
            "load the model without remote="
        )


_SAY = {
    "split": "receivers that read their own copy of the residual stream",
    "autograd": "gradients of the run's values in this process",
    "weights": "the model's weights in this process",
}


@contextlib.contextmanager
def without(*shortcuts: str):
    """Inside the block, every run on every model computes without these shortcuts (:data:`SHORTCUTS`):
    ``"start"`` (blocks before a patched layer rerun), ``"reuse_cache"`` (every position recomputed),
    ``"skip_attention"`` (given heads' attention computed, then overwritten). Results are the same."""
    bad = set(shortcuts) - set(SHORTCUTS)
    if bad:
        raise ValueError(f"without() turns off {', '.join(SHORTCUTS)}; got {sorted(bad)}")
    _OFF.append(_OFF[-1] | set(shortcuts))
    try:
        yield
    finally:
        _OFF.pop()


def run(model, tokens: torch.Tensor, plan: Plan | None = None) -> Run:
    """Run ``plan`` on ``tokens`` ``[batch, pos]`` (default ``Plan(logits="all")``: a plain forward's logits).

    Local models: :func:`lsa.engine.local.run` (``tokens`` on ``model.device``; gradients follow the
    caller's grad mode). Remote models: :func:`lsa.engine.traced.run`. Both give the same values for
    the same plan (``tests/test_engine.py``).
    """
    plan = Plan(logits="all") if plan is None else plan
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if getattr(model, "remote", False):
        return traced.run(model, tokens, plan)
    return local.run(model, tokens.to(model.device), plan, capabilities(model))
