"""Texts per language: the shipped sample corpora, the toy zoo's generated documents, or the user's own files.

The shipped corpus (``data/corpora``) is 300 short everyday sentences per language,
generated here from phrase lists, line *i* of ``zh.txt`` translating line *i* of
``en.txt``, every one ending in sentence-final punctuation. Neurons chosen on it mark
that form as well as the language: on Gemma 3 (40 sentences per language, as the real
preset runs) punctuation (，。) is the token the Chinese neurons fire on most often, the
top token of 48 of the 296. Your own text files (:func:`study_texts` ``files=``) give a
broader sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "corpora"
SHIPPED = (
    "the shipped corpus (data/corpora): 300 short generated everyday sentences per language, "
    "the Chinese lines translating the English ones, each ending in sentence-final punctuation"
)


def read_texts(path: str | Path) -> list[str]:
    """The texts of a UTF-8 file, one per non-empty line (surrounding spaces stripped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path.resolve()}: give a UTF-8 file with one text per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_corpus(language: str, root: str | Path | None = None) -> list[str]:
    """The shipped sample sentences of a language (``data/corpora/<language>.txt``, one per line)."""
    path = Path(root or CORPUS_DIR) / f"{language}.txt"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise FileNotFoundError(f"no corpus for {language!r} at {path}; available: {have}")
    return read_texts(path)


def zoo_texts(languages=("en", "zh"), n: int = 2000, seed: int = 1234) -> dict[str, list[str]]:
    """Documents of the toy zoo's world per language (``lsa.zoo`` generator, a seed unlike training's)."""
    from lsa.zoo.corpus import World, generate

    return {lang: generate(World.load(lang), n=n, seed=seed) for lang in languages}


def study_texts(
    model: str, languages: Sequence[str], n: int, *, seed: int = 0, files: Mapping[str, str] | None = None
) -> tuple[dict[str, list[str]], str]:
    """``({language: up to n texts}, what they are)`` for a neuron study of the model named ``model``.

    ``files`` (``{language: path}``, one text per line) where given, for every language; else the
    toy zoo's own world for zoo and random models (``n`` generated documents); else the shipped corpus.

    >>> texts, source = study_texts("gemma-3-270m", ["en", "zh"], 40)   # doctest: +SKIP
    """
    if files:
        if missing := [lang for lang in languages if lang not in files]:
            raise ValueError(f"text_files has no file for {missing}; give one per language: {list(languages)}")
        texts = {lang: read_texts(files[lang])[:n] for lang in languages}
        return texts, "your text files: " + ", ".join(f"{lang} {files[lang]}" for lang in languages)
    if model.startswith(("toy-", "random:", "random-narrow:")):
        return zoo_texts(tuple(languages), n=n, seed=seed + 1234), "the toy zoo's world (generated documents)"
    return {lang: load_corpus(lang)[:n] for lang in languages}, SHIPPED
