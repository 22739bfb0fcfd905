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


def language_report(
    model,
    texts: Mapping[str, Iterable[str]],
    *,
    heldout: Mapping[str, Iterable[str]] | None = None,
    heldout_share: float = 0.2,
    stats: NeuronStats | None = None,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
    plnd_top_rate: float | None = 0.01,
    n_random: int = 3,
    steer_from: str = "en",
    steer_to: str = "zh",
    scripts: Mapping[str, str] | None = None,
    strength: float | tuple[float, ...] = (1.0, 4.0, 16.0),
    prompts: list[str] | None = None,
    n_prompts: int = 8,
    prompt_tokens: int = 4,
    max_new_tokens: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> LanguageReport:
    """Language-specific neurons end to end: statistics, LAPE (and PLND) sets, deactivation, steering.

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
    scripts = dict(scripts or {"en": "latin", "zh": "cjk"})
    texts = {lang: list(src) for lang, src in as_language_dict(texts).items()}
    if heldout is None:
        pairs = {lang: _split(src, heldout_share) for lang, src in texts.items()}
        train = {lang: p[0] for lang, p in pairs.items()}
        held = {lang: p[1] for lang, p in pairs.items()}
    else:
        train, held = texts, {lang: list(src) for lang, src in heldout.items()}
    if stats is None:
        stats = collect_stats(model, train, batch_size=batch_size, max_length=max_length, progress=progress)
    sets = {"lape": lape(stats, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio)}
    if plnd_top_rate is not None:
        sets["plnd"] = plnd_neurons(plnd_importance(model, stats), stats.languages, top_rate=plnd_top_rate)
    loss = lambda edits=(): steering.language_loss(
        model, held, edits=edits, batch_size=batch_size, max_length=max_length
    ).set_index("language")["loss"]
    base = loss()
    rows = []
    for method, result in sets.items():
        everything = union(*result.masks)
        for lang, mask in zip(result.languages, result.masks):
            n = neuron_count(mask)
            hit = loss([steering.deactivate(mask)]) if n else base
            randoms = [
                loss([steering.deactivate(random_like(mask, model.adapter.d_mlp, exclude=everything, seed=seed + s))])
                for s in range(n_random if n else 0)
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
    columns = [
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
    runs = []
    if steer_from in stats.languages and steer_to in stats.languages and steer_from in held:
        tok = model.tokenizer
        if prompts is None:
            prompts = []
            for text in held[steer_from][:n_prompts]:
                ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
                prompts.append(tok.decode(ids))
        prompts = list(prompts)
        strengths = [strength] if isinstance(strength, (int, float)) else list(strength)
        for method, result in sets.items():
            for st in strengths:
                edits = [
                    steering.deactivate(result.mask(steer_from)),
                    steering.activate(result.mask(steer_to), stats, steer_to, strength=st),
                ]
                run = steering.steering_run(
                    model, prompts, edits, target_script=scripts[steer_to], max_new_tokens=max_new_tokens
                )
                runs.append(run.assign(method=method, strength=float(st)))
    steer_table = pd.concat(runs, ignore_index=True)[columns] if runs else pd.DataFrame(columns=columns)
    counts = pd.concat([r.counts().assign(method=m) for m, r in sets.items()], ignore_index=True)
    return LanguageReport(
        stats=stats,
        lape=sets["lape"],
        plnd=sets.get("plnd"),
        counts=counts[["method", "language", "layer", "n_neurons"]],
        base_loss=base.rename("loss").reset_index(),
        deactivation=pd.DataFrame(rows),
        steering=steer_table,
        params=dict(
            top_rate=top_rate,
            filter_rate=filter_rate,
            activation_bar_ratio=activation_bar_ratio,
            plnd_top_rate=plnd_top_rate,
            n_random=n_random,
            steer_from=steer_from,
            steer_to=steer_to,
            target_script=scripts.get(steer_to),
            strength=strength,
            seed=seed,
        ),
    )
