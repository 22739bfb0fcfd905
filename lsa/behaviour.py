"""Task behaviour of a model: per-prompt logit difference, accuracy, top predictions.

>>> frame = score(model, prompts)                 # doctest: +SKIP
>>> summarize(frame)                               # doctest: +SKIP
"""

from __future__ import annotations

import pandas as pd
import torch

from lsa import metrics
from lsa.model import Model
from lsa.tasks import PromptSet, check_tokenizer


@torch.no_grad()
def end_logits(model: Model, prompts: PromptSet, *, corrupt: bool = False, batch_size: int = 64) -> torch.Tensor:
    """Logits at each prompt's last real token ``[n, d_vocab]`` (clean prompts, or the counterfactual ones)."""
    from lsa import engine  # unembeds the end positions only (a remote model sends back just those)

    check_tokenizer(prompts, model.tokenizer, model.name)
    tokens = prompts.corrupt if corrupt else prompts.clean
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts.subset(slice(start, start + batch_size))
        ids = (chunk.corrupt if corrupt else chunk.clean).to(model.device)
        logits = engine.run(model, ids, engine.Plan(end=chunk.end)).logits
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, tokens.shape[-1])


def score(model: Model, prompts: PromptSet, *, batch_size: int = 64, k: int = 3) -> pd.DataFrame:
    """One row per prompt: logit difference (clean and counterfactual), answer probability, top-k predictions."""
    clean = end_logits(model, prompts, batch_size=batch_size)
    corrupt = end_logits(model, prompts, corrupt=True, batch_size=batch_size)
    top = clean.topk(k, dim=-1).indices
    decode = model.tokenizer.decode
    frame = prompts.meta.copy()
    frame["task"] = prompts.task
    frame["language"] = prompts.language
    frame["answer"] = [decode([i]) for i in prompts.answer.tolist()]
    frame["distractor"] = [decode([i]) for i in prompts.distractor.tolist()]
    frame["logit_diff"] = metrics.logit_diff(clean, prompts).numpy()
    frame["logit_diff_corrupt"] = metrics.logit_diff(corrupt, prompts).numpy()
    frame["answer_prob"] = metrics.answer_prob(clean, prompts).numpy()
    frame["correct"] = frame["logit_diff"] > 0
    frame["top1_correct"] = (top[:, 0] == prompts.answer).numpy()
    frame["top_predictions"] = [" | ".join(decode([i]) for i in row) for row in top.tolist()]
    return frame


def summarize(frame: pd.DataFrame, by: tuple[str, ...] = ("task", "language")) -> pd.DataFrame:
    """Accuracy, top-1 accuracy, mean logit difference (clean, counterfactual) and answer probability per group."""
    return (
        frame.groupby(list(by))
        .agg(
            n=("logit_diff", "size"),
            accuracy=("correct", "mean"),
            top1_accuracy=("top1_correct", "mean"),
            logit_diff=("logit_diff", "mean"),
            logit_diff_corrupt=("logit_diff_corrupt", "mean"),
            answer_prob=("answer_prob", "mean"),
        )
        .reset_index()
    )
