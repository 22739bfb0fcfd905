"""Metrics of task behaviour, read at each prompt's final position.

Logits come either full ``[n, pos, d_vocab]`` (read at ``prompts.end``) or
already gathered at the end position ``[n, d_vocab]``.
"""

from __future__ import annotations

import torch

from lsa.tasks import PromptSet


def end_logits(logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """``[n, pos, vocab]`` -> ``[n, vocab]`` at each prompt's last real token; ``[n, vocab]`` passes through."""
    if logits.ndim == 2:
        return logits
    if logits.ndim != 3 or logits.shape[0] != len(prompts):
        raise ValueError(f"expected logits [n={len(prompts)}, pos, vocab] or [n, vocab], got {tuple(logits.shape)}")
    return logits[torch.arange(logits.shape[0], device=logits.device), prompts.end.to(logits.device)]


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


def normalized(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """(patched - clean) / (clean - corrupt): 0 = clean behaviour, -1 = counterfactual behaviour.

    Works elementwise or on means; pass means for the usual IOI-style summary.
    >>> normalized(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(1.0))
    tensor(-1.)
    """
    denom = clean - corrupt
    if torch.any(denom == 0):
        raise ValueError("clean and counterfactual metrics are equal: the normalised metric is undefined")
    return (patched - clean) / denom
