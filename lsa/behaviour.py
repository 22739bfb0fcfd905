"""Task behaviour of a model: per-prompt logit difference, accuracy, top predictions.

>>> frame = score(model, prompts)                 # doctest: +SKIP
>>> summarize(frame)                               # doctest: +SKIP
>>> top, answers = predict(model, model.to_tokens("When Mary and John went to the store, John gave a drink to")[0],
...                        {"answer": mary_id, "distractor": john_id})   # one prompt  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

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


@torch.no_grad()
def predict(
    model: Model, tokens: torch.Tensor, answers: Mapping[str, int] | None = None, *, k: int = 10
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model's prediction after one prompt's ``tokens`` ``[pos]``: its top ``k`` tokens and the named answers.

    Returns ``(top, answers)``: ``top`` one row per rank (``rank``, ``token``, ``token_id``, ``logit``,
    ``prob``); ``answers`` one row per entry of ``answers`` (``{name: token id}``, e.g. the answer and the
    distractor) with ``answer`` (the name), the same columns and ``rank`` (1 = the top prediction).
    One forward, the end position unembedded (a remote model sends back just it).
    """
    from lsa import engine

    tokens = torch.as_tensor(tokens).reshape(1, -1).to(model.device)
    logits = engine.run(model, tokens, engine.Plan(end=torch.tensor([tokens.shape[1] - 1]))).logits[0].float().cpu()
    probs = logits.softmax(-1)
    decode = model.tokenizer.decode
    top = logits.topk(min(k, logits.shape[0]))
    ids = top.indices.tolist()
    top_frame = pd.DataFrame(
        {
            "rank": range(1, len(ids) + 1),
            "token": [decode([i]) for i in ids],
            "token_id": ids,
            "logit": top.values.tolist(),
            "prob": probs[ids].tolist(),
        }
    )
    rows = [
        {
            "answer": name,
            "token": decode([int(i)]),
            "token_id": int(i),
            "logit": float(logits[int(i)]),
            "prob": float(probs[int(i)]),
            "rank": int((logits > logits[int(i)]).sum()) + 1,
        }
        for name, i in (answers or {}).items()
    ]
    return top_frame, pd.DataFrame(rows, columns=["answer", "token", "token_id", "logit", "prob", "rank"])
