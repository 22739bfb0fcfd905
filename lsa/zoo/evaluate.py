"""Held-out evaluation of a zoo model: IOI and past tense, with the bars the zoo must meet.

Prompts come from :func:`lsa.tasks.build` on held-out data only (held-out name
pairs / adverb x verb combinations on train templates, and held-out templates);
the model is run with a plain forward. One row per (language, task, split,
metric) with the value, the bar and whether it is met.

Metrics:
- ``ioi``: ``accuracy`` (logit(IO) > logit(S)), ``logit_diff`` (mean), ``top1`` (IO is the argmax);
- ``past_copy`` English: ``top1`` (the past form is the argmax), ``accuracy`` (past beats present);
  Chinese: ``top1`` (the verb is the argmax), ``accuracy`` (the verb beats another verb);
- ``past_marking`` (Chinese, the prompt ends with the verb): ``top1`` (了 is the argmax
  after a past adverb), ``not_after_habitual`` (了 is not the argmax after a habitual one),
  ``both`` (the two at once, per prompt pair).
"""

from __future__ import annotations

import pandas as pd
import torch

from lsa import metrics, tasks

SPLITS = ("heldout_pairs", "heldout_templates")
# (task, language or None for any, metric) -> minimum value
BARS = {
    ("ioi", None, "accuracy"): 0.95,
    ("ioi", None, "logit_diff"): 3.0,
    ("past_copy", "en", "top1"): 0.90,
    ("past_copy", "en", "accuracy"): 0.95,
    ("past_copy", "zh", "top1"): 0.90,
    ("past_marking", "zh", "top1"): 0.95,
    ("past_marking", "zh", "not_after_habitual"): 0.95,
}


def bar(task: str, language: str, metric: str) -> float | None:
    """The minimum a shipped model must reach on a metric (None when the metric is only reported)."""
    return BARS.get((task, language, metric), BARS.get((task, None, metric)))


@torch.no_grad()
def _end_logits(hf, tokens: torch.Tensor, prompts, batch_size: int = 256) -> torch.Tensor:
    device = next(hf.parameters()).device
    out = []
    for lo in range(0, len(prompts), batch_size):
        logits = hf(tokens[lo : lo + batch_size].to(device)).logits
        end = prompts.end[lo : lo + batch_size].to(device)
        out.append(logits[torch.arange(len(end), device=device), end].float().cpu())
    return torch.cat(out)


def _languages(model) -> list[str]:
    zoo = getattr(model, "meta", {}).get("zoo", {})
    return list(zoo.get("recipe", {}).get("languages", ["en", "zh"]))


def evaluate(model, languages=None, *, n: int = 300, seed: int = 1) -> pd.DataFrame:
    """Held-out scores of a :class:`lsa.Model` (or a Hugging Face model with ``.tokenizer`` given via ``lsa.wrap``).

    ``languages`` defaults to those of the model's zoo recipe (``model.meta["zoo"]``), else both.
    Columns: ``language, task, split, metric, value, bar, meets, n``.
    """
    languages = list(languages) if languages is not None else _languages(model)
    hf, tok = model.hf, model.tokenizer
    rows = []

    def add(lang, task, split, metric, value, count):
        b = bar(task, lang, metric)
        rows.append(
            dict(
                language=lang,
                task=task,
                split=split,
                metric=metric,
                value=float(value),
                bar=b,
                meets=None if b is None else bool(value >= b),
                n=count,
            )
        )

    for lang in languages:
        for split in SPLITS:
            p = tasks.build("ioi", lang, tok, n=n, seed=seed, split=split)
            last = _end_logits(hf, p.clean, p)
            add(lang, "ioi", split, "accuracy", metrics.accuracy(last, p), len(p))
            add(lang, "ioi", split, "logit_diff", metrics.logit_diff(last, p).mean(), len(p))
            add(lang, "ioi", split, "top1", metrics.top1_accuracy(last, p), len(p))

            p = tasks.build("past_tense", lang, tok, n=n, seed=seed, split=split, variant="copy")
            last = _end_logits(hf, p.clean, p)
            add(lang, "past_copy", split, "top1", metrics.top1_accuracy(last, p), len(p))
            add(lang, "past_copy", split, "accuracy", metrics.accuracy(last, p), len(p))
            add(lang, "past_copy", split, "logit_diff", metrics.logit_diff(last, p).mean(), len(p))
            if lang == "zh":
                p = tasks.build("past_tense", lang, tok, n=n, seed=seed, split=split, variant="marking")
                past = _end_logits(hf, p.clean, p).argmax(-1) == p.answer
                habitual = _end_logits(hf, p.corrupt, p).argmax(-1) != p.answer
                add(lang, "past_marking", split, "top1", past.float().mean(), len(p))
                add(lang, "past_marking", split, "not_after_habitual", habitual.float().mean(), len(p))
                add(lang, "past_marking", split, "both", (past & habitual).float().mean(), len(p))
    return pd.DataFrame(rows, columns=["language", "task", "split", "metric", "value", "bar", "meets", "n"])


def probe(languages, n: int = 64, seed: int = 2):
    """A cheap training monitor: held-out-pair IOI accuracy / logit diff and past-tense copy top-1 per language.

    Returns ``monitor(model, tokenizer) -> dict`` for :func:`lsa.zoo.train.train`; prompts are built once.
    """
    cache = {}

    def monitor(hf, tokenizer) -> dict:
        out = {}
        for lang in languages:
            if lang not in cache:
                cache[lang] = (
                    tasks.build("ioi", lang, tokenizer, n=n, seed=seed, split="heldout_pairs"),
                    tasks.build("past_tense", lang, tokenizer, n=n, seed=seed, split="heldout_pairs"),
                )
            ioi, past = cache[lang]
            last = _end_logits(hf, ioi.clean, ioi)
            out[f"ioi_{lang}"] = metrics.accuracy(last, ioi)
            out[f"ioi_top1_{lang}"] = metrics.top1_accuracy(last, ioi)
            out[f"past_{lang}"] = metrics.top1_accuracy(_end_logits(hf, past.clean, past), past)
        return out

    return monitor


def shortfalls(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose bar is missed, with the gap (bar - value)."""
    missed = table[table["meets"] == False].copy()  # noqa: E712 (None means no bar)
    missed["gap"] = missed["bar"] - missed["value"]
    return missed
