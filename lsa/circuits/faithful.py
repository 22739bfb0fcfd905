"""Faithfulness of circuits: :func:`lsa.ablation.faithfulness` (mean ablation of every head outside
the circuit) per circuit and language."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from lsa.circuits.data import Circuit
from lsa.model import Model
from lsa.tasks import PromptSet

FAITHFULNESS_COLUMNS = [
    "circuit",
    "circuit_model",
    "circuit_language",
    "model",
    "language",
    "components",
    "full",
    "circuit_metric",
    "empty",
    "faithfulness",
    "normalized",
    "own_language",
]


def faithfulness(model: Model, circuit: Circuit, prompts: PromptSet, **kwargs):
    """:func:`lsa.ablation.faithfulness` of a circuit (validated against the model first)."""
    from lsa import ablation

    circuit.validate(model)
    return ablation.faithfulness(model, prompts, [c.key for c in circuit.components], **kwargs)


def faithfulness_table(
    model: Model, circuits: Mapping[str, Circuit], prompt_sets: Mapping[str, PromptSet], **kwargs
) -> pd.DataFrame:
    """Each circuit in each language (on one model): one row per (circuit, language).

    Columns: ``circuit``, ``circuit_language``, ``language``, ``components``, ``full``,
    ``circuit_metric``, ``empty``, ``faithfulness``, ``normalized``, ``own_language``.
    Cross-language faithfulness is the rows where ``language != circuit_language``.
    """
    rows = []
    for label, circuit in circuits.items():
        for language, prompts in prompt_sets.items():
            f = faithfulness(model, circuit, prompts, **kwargs)
            rows.append(
                {
                    "circuit": label,
                    "circuit_model": circuit.model,
                    "circuit_language": circuit.language,
                    "model": model.name,
                    "language": language,
                    "components": len(circuit),
                    "full": float(f.full.mean()),
                    "circuit_metric": float(f.circuit.mean()),
                    "empty": float(f.empty.mean()),
                    "faithfulness": f.faithfulness,
                    "normalized": f.normalized,
                    "own_language": language == circuit.language,
                }
            )
    return pd.DataFrame(rows, columns=FAITHFULNESS_COLUMNS)
