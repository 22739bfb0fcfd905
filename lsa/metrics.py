"""Metrics of task behaviour, read at each prompt's final position.

Logits come either full ``[n, pos, d_vocab]`` (read at ``prompts.end``) or
already gathered at the end position ``[n, d_vocab]``.
"""

from __future__ import annotations

import dataclasses

import torch

from lsa.tasks import PromptSet


def end_logits(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """``[n, pos, vocab]`` -> ``[n, vocab]`` at each prompt's last real token; ``[n, vocab]`` passes through."""
    if logits.ndim == 2:
        return logits
    if logits.ndim != 3 or logits.shape[0] != len(prompts):
        raise ValueError(f"expected logits [n={len(prompts)}, pos, vocab] or [n, vocab], got {tuple(logits.shape)}")
    return logits[torch.arange(logits.shape[0], device=logits.device), prompts.end.to(logits.device)]


def reads_answer_columns(metric):
    """Mark a metric that reads the end logits at ``prompts.answer`` and ``prompts.distractor`` alone.

    Sweeps then compute only those columns of the unembedding (:func:`answer_columns`),
    with the same values (Gemma 3's full unembedding is 168M multiply-adds per prompt, its 18
    layers 100M per position). Returns the metric.
    """
    metric.answer_columns = True
    return metric


def answer_columns(metric, prompts: PromptSet) -> tuple[torch.Tensor | None, PromptSet]:
    """For a metric marked by :func:`reads_answer_columns`: the vocabulary ids it reads ``[k]`` and
    the prompts with answer and distractor renumbered into them (the metric then reads logits ``[n, k]``).

    ``(None, prompts)`` for any other metric (it gets the full vocabulary).
    """
    if not getattr(metric, "answer_columns", False):
        return None, prompts
    n = len(prompts)
    ids, inverse = torch.unique(torch.cat([prompts.answer.cpu(), prompts.distractor.cpu()]), return_inverse=True)
    return ids, dataclasses.replace(prompts, answer=inverse[:n], distractor=inverse[n:])


@reads_answer_columns
def logit_diff(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """logit(answer) - logit(distractor) per prompt: ``[n]``. IOI: IO - S; tense: expected - other form."""
    last = end_logits(logits, prompts)
    idx = torch.arange(last.shape[0], device=last.device)
    return last[idx, prompts.answer.to(last.device)] - last[idx, prompts.distractor.to(last.device)]


def accuracy(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """Share of prompts where the answer beats the distractor (a scalar)."""
    return (logit_diff(logits, prompts) > 0).float().mean()


def top1_accuracy(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """Share of prompts whose argmax over the whole vocabulary is the answer (a scalar)."""
    last = end_logits(logits, prompts)
    return (last.argmax(-1) == prompts.answer.to(last.device)).float().mean()


def answer_prob(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """Probability of the answer token per prompt: ``[n]``."""
    last = end_logits(logits, prompts).float().softmax(-1)
    return last[torch.arange(last.shape[0], device=last.device), prompts.answer.to(last.device)]


MIN_SPAN = 0.05  # clean - counterfactual must exceed this share of the larger |metric| to normalise by it


def normalized(
    patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, *, min_span: float = MIN_SPAN
) -> torch.Tensor:
    """(patched - clean) / (clean - corrupt): 0 = clean behaviour, -1 = counterfactual behaviour.

    Works elementwise or on means; pass means for the usual IOI-style summary.
    Refuses (ValueError) unless the counterfactual clearly lowers the metric:
    ``clean - corrupt`` must exceed ``min_span * max(|clean|, |corrupt|)``. A gap near
    zero or of the wrong sign would make every normalised effect noise or flip its
    meaning (the adverb counterfactual of Chinese past-tense copying: Gemma 3, clean
    6.02, counterfactual 6.24).

    >>> normalized(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(1.0))
    tensor(-1.)
    """
    clean, corrupt = torch.as_tensor(clean), torch.as_tensor(corrupt)
    denom = clean - corrupt
    floor = min_span * torch.maximum(clean.abs(), corrupt.abs())
    bad = ~(denom > floor)  # NaN counts as bad
    if torch.any(bad):
        c, k, d, f = (float(x[bad].flatten()[0]) if x.ndim else float(x) for x in (clean, corrupt, denom, floor))
        which = "of the wrong sign" if d < 0 else "near zero"
        where = f" ({int(bad.sum())} of {bad.numel()} entries; the first:)" if bad.ndim else ""
        raise ValueError(
            f"refusing to normalise{where}: clean metric {c:.4g}, counterfactual {k:.4g}, so clean - counterfactual "
            f"= {d:.4g} is {which} (it must exceed {min_span:g} x the larger |metric| = {f:.4g}). The "
            f"counterfactual does not flip the metric, so 0 = clean / -1 = counterfactual would mean nothing. Choose "
            f"a counterfactual or variant that flips it (past tense in Chinese: counterfactual='verb', the default "
            f"for copying), check that the model does the task (lsa.behaviour.score), or read the unnormalised "
            f"effect instead"
        )
    return (patched - clean) / denom
