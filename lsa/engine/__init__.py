"""One intervention engine: every method of lsa runs the model through :func:`run`.

- :mod:`lsa.engine.plan`: the site table (:data:`SITES`) and the plan of edits and reads
  (:class:`Plan`, :class:`Edit`, :class:`Read`, :class:`Start`, :class:`AttnCache`,
  :class:`Projection`), and its result (:class:`Run`);
- :mod:`lsa.engine.local`: the local executor, torch hooks (cached start, skipped blocks,
  reused attention, early stop): the package's one place that registers hooks;
- :mod:`lsa.engine.traced`: the traced executor, one nnsight trace, for ``model.remote``
  (``True``: NDIF; ``"local"``: its simulation here).

The model's active steering edits (:func:`lsa.steering.steer` keeps them in
``model.steering``) are part of every plan, on both executors.

>>> from lsa.engine import Plan, Read, run                                   # doctest: +SKIP
>>> out = run(model, tokens, Plan(reads=[Read("head", 3)], end=end))         # doctest: +SKIP
>>> out.logits.shape, out[("head", 3)].shape   # [batch, d_vocab], [batch, pos, n_heads * d_head]  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lsa.engine import local, traced
from lsa.engine.plan import SITES, AttnCache, Edit, Plan, Projection, Read, Run, Site, Split, Start

__all__ = ["SITES", "AttnCache", "Edit", "Plan", "Projection", "Read", "Run", "Site", "Split", "Start", "run"]


def run(model, tokens: torch.Tensor, plan: Plan | None = None) -> Run:
    """Run ``plan`` on ``tokens`` ``[batch, pos]`` (default ``Plan(logits="all")``: a plain forward's logits).

    Local models: :func:`lsa.engine.local.run` (``tokens`` on ``model.device``; gradients
    follow the caller's grad mode). Remote models: :func:`lsa.engine.traced.run`. Both give
    the same values for the same plan (``tests/test_engine.py``).
    """
    plan = Plan(logits="all") if plan is None else plan
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    executor = traced if getattr(model, "remote", False) else local
    return executor.run(model, tokens if model.remote else tokens.to(model.device), plan)
