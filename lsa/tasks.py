"""Token-checked prompt sets for the paper's tasks (IOI, past tense) in English and Chinese.

A :class:`PromptSet` holds clean and counterfactual prompts, right-padded to one
length (causal models never look right, so padding changes no real position),
each pair of equal token length, with the answer / distractor ids and the named
positions (IOI: ``IO``, ``S1``, ``S2``, ``end``; tense: ``verb``, ``adverb``, ``end``).
Metrics read logits at ``end`` (the last real token of each prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch


@dataclass
class DropReport:
    """What a builder removed and why: ``counts[reason] = n``, ``examples[reason] = [...]``."""

    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(example)

    def table(self) -> pd.DataFrame:
        rows = [
            {"reason": r, "dropped": n, "examples": ", ".join(self.examples.get(r, []))} for r, n in self.counts.items()
        ]
        return pd.DataFrame(rows, columns=["reason", "dropped", "examples"])

    def __str__(self) -> str:
        parts = [f"kept {self.kept} of {self.total}"] + [f"{n} dropped: {r}" for r, n in self.counts.items()]
        return "; ".join(parts)


@dataclass
class PromptSet:
    """Clean / counterfactual prompt pairs for one task in one language.

    Shapes: ``clean``, ``corrupt``: ``[n, pos]`` token ids (right-padded with
    ``pad_id``); ``lengths``, ``answer``, ``distractor``, ``corrupt_answer``: ``[n]``;
    ``positions[name]``: ``[n]``.
    ``meta`` has one row per prompt (template, names or verb, texts).
    """

    task: str
    language: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    lengths: torch.Tensor
    answer: torch.Tensor
    distractor: torch.Tensor
    positions: dict[str, torch.Tensor]
    meta: pd.DataFrame
    report: DropReport
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def end(self) -> torch.Tensor:
        """Position of each prompt's last real token: ``[n]``."""
        return self.lengths - 1

    @property
    def same_length(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    def subset(self, index) -> PromptSet:
        """Rows ``index`` (a slice, list or boolean mask) as a new set, padding trimmed."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 0
        return PromptSet(
            task=self.task,
            language=self.language,
            clean=self.clean[index, :width],
            corrupt=self.corrupt[index, :width],
            lengths=lengths,
            answer=self.answer[index],
            distractor=self.distractor[index],
            positions={k: v[index] for k, v in self.positions.items()},
            meta=self.meta.iloc[index.tolist()].reset_index(drop=True),
            report=self.report,
            pad_id=self.pad_id,
        )

    def by_length(self) -> list[PromptSet]:
        """Equal-length groups (for layer x position maps), longest group first."""
        groups = [self.subset(self.lengths == n) for n in self.lengths.unique().tolist()]
        return sorted(groups, key=len, reverse=True)

    def to(self, device) -> PromptSet:
        self.clean, self.corrupt = self.clean.to(device), self.corrupt.to(device)
        return self
