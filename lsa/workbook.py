"""Notebook-level helpers: they load models by name and build prompt sets for a notebook's languages.

The methods they call live in their own modules (:mod:`lsa.circuits`, :mod:`lsa.tasks`);
these only put the pieces of one notebook step together: the prompt sets a model's
tokenizer can express, a circuit per ``(model, language)`` pair, every circuit's
faithfulness in every language.

>>> circuits, skipped = discover_each([("toy-en", "en"), ("toy-zh", "zh")])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from lsa.circuits import FAITHFULNESS_COLUMNS, Circuit, discover, faithfulness_table
from lsa.model import Model
from lsa.tasks import PromptSet


def prompt_sets(
    model: Model,
    languages: Iterable[str],
    task: str = "ioi",
    *,
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
) -> tuple[dict[str, PromptSet], dict[str, str]]:
    """Prompt sets per language for a model's tokenizer, plus ``{language: reason}`` for those that cannot be built.

    A language the tokenizer cannot express (e.g. Chinese names in an English-only
    vocabulary) is skipped with its reason instead of failing the whole run
    (:func:`lsa.tasks.try_build`); any other error raises.
    """
    from lsa import tasks

    built, skipped = {}, {}
    for language in languages:
        prompts, why = tasks.try_build(task, language, model.tokenizer, n=n, seed=seed, split=split)
        if prompts is None:
            skipped[language] = why
        else:
            built[language] = prompts
    return built, skipped


def circuit_labels(circuits: Sequence[Circuit]) -> list[str]:
    """Short distinct labels: the language when all circuits share a model, else ``model/language``."""
    models = {c.model for c in circuits}
    labels = [c.language if len(models) == 1 else f"{c.model}/{c.language}" for c in circuits]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    return labels


HELDOUT = 64  # prompts that judge a circuit, apart from those it was found on


def circuit_prompts(
    model: Model,
    language: str,
    task: str = "ioi",
    *,
    n_prompts: int = 64,
    n_heldout: int = HELDOUT,
    seed: int = 0,
    split: str = "all",
) -> tuple[PromptSet, PromptSet]:
    """Discovery and held-out prompts from one build, no clean text in both (:func:`lsa.tasks.disjoint`).

    The same arguments give the same two sets, so a circuit's held-out prompts can be rebuilt from
    what :func:`prompt_record` keeps in its evidence.
    """
    from lsa import tasks

    built = tasks.build(task, language, model.tokenizer, n=(n_prompts + n_heldout) * 5 // 4 + 4, seed=seed, split=split)
    train, heldout = tasks.disjoint(built, [n_prompts, n_heldout])
    return train, heldout


def prompt_record(n_prompts: int, n_heldout: int, seed: int, split: str) -> dict:
    """What :func:`circuit_prompts` needs to rebuild a circuit's prompts (kept as ``circuit.evidence["prompts"]``)."""
    return {"n_prompts": n_prompts, "n_heldout": n_heldout, "seed": seed, "split": split}


def heldout_sets(
    model: Model, circuit: Circuit, languages: Iterable[str]
) -> tuple[dict[str, PromptSet], dict[str, str]]:
    """Each language's held-out prompts for a circuit (as it was found: its ``evidence["prompts"]``, else the
    defaults), plus ``{language: reason}`` for those this model's tokenizer cannot express."""
    from lsa.tasks import NoPrompts

    record = {**prompt_record(64, HELDOUT, 0, "all"), **circuit.evidence.get("prompts", {})}
    built, skipped = {}, {}
    for language in languages:
        try:
            built[language] = circuit_prompts(model, language, circuit.task or "ioi", **record)[1]
        except NoPrompts as err:
            skipped[language] = str(err)
    return built, skipped


def cross_faithfulness(
    circuits: Mapping[str, Circuit],
    languages: Iterable[str],
    *,
    models: Mapping[str, Model] | None = None,
    device="auto",
    remote: bool | str = False,
    **kwargs,
) -> pd.DataFrame:
    """Each circuit's faithfulness in each language on held-out prompts, on the model it was found in
    (loaded by name if not given).

    One row per (circuit, language) as in :func:`lsa.circuits.faithfulness_table`; a language whose
    prompts cannot be built for that model's tokenizer gets a row with NaN scores and the reason in ``note``.
    """
    from lsa.model import load_model

    models = dict(models or {})
    languages = list(languages)
    frames = []
    for label, circuit in circuits.items():
        if circuit.model not in models:
            models[circuit.model] = load_model(circuit.model, device=device, remote=remote)
        model = models[circuit.model]
        built, skipped = heldout_sets(model, circuit, languages)
        frame = faithfulness_table(model, {label: circuit}, built, **kwargs)
        notes = [
            {
                "circuit": label,
                "circuit_model": circuit.model,
                "circuit_language": circuit.language,
                "model": model.name,
                "language": language,
                "own_language": language == circuit.language,
                "note": reason,
            }
            for language, reason in skipped.items()
        ]
        frames += [f for f in (frame, pd.DataFrame(notes)) if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out = out.reindex(columns=[*FAITHFULNESS_COLUMNS, "note"])
    out["note"] = out["note"].fillna("")
    return out


def discover_each(
    pairs: Iterable[tuple[str, str]],
    *,
    models: dict[str, Model] | None = None,
    task: str = "ioi",
    n_prompts: int = 64,
    seed: int = 0,
    split: str = "all",
    device="auto",
    remote: bool | str = False,
    **discover_kwargs,
) -> tuple[list[Circuit], dict[str, str]]:
    """Discover a circuit for each ``(model name, language)`` pair on its discovery prompts
    (:func:`circuit_prompts`); ``({...}, {pair: reason skipped})``.

    Models are loaded once each and kept in ``models`` (pass a dict to reuse them, e.g. for
    :func:`cross_faithfulness`). A language the model's tokenizer cannot express is skipped with its reason.

    >>> circuits, skipped = discover_each([("toy-en", "en"), ("toy-zh", "zh")])   # doctest: +SKIP
    """
    from lsa.model import load_model
    from lsa.tasks import NoPrompts

    models = models if models is not None else {}
    found, skipped = [], {}
    for name, language in pairs:
        if name not in models:
            models[name] = load_model(name, device=device, remote=remote)
        try:
            train, _ = circuit_prompts(models[name], language, task, n_prompts=n_prompts, seed=seed, split=split)
        except NoPrompts as err:
            skipped[f"{name}/{language}"] = str(err)
            continue
        circuit = discover(models[name], train, **discover_kwargs).circuit
        circuit.evidence["prompts"] = prompt_record(n_prompts, HELDOUT, seed, split)
        found.append(circuit)
    return found, skipped
