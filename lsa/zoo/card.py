"""Saving a trained zoo model: weights, tokenizer, ``zoo.json`` (machine-readable) and a ``README.md`` card.

``zoo.json`` holds the recipe, seed, parameter count, training time, steps, final
loss, the loss curve and the held-out evaluation table; the card shows the same
numbers as measured, with any missed bar and by how much.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

DESCRIPTIONS = {
    "toy-bilingual": "one model trained on English and Chinese documents of the same world (the paper's multilingual setting)",
    "toy-en": "an English-only model (the paper's GPT-2 small counterpart)",
    "toy-zh": "a Chinese-only model, trained independently (the paper's CPM counterpart)",
}


def _table_markdown(table: pd.DataFrame) -> str:
    lines = ["| language | task | split | metric | value | bar | met | n |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        bar = "" if r.bar is None or pd.isna(r.bar) else f"{r.bar:g}"
        met = "" if r.meets is None or pd.isna(r.meets) else ("yes" if r.meets else "**no**")
        lines.append(f"| {r.language} | {r.task} | {r.split} | {r.metric} | {r.value:.3f} | {bar} | {met} | {r.n} |")
    return "\n".join(lines)


def _curve_markdown(log: list[dict]) -> str:
    keys = [k for k in (log[-1] if log else {}) if k not in ("step", "seconds")]
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    shown = [e for e in log if all(k in e for k in keys)]
    stride = max(1, len(shown) // 12)
    for e in shown[::stride] + ([shown[-1]] if shown and (len(shown) - 1) % stride else []):
        lines.append(f"| {e['step']} | " + " | ".join(f"{e[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def card_text(info: dict, table: pd.DataFrame) -> str:
    """The README.md model card of a saved zoo model."""
    r, t = info["recipe"], info["training"]
    missed = table[table["meets"] == False]  # noqa: E712
    verdict = (
        "All held-out bars are met."
        if missed.empty
        else "Bars missed (value vs bar): "
        + "; ".join(
            f"{m.language} {m.task} {m.split} {m.metric} {m.value:.3f} < {m.bar:g} (short by {m.bar - m.value:.3f})"
            for m in missed.itertuples()
        )
        + "."
    )
    return f"""# {info["name"]}

A toy GPT-2-architecture language model of `lsa`'s zoo: {DESCRIPTIONS.get(info["name"], "a zoo model")}.
Trained here from scratch on a generated corpus of a small world (the names, places,
objects, verbs and templates of `data/tasks/`), in {", ".join(r["languages"])}. It is a
tiny language model of that world, not of natural language.

Load it with `lsa.load_model("{info["name"]}")` (weights: `model.safetensors`, tokenizer:
`tokenizer.json`, loadable offline by `transformers.AutoTokenizer`).

## Architecture
{r["n_layer"]} layers, {r["n_head"]} heads, width {r["n_embd"]}, context {r["seq_len"]} tokens, vocabulary
{info["vocab_size"]} (word-level: every name, verb form, place, object, adverb word and 了 / 会 is one
token; English words carry their leading space), {info["parameters"]:,} parameters, tied embeddings, no dropout.

## Training
Recipe `lsa.zoo.RECIPES["{info["name"]}"]` (seed {r["seed"]}): {t["steps"]} steps of batch {r["batch_size"]} x
{r["seq_len"]} tokens, AdamW (lr {r["lr"]:g}, {r["warmup"]} warm-up steps, linear decay to {r["min_lr_ratio"]:g} x over the last 20%,
weight decay {r["weight_decay"]:g}), one CPU thread, {t["seconds"] / 60:.1f} minutes, final training loss
{t["final_loss"]:.3f}. Corpus: {t["corpus_docs"]:,} documents ({t["corpus_tokens"]:,} tokens), document kinds
{", ".join(f"{k} {v:g}" for k, v in r["mix"].items())} (see `lsa/zoo/corpus.py`).
Held-out templates, held-out name pairs and held-out adverb x verb combinations
(`lsa.splits.is_heldout`) never occur in a document (words of held-out templates do
occur, in short windows of 3-6 words, so no held-out prompt has an unseen token).
Token embeddings start with a shared random component per word class (names, places,
present / past verb forms, ...) and per word (" walks" / " walked" / " walk"), scale
{r["class_init"]:g}: the model still learns every algorithm from data.

Learning curve (held-out name pairs / adverb x verb pairs, 64 prompts each):

{_curve_markdown(t["loss_curve"])}

## Held-out evaluation
Prompts from `lsa.tasks.build` ({info["evaluation_n"]} per row requested; `n` is what was built), held-out
data only. IOI: accuracy = logit(IO) > logit(S), top1 = IO is the argmax. Past tense copy:
English top1 = the past form is the argmax, accuracy = past beats present; Chinese top1 =
the verb is the argmax. Marking (Chinese, prompt ends with the verb): top1 = 了 is the argmax
after a past adverb, not_after_habitual = 了 is not the argmax after a habitual adverb.

{verdict}

{_table_markdown(table)}

Built {info["built"]} with torch {info["torch"]} on {info["machine"]}.
"""


def save(result, path: str | Path, table: pd.DataFrame | None = None, evaluation_n: int = 300) -> Path:
    """Write a :class:`lsa.zoo.TrainResult` and its evaluation ``table`` (None: not evaluated) to ``path``."""
    if table is None:
        table = pd.DataFrame(columns=["language", "task", "split", "metric", "value", "bar", "meets", "n"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer, recipe = result.model, result.tokenizer, result.recipe
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    info = {
        "name": recipe.name,
        "recipe": recipe.to_dict(),
        "seed": recipe.seed,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": len(tokenizer),
        "training": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 4),
            "corpus_docs": result.corpus_docs,
            "corpus_tokens": result.corpus_tokens,
            "threads": 1,
            "loss_curve": result.log,
        },
        "evaluation": table.to_dict(orient="records"),
        "evaluation_n": evaluation_n,
        "bars_met": bool((table["meets"] != False).all()),  # noqa: E712
        "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU",
    }
    (path / "zoo.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (path / "README.md").write_text(card_text(info, table), encoding="utf-8")
    return path
