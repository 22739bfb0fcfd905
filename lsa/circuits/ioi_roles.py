"""Role heuristics for heads of an IOI circuit (indirect object identification).

Roles are *suggested* (:func:`suggest_roles`) from how a head was found and from
its attention pattern and vocabulary projection on the prompts
(:func:`head_scores`); see :func:`suggest_role` for the rule. The scores read the
IOI positions (IO, S1, S2), and the roles follow Wang et al. (2022) (name movers,
S-inhibition, induction, duplicate-token and previous-token heads) with copy,
copy-suppression and direct heads besides. They are suggestions: set your own
with :meth:`lsa.circuits.Circuit.label`.

Cost: :func:`head_scores` is one captured forward of the prompts (chunked) and
one vocabulary projection per head.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd
import torch

from lsa.circuits.data import LOGITS, Circuit, json_safe
from lsa.model import Model
from lsa.tasks import PromptSet


def _attn_to(pattern: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``pattern [n, heads, q, k]`` at per-prompt ``query`` / ``key`` positions ``[n]`` -> ``[n, heads]``."""
    rows = torch.arange(pattern.shape[0])
    return pattern[rows, :, query, key]


@torch.no_grad()
def attention_scores(pattern: torch.Tensor, prompts: PromptSet) -> pd.DataFrame:
    """Attention-pattern scores of each head from patterns ``[n, layer, head, q, k]`` (or one layer ``[n, head, q, k]``).

    Columns: ``layer``, ``head``, ``end_IO``, ``end_S1``, ``end_S2`` (mean attention from
    the end position to IO / S1 / S2), ``S2_S1`` (duplicate token: S2 -> S1),
    ``S2_S1+1`` (induction: S2 -> the token after S1), ``prev_token`` (mean attention
    from each real position p >= 1 to p - 1). Scores need the IOI positions
    ``IO``, ``S1``, ``S2``; without them they are NaN (``prev_token`` always exists).
    """
    if pattern.ndim == 4:
        pattern = pattern[:, None]
    if pattern.ndim != 5:
        raise ValueError(f"patterns must be [n, layer, head, q, k], got shape {tuple(pattern.shape)}")
    n, n_layers, n_heads, width, _ = pattern.shape
    pattern = pattern.float().cpu()
    pos = {name: p.cpu().long() for name, p in prompts.positions.items()}
    end = prompts.end.cpu().long()
    lengths = prompts.lengths.cpu().long()
    # previous-token score over real positions 1..len-1
    p_idx = torch.arange(1, width)
    prev = pattern[:, :, :, p_idx, p_idx - 1]  # [n, L, H, width-1]
    real = (p_idx[None, :] < lengths[:, None]).float()  # [n, width-1]
    prev_score = (prev * real[:, None, None]).sum((0, 3)) / real.sum().clamp(min=1)
    rows = []
    for layer in range(n_layers):
        pat = pattern[:, layer]
        scores = {"prev_token": prev_score[layer]}
        nan = torch.full((n_heads,), float("nan"))
        if all(name in pos for name in ("IO", "S1", "S2")):
            s1_next = (pos["S1"] + 1).clamp(max=width - 1)
            scores["end_IO"] = _attn_to(pat, end, pos["IO"]).mean(0)
            scores["end_S1"] = _attn_to(pat, end, pos["S1"]).mean(0)
            scores["end_S2"] = _attn_to(pat, end, pos["S2"]).mean(0)
            scores["S2_S1"] = _attn_to(pat, pos["S2"], pos["S1"]).mean(0)
            scores["S2_S1+1"] = _attn_to(pat, pos["S2"], s1_next).mean(0)
        for h in range(n_heads):
            row = {"layer": layer, "head": h}
            for name in ("end_IO", "end_S1", "end_S2", "S2_S1", "S2_S1+1", "prev_token"):
                row[name] = float(scores.get(name, nan)[h])
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def head_scores(
    model: Model, prompts: PromptSet, *, heads: Iterable[tuple[int, int]] | None = None, chunk: int = 32
) -> pd.DataFrame:
    """Attention scores (:func:`attention_scores`) and a copy score for heads on the clean prompts.

    ``copy_score``: for each prompt, the token the head attends to most from the
    end position, z-scored within the head's vocabulary projection at the end
    position (:func:`lsa.lens.write_logits`, frozen final norm), averaged over
    prompts; > 0 means the head promotes what it attends to (copy), < 0 that it
    suppresses it (copy suppression). ``attended_IO``: share of prompts whose most
    attended token is the IO name. One row per head (default: every head).
    """
    from lsa import flow, lens

    a = model.adapter
    heads = [(la, h) for la in range(a.n_layers) for h in range(a.n_heads)] if heads is None else list(heads)
    for la, h in heads:
        a.check_head(h, la)
    n = len(prompts)
    gram = lens.unembed_gram(model)  # the vocabulary's moments, shared by every head
    patterns, copy, attended_io = [], {hh: [] for hh in heads}, {hh: [] for hh in heads}
    for start in range(0, n, chunk):
        part = prompts.subset(slice(start, start + chunk))
        acts = flow.capture(model, part.clean.to(model.device))
        pat = torch.stack([p.float().cpu() for p in acts.pattern], 1)  # [b, L, H, q, k]
        if pat.shape[-1] < prompts.clean.shape[1]:  # subset trims padding; pad back to full width
            pad = prompts.clean.shape[1] - pat.shape[-1]
            pat = torch.nn.functional.pad(pat, (0, pad, 0, pad))
        patterns.append(pat)
        rows = torch.arange(len(part))
        end = part.end.to(model.device)
        final = acts.resid_post[-1][rows.to(model.device), end]  # [b, d_model]
        at_end: dict[int, torch.Tensor] = {}  # layer -> heads' writes at the end position [b, H, d_model]
        for la, h in heads:
            if la not in at_end:
                at_end[la] = flow.head_writes(model, acts, la)[rows.to(model.device), end]
            src = acts.pattern[la][rows.to(model.device), h, end].float()  # [b, k]
            target = part.clean.to(model.device)[rows.to(model.device), src.argmax(-1)]
            copy[(la, h)].append(lens.write_logit_z(model, at_end[la][:, h], final, target, gram=gram).cpu())
            if "IO" in part.positions:
                attended_io[(la, h)].append((src.argmax(-1).cpu() == part.positions["IO"].cpu()).float())
    frame = attention_scores(torch.cat(patterns), prompts)
    frame = frame.set_index(["layer", "head"]).loc[heads].reset_index()
    frame["copy_score"] = [float(torch.cat(copy[hh]).mean()) for hh in heads]
    frame["attended_IO"] = [
        float(torch.cat(attended_io[hh]).mean()) if attended_io[hh] else float("nan") for hh in heads
    ]
    return frame


def effect_sign(effect: float | None, direction: str = "noising") -> int:
    """Whether a head's patching effect supports the answer: ``+1`` supports, ``-1`` opposes, ``0`` unknown.

    The effect is normalised patching (:func:`lsa.patching.path_patching` into the
    logits, or a later step): noising moves the metric towards the counterfactual
    (negative) when it patches a head that carries the behaviour, so there ``effect
    < 0`` supports the answer and ``> 0`` opposes it; denoising is the reverse.
    None, NaN and 0 are unknown.

    >>> effect_sign(-0.4), effect_sign(-0.4, "denoising"), effect_sign(None)
    (1, -1, 0)
    """
    if effect is None or not math.isfinite(float(effect)) or float(effect) == 0.0:
        return 0
    supports = float(effect) < 0 if direction == "noising" else float(effect) > 0
    return 1 if supports else -1


def suggest_role(
    scores: Mapping,
    effect: float | None,
    found_via: str,
    *,
    attention: float = 0.3,
    copy: float = 1.0,
    direction: str = "noising",
    step: int | None = None,
) -> str:
    """A role from how a head was found, the sign of its effect and its scores (a row of :func:`head_scores`).

    Sign first: :func:`effect_sign` says whether the head's patching ``effect``
    *supports* the answer (noising: effect < 0; denoising: > 0), *opposes* it, or is
    unknown (None, NaN, 0). A **negative** role ("negative name mover", "copy
    suppression": heads that push against the answer) needs an effect that opposes
    it; a head that supports the answer, or whose sign is unknown, never gets one,
    whatever its copy score (a supporting head with a negative copy score suppresses
    what it attends to, e.g. S, which helps the answer: it is "direct").

    Rule (``attention``: the least attention share that counts as "attends";
    ``copy``: the least |copy_score|), first match wins:

    1) found through the **logits**: attends most to IO (``end_IO`` the largest of
       end -> IO / S1 / S2 and >= ``attention``): "name mover" if its effect supports
       the answer, "negative name mover" if it opposes it; otherwise
       ``copy_score <= -copy`` and the effect opposes the answer: "copy suppression";
       ``copy_score >= copy``: "copy"; attends most to S1 or S2 (>= ``attention``):
       "direct (attends S)"; else "direct";
    2) found at step 2 (``step`` None: any step) through the **query** of a head that
       writes to the logits: "S-inhibition";
    3) by attention at S2 and elsewhere: ``S2_S1+1`` >= ``attention`` and larger than
       ``S2_S1``: "induction"; ``S2_S1`` >= ``attention``: "duplicate token";
       ``prev_token`` >= ``attention``: "previous token";
    4) else "unclassified".

    >>> suggest_role({"end_IO": 0.1, "copy_score": -2.0}, -0.3, "logits")   # supports: not copy suppression
    'direct'
    >>> suggest_role({"end_IO": 0.1, "copy_score": -2.0}, +0.3, "logits")
    'copy suppression'
    """

    def get(name):
        v = scores.get(name, float("nan"))
        return float("nan") if v is None else float(v)

    if found_via == LOGITS:
        sign = effect_sign(effect, direction)
        end = {name: get(f"end_{name}") for name in ("IO", "S1", "S2")}
        attends_io = not math.isnan(end["IO"]) and end["IO"] >= attention
        if attends_io and all(math.isnan(v) or end["IO"] >= v for v in (end["S1"], end["S2"])) and sign:
            return "name mover" if sign > 0 else "negative name mover"
        c = get("copy_score")
        if not math.isnan(c) and c <= -copy and sign < 0:
            return "copy suppression"
        if not math.isnan(c) and c >= copy:
            return "copy"
        s_max = max((v for v in (end["S1"], end["S2"]) if not math.isnan(v)), default=float("nan"))
        if not math.isnan(s_max) and s_max >= attention and (math.isnan(end["IO"]) or s_max >= end["IO"]):
            return "direct (attends S)"
        return "direct"
    if found_via == "q" and step in (None, 2):
        return "S-inhibition"
    ind, dup, prev = get("S2_S1+1"), get("S2_S1"), get("prev_token")
    if not math.isnan(ind) and ind >= attention and ind > (dup if not math.isnan(dup) else -1):
        return "induction"
    if not math.isnan(dup) and dup >= attention:
        return "duplicate token"
    if not math.isnan(prev) and prev >= attention:
        return "previous token"
    return "unclassified"


def suggest_roles(circuit: Circuit, scores: pd.DataFrame, *, attention: float = 0.3, copy: float = 1.0) -> Circuit:
    """Fill in the role of each head that has none (see :func:`suggest_role`) and keep its scores as evidence."""
    by_head = scores.set_index(["layer", "head"])
    for c in circuit.components:
        if c.kind != "head" or (c.layer, c.index) not in by_head.index:
            continue
        row = by_head.loc[(c.layer, c.index)].to_dict()
        c.evidence = json_safe({**c.evidence, "scores": row})
        if not c.role:
            direction = circuit.evidence.get("parameters", {}).get("direction", "noising")
            via = c.evidence.get("receiver_input", "")
            step = c.evidence.get("step")
            c.role = suggest_role(row, c.effect, via, attention=attention, copy=copy, direction=direction, step=step)
    return circuit
