"""Texts per language: the shipped sample corpora and the toy zoo's generated documents."""

from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "corpora"


def load_corpus(language: str, root: str | Path | None = None) -> list[str]:
    """The shipped sample sentences of a language (``data/corpora/<language>.txt``, one per line)."""
    path = Path(root or CORPUS_DIR) / f"{language}.txt"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise FileNotFoundError(f"no corpus for {language!r} at {path}; available: {have}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zoo_texts(languages=("en", "zh"), n: int = 2000, seed: int = 1234) -> dict[str, list[str]]:
    """Documents of the toy zoo's world per language (``lsa.zoo`` generator, a seed unlike training's)."""
    from lsa.zoo.corpus import World, generate

    return {lang: generate(World.load(lang), n=n, seed=seed) for lang in languages}
