"""The toy model zoo: small GPT-2-architecture models trained here on a generated English/Chinese world.

Three models mirror the paper's design: ``toy-bilingual`` (English + Chinese, one
model, like BLOOM / Qwen2) and ``toy-en`` / ``toy-zh`` (one language each, trained
independently, like GPT-2 small vs CPM). They are the default model of every
notebook, so they must really do IOI and the past-tense task; their held-out
scores are in each model's ``zoo.json`` and ``README.md``.

Building costs CPU time: about 12-15 minutes per model on one thread.

>>> from lsa import zoo
>>> zoo.build_zoo(names=("toy-en",), minutes=15)          # doctest: +SKIP
>>> zoo.evaluate(lsa.load_model("toy-en"))                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from lsa.zoo.card import save
from lsa.zoo.corpus import World, generate
from lsa.zoo.evaluate import evaluate, probe, shortfalls
from lsa.zoo.tokenizer import build_tokenizer
from lsa.zoo.train import RECIPES, Recipe, TrainResult, recipe_for, train

NAMES = tuple(RECIPES)


def build_zoo(
    names=("toy-bilingual", "toy-en", "toy-zh"),
    out_dir: str | Path | None = None,
    seed: int = 0,
    minutes: float | None = None,
    progress=None,
    **overrides,
) -> dict[str, Path]:
    """Train, evaluate and save zoo models under ``out_dir/<name>`` (default ``data/models``).

    ``minutes`` caps each model's training time (the run stops early and records
    the step count); ``overrides`` replace recipe fields (``steps=3000``, ``n_layer=2``).
    Returns the folder of each model.
    """
    from lsa.model import ZOO_DIR, wrap

    progress = progress or (lambda message: print(message, flush=True))
    out_dir = Path(out_dir) if out_dir is not None else ZOO_DIR
    saved = {}
    for name in names:
        recipe = recipe_for(name, seed=seed, **overrides)
        monitor = probe(recipe.languages)  # held-out-pair IOI / tense scores along the way, kept in the log
        result = train(recipe, minutes=minutes, progress=progress, monitor=monitor, monitor_every=250, log_every=250)
        table = evaluate(wrap(result.model, result.tokenizer, name=name), recipe.languages)
        saved[name] = save(result, out_dir / name, table)
        progress(f"{name}: saved to {saved[name]}")
    return saved


__all__ = [
    "NAMES",
    "RECIPES",
    "Recipe",
    "TrainResult",
    "World",
    "build_tokenizer",
    "build_zoo",
    "evaluate",
    "generate",
    "recipe_for",
    "save",
    "shortfalls",
    "train",
]
