"""Named findings a notebook states with their numbers, saved as it goes to ``findings.json``.

The reproduce report is assembled from these files, so a number in the report is
the number the notebook computed and saved.

>>> f = Findings(".")                                                   # doctest: +SKIP
>>> f.add("ioi_accuracy_en", 0.98, "IOI accuracy on English prompts")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Findings:
    """A dict of ``key -> {"value", "statement"}`` mirrored to ``<output_dir>/findings.json`` on every add.

    A new ``Findings`` starts empty and replaces the file at its first ``add``: a rerun
    never keeps a key that the run itself did not state.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "findings.json"
        self.items: dict[str, dict] = {}

    def add(self, key: str, value, statement: str = "") -> None:
        self.items[key] = {"value": _plain(value), "statement": statement}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.items, indent=2, ensure_ascii=False))

    def __getitem__(self, key: str):
        return self.items[key]["value"]

    def table(self):
        import pandas as pd

        return pd.DataFrame([{"finding": k, **v} for k, v in self.items.items()])
