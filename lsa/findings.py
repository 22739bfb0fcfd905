"""Named findings a notebook states with their numbers, saved as it goes to ``findings.json``.

The reproduce report is assembled from these files, so a number in the report is
the number the notebook computed and saved.

Every key is made here: one :class:`Key` per kind of finding (``accuracy("ioi", "en")``
is ``"ioi_en_accuracy"``) and one constant per fixed key (:data:`FREQUENCY_CORRELATION`).
Notebooks write with them and :mod:`lsa.reproduce` reads with them (its headline
patterns are :meth:`Key.pattern` and :func:`exactly`), so a key renamed here is renamed for both, and a
notebook that writes a key of its own fails ``tests/test_findings.py``.

>>> from lsa import findings as keys
>>> keys.accuracy("ioi", "en")
'ioi_en_accuracy'
>>> f = Findings(".")                                                            # doctest: +SKIP
>>> f.add(keys.accuracy("ioi", "en"), 0.98, "IOI accuracy on English prompts")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from string import Formatter

from lsa.circuits.data import json_safe
from lsa.latent import ROLES as LATENT_ROLES
from lsa.latent import TASKS as LATENT_TASKS
from lsa.tasks import TASKS


def _nulls(value) -> bool:
    """Whether a JSON-safe value is or holds ``None`` (a missing or undefined number)."""
    if isinstance(value, list):
        return any(_nulls(v) for v in value)
    return value is None


class Findings:
    """A dict of ``key -> {"value", "statement"}`` mirrored to ``<output_dir>/findings.json`` on every add.

    The file is strict JSON (``JSON.parse``, ``jq``): a missing or undefined number (``None``,
    NaN, infinite) is written ``null``, and its item gets a ``"note"`` saying why. A new
    ``Findings`` starts empty and replaces the file at its first ``add``: a rerun never keeps a
    key that the run itself did not state.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "findings.json"
        self.items: dict[str, dict] = {}

    def add(self, key: str, value, statement: str = "", note: str = "") -> None:
        """State ``key = value``. ``note``: why the value is missing or undefined, where it is (a default
        note says what was computed otherwise), or any caveat."""
        plain = json_safe(value)
        item = {"value": plain, "statement": statement}
        if note or _nulls(plain):
            item["note"] = note or (
                "missing: no value was given"
                if value is None
                else f"undefined: the computation gave {value!r} (not a finite number), written as null"
            )
        self.items[key] = item
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.items, indent=2, ensure_ascii=False, allow_nan=False))

    def __getitem__(self, key: str):
        return self.items[key]["value"]

    def table(self):
        import pandas as pd

        return pd.DataFrame([{"finding": k, **v} for k, v in self.items.items()])


# ---------------------------------------------------------------- keys
def word(text: str) -> str:
    """A field's text as one word of a key: ``"/"`` and ``" "`` become ``"_"`` (``"toy-en/en"`` -> ``"toy-en_en"``)."""
    return text.replace("/", "_").replace(" ", "_")


class Key:
    """The keys of one kind of finding, made from named fields of a template.

    ``Key("{task}_{language}_accuracy")("ioi", "en") == "ioi_en_accuracy"``: fields are
    given in template order or by name, each formatted with its format spec (as in
    ``{strength:g}``) and made one :func:`word`. ``values``: the only values a field
    may take (a closed vocabulary: any other raises, so a condition renamed in a
    notebook cannot drop out of the report unseen).
    """

    def __init__(self, template: str, **values: Iterable):
        self.template = template
        self.parts = [(literal, name, spec) for literal, name, spec, _ in Formatter().parse(template)]
        self.fields = tuple(name for _, name, _ in self.parts if name)
        if len(set(self.fields)) != len(self.fields) or not all(name.isidentifier() for name in self.fields):
            raise ValueError(f"key template {template!r} needs distinct named fields")
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ValueError(f"key template {template!r} has no field {', '.join(unknown)}")
        self.values = {name: tuple(v) for name, v in values.items()}

    def __repr__(self) -> str:
        return f"Key({self.template!r})"

    def _check(self, name: str, value) -> None:
        if name in self.values and value not in self.values[name]:
            raise ValueError(
                f"{name}={value!r} is not a value of key {self.template!r}; it takes {', '.join(map(str, self.values[name]))}"
            )

    def _text(self, name: str, spec: str, value) -> str:
        self._check(name, value)
        return word(format(value, spec))

    def __call__(self, *args, **kwargs) -> str:
        if len(args) > len(self.fields):
            raise TypeError(f"key {self.template!r} takes {len(self.fields)} fields, got {len(args)}")
        given = dict(zip(self.fields, args))
        for name, value in kwargs.items():
            if name not in self.fields or name in given:
                raise TypeError(f"key {self.template!r}: unexpected or repeated field {name!r}")
            given[name] = value
        missing = [name for name in self.fields if name not in given]
        if missing:
            raise TypeError(f"key {self.template!r} needs {', '.join(missing)}")
        return "".join(
            literal + (self._text(name, spec, given[name]) if name else "") for literal, name, spec in self.parts
        )

    def pattern(self, **choices) -> re.Pattern:
        """The regular expression of these keys: each field one of ``choices[field]`` (one value or several),
        else one of its declared ``values``, else any non-empty text.

        >>> accuracy.pattern(language=("en", "zh")).pattern
        '(?:ioi|past_tense)_(?:en|zh)_accuracy'
        """
        unknown = sorted(set(choices) - set(self.fields))
        if unknown:
            raise ValueError(f"key template {self.template!r} has no field {', '.join(unknown)}")
        out = []
        for literal, name, spec in self.parts:
            out.append(re.escape(literal))
            if not name:
                continue
            options = choices.get(name, self.values.get(name))
            if options is None:
                out.append(".+")
                continue
            options = (options,) if isinstance(options, (str, int, float)) else tuple(options)
            out.append("(?:" + "|".join(re.escape(self._text(name, spec, v)) for v in options) + ")")
        return re.compile("".join(out))


def exactly(key: str) -> re.Pattern:
    """The pattern of one fixed key (a constant here), to stand beside :meth:`Key.pattern` ones."""
    return re.compile(re.escape(key))


# behaviour on clean prompts (00_quickstart; 01_ioi_circuit; 02_past_tense, whose languages are prompt sets)
accuracy = Key("{task}_{language}_accuracy", task=TASKS)
top1 = Key("{task}_{language}_top1", task=TASKS)
logit_diff = Key("{task}_{language}_logit_diff", task=TASKS)

# one discovered circuit (01_ioi_circuit), by discovery method: its size, its held-out faithfulness
# ("faithfulness"; "ci": its 95% interval, [low, high]), whether it reached the target, MIB's areas, its stability
CIRCUIT_METHODS = ("eap-ig", "eap", "path-patching")
CIRCUIT_STATS = (
    "edges", "edge_share", "nodes", "heads", "mlps", "components", "faithfulness", "ci", "reached_target",
    "cpr", "cmd", "stability_edges", "stability_nodes", "chance_nodes",
)  # fmt: skip
circuit = Key("{task}_circuit_{language}_{method}_{stat}", task=TASKS, method=CIRCUIT_METHODS, stat=CIRCUIT_STATS)

# two circuits compared (03_compare_circuits): a compare() score of circuits labelled a and b; each
# circuit's held-out faithfulness on each language's prompts (and its 95% interval, [low, high]); the
# overlap of two edge circuits beside chance and resampling (lsa.circuits.edge_overlap); the verdict
COMPARISON_SCORES = ("jaccard", "weighted_overlap", "role_agreement", "shared", "logit_effect_correlation")
circuit_comparison = Key("{task}_circuit_{score}_{a}_vs_{b}", task=TASKS, score=COMPARISON_SCORES)
cross_faithfulness = Key("{task}_faithfulness_{circuit}_on_{language}", task=TASKS)
cross_ci = Key("{task}_ci_{circuit}_on_{language}", task=TASKS)
OVERLAP_STATS = ("observed", "ci", "chance", "chance_95", "within_a", "within_b", "across_halves")
overlap = Key("{task}_overlap_{unit}_{stat}_{a}_vs_{b}", task=TASKS, unit=("edges", "nodes"), stat=OVERLAP_STATS)
verdict = Key("{task}_verdict_{a}_vs_{b}", task=TASKS)

# past-tense routes (02_past_tense): head frequency, and what ablating a set of components leaves.
# The frequency correlation beside its references (lsa.frequency): its 95% bootstrap interval [low, high],
# the mean correlation of two halves of one language, of a half of each language, the 95% range with the
# heads paired at random [low, high], and the permutation p-value with the language labels shuffled.
FREQUENCY_CORRELATION = "frequency_correlation"
FREQUENCY_CORRELATION_CI = "frequency_correlation_ci"
frequency_split_half = Key("frequency_split_half_{language}")
FREQUENCY_HALVES = "frequency_correlation_halves"
FREQUENCY_CHANCE = "frequency_correlation_chance"
FREQUENCY_SHUFFLED_P = "frequency_correlation_shuffled_p"
ENGLISH_SPECIFIC_HEADS = "english_specific_heads"  # chosen on one half of the prompts
ABLATE_ENGLISH_HEADS = "English-specific heads"  # the ablated sets, as the notebook labels them
ABLATE_LATE_FFNS = "late FFNs"
ABLATED = (ABLATE_ENGLISH_HEADS, ABLATE_LATE_FFNS)
ABLATION_METHOD = "ablation_method"  # the ablation, as lsa.ablation names it ("interchange")
# on the other half (held_out_prompts of each set): the relative metric, its 95% bootstrap interval
# [low, high], and how much more `language` loses than `other` (relative(other) - relative(language))
held_out_prompts = Key("held_out_prompts_{language}")
ablation = Key("ablation_{language}_{ablated}", ablated=ABLATED)
ablation_ci = Key("ablation_{language}_{ablated}_ci", ablated=ABLATED)
ablation_gap = Key("ablation_{ablated}_gap_{language}_vs_{other}", ablated=ABLATED)
ablation_gap_ci = Key("ablation_{ablated}_gap_{language}_vs_{other}_ci", ablated=ABLATED)

# language-specific neurons (04_language_neurons)
NEURON_METHODS = ("lape", "plnd")
neuron_count = Key("{method}_neurons_{language}", method=NEURON_METHODS)
neurons_off = Key("{method}_off_{deactivated}_loss_{evaluated}", method=NEURON_METHODS)
steering_share = Key("{method}_steer_{source}_to_{target}_x{strength:g}", method=NEURON_METHODS)

# activation and attribution patching (05_activation_patching)
top_head = Key("top_head_{language}")
top_head_effect = Key("top_head_effect_{language}")
HEAD_EFFECT_CORRELATION = "head_effect_correlation"
attribution_correlation = Key("attribution_correlation_{language}_{direction}", direction=("noising", "denoising"))

# latent language (06_latent_language): one prompt set, a task from a source to a target language (repetition
# and cloze: source = target), and a role (the answer in the target language, or in the other one)
latent_top1 = Key("latent_{task}_{source}_{target}_top1", task=LATENT_TASKS)
latent_overtake = Key("latent_{task}_{source}_{target}_overtake_layer", task=LATENT_TASKS)
latent_leads = Key("latent_{task}_{source}_{target}_{role}_leads", task=LATENT_TASKS, role=LATENT_ROLES)
latent_median = Key("latent_{task}_{source}_{target}_{role}_median", task=LATENT_TASKS, role=LATENT_ROLES)
latent_rank = Key("latent_{task}_{source}_{target}_{role}_rank", task=LATENT_TASKS, role=LATENT_ROLES)

FIXED_KEYS = (
    FREQUENCY_CORRELATION,
    FREQUENCY_CORRELATION_CI,
    FREQUENCY_HALVES,
    FREQUENCY_CHANCE,
    FREQUENCY_SHUFFLED_P,
    ENGLISH_SPECIFIC_HEADS,
    ABLATION_METHOD,
    HEAD_EFFECT_CORRELATION,
)
