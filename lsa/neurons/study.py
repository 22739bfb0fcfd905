"""The whole study in one call: :func:`language_report` (statistics, selection, deactivation, steering)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from lsa.neurons import steering
from lsa.neurons.collect import as_language_dict, collect_stats
from lsa.neurons.selection import LapeResult, lape, plnd_importance, plnd_neurons
from lsa.neurons.sets import neuron_count, random_like, union
from lsa.neurons.stats import NeuronStats


@dataclass
class LanguageReport:
    """What :func:`language_report` found.

    Attributes:
        stats: activation statistics on the training texts.
        lape: the language-specific neurons by activation-probability entropy.
        plnd: the language-specific neurons by PLND-style importance (None if not asked for).
        counts: neurons per (method, language, layer).
        base_loss: per-language loss of the unchanged model on the held-out texts.
        deactivation: one row per (method, deactivated language set, evaluated language):
            ``n_neurons``, ``loss``, ``delta`` (minus the unchanged loss), ``random_delta``
            (the same count per layer of random neurons outside every set, mean over seeds).
        steering: one row per (method, strength, prompt): ``baseline``, ``steered``,
            ``share_before``, ``share_after``, ``chars_before``, ``chars_after`` (see
            :func:`lsa.steering.steering_run`; :func:`lsa.steering.steering_summary` gives
            the means with the number of prompts each rests on).
    """

    stats: NeuronStats
    lape: LapeResult
    plnd: LapeResult | None
    counts: pd.DataFrame
    base_loss: pd.DataFrame
    deactivation: pd.DataFrame
    steering: pd.DataFrame
    params: dict

    def summary(self) -> str:
        p = self.params
        lines = [f"held-out loss, unchanged model: {dict(zip(self.base_loss.language, self.base_loss.loss.round(3)))}"]
        for method, counts in self.counts.groupby("method", sort=False):
            lines.append(f"\n[{method}] language-specific neurons per layer:")
            lines.append(counts.pivot(index="language", columns="layer", values="n_neurons").to_string())
        lines.append("\nloss change when a language's neurons are set to 0 (random: same count per layer):")
        cols = ["method", "deactivated", "evaluated", "n_neurons", "loss", "delta", "random_delta"]
        lines.append(self.deactivation[cols].to_string(index=False, float_format="%.3f"))
        if len(self.steering):
            lines.append(
                f"\nsteering {p['steer_from']} -> {p['steer_to']} ({p['steer_from']} neurons set to 0, "
                f"{p['steer_to']} neurons set to strength x their {p['steer_to']} mean): "
                f"share of {p['target_script']} characters in greedy continuations"
            )
            for row in steering.steering_summary(self.steering, by=["method", "strength"]).itertuples():
                lines.append(
                    f"  [{row.method}] strength {row.strength:g}: {row.share_before:.2f} "
                    f"({row.n_before} of {row.n_prompts} prompts) -> {row.share_after:.2f} "
                    f"({row.n_after} of {row.n_prompts}; a prompt whose continuation has no CJK or Latin "
                    "character is excluded)"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _split(texts: list, share: float) -> tuple[list, list]:
    n_held = max(1, round(len(texts) * share))
    return texts[:-n_held], texts[-n_held:]


@dataclass(frozen=True)
class ReportSettings:
    """The settings of :func:`language_report`, one field per choice it makes.

    Texts: ``heldout`` (per language; default: the last ``heldout_share`` of each language's texts).
    Statistics: ``stats`` (skip collecting them), ``batch_size``, ``max_length``, ``progress``.
    Selection: LAPE's ``top_rate``, ``filter_rate``, ``activation_bar_ratio``; PLND's ``plnd_top_rate``
    (``None``: no PLND set). Deactivation: ``n_random`` draws of random neurons per set, from ``seed``.
    Steering: from ``steer_from`` to ``steer_to`` at each ``strength``, from ``prompts`` (default: the
    first ``prompt_tokens`` tokens of ``n_prompts`` held-out ``steer_from`` texts), ``max_new_tokens``
    each; the output's script per language in ``scripts`` (default en: latin, zh: cjk).
    """

    heldout: Mapping[str, Iterable[str]] | None = None
    heldout_share: float = 0.2
    stats: NeuronStats | None = None
    top_rate: float = 0.01
    filter_rate: float = 0.95
    activation_bar_ratio: float = 0.95
    plnd_top_rate: float | None = 0.01
    n_random: int = 3
    steer_from: str = "en"
    steer_to: str = "zh"
    scripts: Mapping[str, str] | None = None
    strength: float | tuple[float, ...] = (1.0, 4.0, 16.0)
    prompts: list[str] | None = None
    n_prompts: int = 8
    prompt_tokens: int = 4
    max_new_tokens: int = 20
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    progress: bool = True


def language_report(model, texts: Mapping[str, Iterable[str]], **settings) -> LanguageReport:
    """Language-specific neurons end to end: statistics, LAPE (and PLND) sets, deactivation, steering.

    ``settings``: the fields of :class:`ReportSettings` (``top_rate=0.05``, ``strength=(2.0,)``, ...).

    1) collect :class:`NeuronStats` on ``texts`` (minus the last ``heldout_share`` of
       each language unless ``heldout`` is given; skipped when ``stats`` are passed);
    2) :func:`lape` with the given thresholds, and (unless ``plnd_top_rate`` is None)
       :func:`plnd_neurons` on :func:`plnd_importance`;
    3) per-language loss on the held-out texts with each language's set set to 0,
       against the same number of random neurons per layer (``n_random`` draws);
    4) from the first ``prompt_tokens`` tokens of held-out ``steer_from`` texts (or
       from ``prompts``), greedy generation with the ``steer_from`` set at 0 and the
       ``steer_to`` set at ``strength`` x its ``steer_to`` mean (each strength given);
       the share of tokens in ``steer_to``'s script (``scripts``; default en: latin,
       zh: cjk) before and after.

    >>> report = language_report(model, {"en": en_texts, "zh": zh_texts})   # doctest: +SKIP
    >>> print(report.summary())                                             # doctest: +SKIP
    """
    s = ReportSettings(**settings)
    stats, held = _statistics(model, texts, s)
    sets = _neuron_sets(model, stats, s)
    base, deactivation = _deactivation(model, held, sets, s)
    counts = pd.concat([r.counts().assign(method=m) for m, r in sets.items()], ignore_index=True)
    scripts = dict(s.scripts or {"en": "latin", "zh": "cjk"})
    keep = ("top_rate", "filter_rate", "activation_bar_ratio", "plnd_top_rate", "n_random", "steer_from", "steer_to")
    params = {k: getattr(s, k) for k in keep}
    params.update(target_script=scripts.get(s.steer_to), strength=s.strength, seed=s.seed)
    return LanguageReport(
        stats=stats,
        lape=sets["lape"],
        plnd=sets.get("plnd"),
        counts=counts[["method", "language", "layer", "n_neurons"]],
        base_loss=base.rename("loss").reset_index(),
        deactivation=pd.DataFrame(deactivation),
        steering=_steering(model, stats, held, sets, s, scripts),
        params=params,
    )


def _statistics(model, texts, s: ReportSettings) -> tuple[NeuronStats, dict[str, list]]:
    """Step 1: the statistics (on the texts not held out) and the held-out texts per language."""
    texts = {lang: list(src) for lang, src in as_language_dict(texts).items()}
    if s.heldout is None:
        pairs = {lang: _split(src, s.heldout_share) for lang, src in texts.items()}
        train = {lang: p[0] for lang, p in pairs.items()}
        held = {lang: p[1] for lang, p in pairs.items()}
    else:
        train, held = texts, {lang: list(src) for lang, src in s.heldout.items()}
    stats = s.stats
    if stats is None:
        stats = collect_stats(model, train, batch_size=s.batch_size, max_length=s.max_length, progress=s.progress)
    return stats, held


def _neuron_sets(model, stats: NeuronStats, s: ReportSettings) -> dict[str, LapeResult]:
    """Step 2: the LAPE set, and the PLND one unless ``plnd_top_rate`` is None."""
    sets = {
        "lape": lape(stats, top_rate=s.top_rate, filter_rate=s.filter_rate, activation_bar_ratio=s.activation_bar_ratio)
    }
    if s.plnd_top_rate is not None:
        sets["plnd"] = plnd_neurons(plnd_importance(model, stats), stats.languages, top_rate=s.plnd_top_rate)
    return sets


def _deactivation(model, held: dict, sets: dict, s: ReportSettings) -> tuple[pd.Series, list[dict]]:
    """Step 3: the unchanged loss per language, and one row per (method, deactivated set, evaluated language)."""

    def loss(edits=()):
        frame = steering.language_loss(model, held, edits=edits, batch_size=s.batch_size, max_length=s.max_length)
        return frame.set_index("language")["loss"]

    base, rows = loss(), []
    for method, result in sets.items():
        everything = union(*result.masks)
        for lang, mask in zip(result.languages, result.masks):
            n = neuron_count(mask)
            hit = loss([steering.deactivate(mask)]) if n else base
            randoms = [
                loss([steering.deactivate(random_like(mask, model.adapter.d_mlp, exclude=everything, seed=s.seed + i))])
                for i in range(s.n_random if n else 0)
            ]
            rand = sum(randoms) / len(randoms) if randoms else base
            for evaluated in held:
                rows.append(
                    {
                        "method": method,
                        "deactivated": lang,
                        "evaluated": evaluated,
                        "n_neurons": n,
                        "loss": float(hit[evaluated]),
                        "delta": float(hit[evaluated] - base[evaluated]),
                        "random_loss": float(rand[evaluated]),
                        "random_delta": float(rand[evaluated] - base[evaluated]),
                    }
                )
    return base, rows


STEERING_COLUMNS = [
    "method",
    "strength",
    "prompt",
    "baseline",
    "steered",
    "share_before",
    "share_after",
    "chars_before",
    "chars_after",
]


def _steering(model, stats: NeuronStats, held: dict, sets: dict, s: ReportSettings, scripts: dict) -> pd.DataFrame:
    """Step 4: greedy continuations with the ``steer_from`` set at 0 and the ``steer_to`` set at each strength."""
    if not (s.steer_from in stats.languages and s.steer_to in stats.languages and s.steer_from in held):
        return pd.DataFrame(columns=STEERING_COLUMNS)
    prompts = s.prompts
    if prompts is None:
        tok = model.tokenizer
        texts = held[s.steer_from][: s.n_prompts]
        prompts = [tok.decode(tok(text, add_special_tokens=False)["input_ids"][: s.prompt_tokens]) for text in texts]
    strengths = [s.strength] if isinstance(s.strength, (int, float)) else list(s.strength)
    runs = []
    for method, result in sets.items():
        for st in strengths:
            edits = [
                steering.deactivate(result.mask(s.steer_from)),
                steering.activate(result.mask(s.steer_to), stats, s.steer_to, strength=st),
            ]
            run = steering.steering_run(
                model, list(prompts), edits, target_script=scripts[s.steer_to], max_new_tokens=s.max_new_tokens
            )
            runs.append(run.assign(method=method, strength=float(st)))
    return pd.concat(runs, ignore_index=True)[STEERING_COLUMNS] if runs else pd.DataFrame(columns=STEERING_COLUMNS)
