"""Per-language activation statistics of every FFN neuron (:class:`NeuronStats`).

Counts and sums per language, layer and neuron, from which the activation
probability, mean and standard deviation follow; saved, loaded, merged, and
read from the published LAPE ``activation.<lang>.*`` files.
:func:`lsa.neurons.collect.collect_stats` fills them from a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch


@dataclass
class NeuronStats:
    """Per-language activation statistics of every FFN neuron.

    Shapes: ``n_tokens [lang]``, every other tensor ``[lang, layer, neuron]``.
    ``n_items[lang]`` counts the texts (or sequences) consumed, so a stream can
    be resumed. Sums are float64; counts int64.

    >>> stats = collect_stats(model, {"en": en_texts, "zh": zh_texts})   # doctest: +SKIP
    >>> stats.prob.shape                                                  # doctest: +SKIP
    torch.Size([2, 12, 3072])
    """

    languages: list[str]
    n_tokens: torch.Tensor
    n_positive: torch.Tensor
    act_sum: torch.Tensor
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    n_items: torch.Tensor
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, languages: Iterable[str], n_layers: int, d_mlp: int, meta: dict | None = None) -> NeuronStats:
        languages = list(languages)
        n = len(languages)
        if len(set(languages)) != n:
            raise ValueError(f"duplicate language names in {languages}")
        zeros = lambda dtype: torch.zeros(n, n_layers, d_mlp, dtype=dtype)
        return cls(
            languages=languages,
            n_tokens=torch.zeros(n, dtype=torch.long),
            n_positive=zeros(torch.long),
            act_sum=zeros(torch.float64),
            abs_sum=zeros(torch.float64),
            sq_sum=zeros(torch.float64),
            n_items=torch.zeros(n, dtype=torch.long),
            meta=dict(meta or {}),
        )

    # ------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return self.n_positive.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.n_positive.shape[2]

    def lang_index(self, language: str) -> int:
        if language not in self.languages:
            raise ValueError(f"unknown language {language!r}; these stats have {self.languages}")
        return self.languages.index(language)

    def add_language(self, language: str) -> int:
        """Append an empty language (for streaming a new one into existing stats)."""
        if language in self.languages:
            return self.lang_index(language)
        self.languages.append(language)
        pad = lambda t: torch.cat([t, torch.zeros((1, *t.shape[1:]), dtype=t.dtype)])
        for name in ("n_tokens", "n_positive", "act_sum", "abs_sum", "sq_sum", "n_items"):
            setattr(self, name, pad(getattr(self, name)))
        return len(self.languages) - 1

    # ------------------------------------------------------------ derived
    def _per_token(self, total: torch.Tensor) -> torch.Tensor:
        n = self.n_tokens.to(torch.float64).clamp(min=1).reshape(-1, 1, 1)
        return total.to(torch.float64) / n

    @property
    def prob(self) -> torch.Tensor:
        """P(activation > 0) per language: ``[lang, layer, neuron]``."""
        return self._per_token(self.n_positive)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation per language: ``[lang, layer, neuron]``."""
        return self._per_token(self.act_sum)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self._per_token(self.abs_sum)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of the activation per language."""
        var = self._per_token(self.sq_sum) - self.mean**2
        return var.clamp(min=0).sqrt()

    # ------------------------------------------------------------ update / merge
    def update(
        self,
        language: str,
        n_tokens: int,
        n_positive: torch.Tensor,
        act_sum: torch.Tensor,
        abs_sum: torch.Tensor,
        sq_sum: torch.Tensor,
        n_items: int = 0,
    ) -> None:
        """Add one batch's totals ``[layer, neuron]`` for a language (created if new)."""
        i = self.add_language(language)
        self.n_tokens[i] += int(n_tokens)
        self.n_items[i] += int(n_items)
        self.n_positive[i] += n_positive.to("cpu", torch.long)
        self.act_sum[i] += act_sum.to("cpu", torch.float64)
        self.abs_sum[i] += abs_sum.to("cpu", torch.float64)
        self.sq_sum[i] += sq_sum.to("cpu", torch.float64)

    def merge(self, other: NeuronStats) -> NeuronStats:
        """A new :class:`NeuronStats` with both runs' totals (languages united, in order of appearance)."""
        if (self.n_layers, self.d_mlp) != (other.n_layers, other.d_mlp):
            raise ValueError(
                f"cannot merge stats of shape {(self.n_layers, self.d_mlp)} and {(other.n_layers, other.d_mlp)}"
            )
        out = NeuronStats.empty([], self.n_layers, self.d_mlp, meta={**other.meta, **self.meta})
        for src in (self, other):
            for j, lang in enumerate(src.languages):
                out.update(
                    lang,
                    int(src.n_tokens[j]),
                    src.n_positive[j],
                    src.act_sum[j],
                    src.abs_sum[j],
                    src.sq_sum[j],
                    int(src.n_items[j]),
                )
        return out

    def select(self, languages: Iterable[str]) -> NeuronStats:
        """The stats of some languages only, in the given order."""
        idx = [self.lang_index(lang) for lang in languages]
        pick = lambda t: t[idx].clone()
        return NeuronStats(
            languages=list(languages),
            n_tokens=pick(self.n_tokens),
            n_positive=pick(self.n_positive),
            act_sum=pick(self.act_sum),
            abs_sum=pick(self.abs_sum),
            sq_sum=pick(self.sq_sum),
            n_items=pick(self.n_items),
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (``torch.save`` of a dict; written atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "format": "lsa.NeuronStats/1",
                "languages": list(self.languages),
                "n_tokens": self.n_tokens,
                "n_positive": self.n_positive,
                "act_sum": self.act_sum,
                "abs_sum": self.abs_sum,
                "sq_sum": self.sq_sum,
                "n_items": self.n_items,
                "meta": dict(self.meta),
            },
            tmp,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NeuronStats:
        data = torch.load(Path(path), weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "lsa.NeuronStats/1":
            raise ValueError(f"{path} is not a saved NeuronStats file")
        return cls(**{k: v for k, v in data.items() if k != "format"})

    @classmethod
    def from_lape_files(cls, files: Mapping[str, str | Path]) -> NeuronStats:
        """Read the published LAPE ``activation.<lang>.*`` files (dicts with ``n``, ``over_zero``, ``sum1``, ``sum2``).

        Those files keep no absolute sums; ``abs_sum`` is left at zero.
        """
        stats = None
        for lang, path in files.items():
            data = torch.load(Path(path), weights_only=True)
            over_zero = data["over_zero"]
            if stats is None:
                stats = cls.empty([], over_zero.shape[0], over_zero.shape[1])
            zero = torch.zeros_like(over_zero, dtype=torch.float64)
            stats.update(
                lang,
                int(data["n"]),
                over_zero,
                data.get("sum1", zero),
                zero,
                data.get("sum2", zero),
            )
        if stats is None:
            raise ValueError("no files given")
        return stats

    def to_frame(self) -> pd.DataFrame:
        """One row per (language, layer, neuron): ``prob``, ``mean``, ``std``, ``mean_abs``."""
        n_lang, n_layers, d_mlp = self.n_positive.shape
        grid = torch.cartesian_prod(torch.arange(n_lang), torch.arange(n_layers), torch.arange(d_mlp))
        return pd.DataFrame(
            {
                "language": [self.languages[i] for i in grid[:, 0].tolist()],
                "layer": grid[:, 1].numpy(),
                "neuron": grid[:, 2].numpy(),
                "prob": self.prob.reshape(-1).numpy(),
                "mean": self.mean.reshape(-1).numpy(),
                "std": self.std.reshape(-1).numpy(),
                "mean_abs": self.mean_abs.reshape(-1).numpy(),
            }
        )

    def __repr__(self) -> str:
        tokens = ", ".join(f"{lang}: {int(n)}" for lang, n in zip(self.languages, self.n_tokens))
        return f"NeuronStats({self.n_layers} layers x {self.d_mlp} neurons; tokens {{{tokens}}})"
