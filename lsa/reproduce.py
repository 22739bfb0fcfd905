"""``lsa reproduce``: every analysis on the toy zoo and on the real pretrained models, then one report.

The real models' part is the ``real`` preset (Gemma 3 270M in English and Chinese,
SmolLM2 135M in English); where they are not installed the report says so and
covers the zoo. Its section states, from the saved numbers, what the real models
show against the paper's findings.

Each notebook writes ``findings.json`` into its run folder: named numbers with a
one-line statement each. The report (Markdown and HTML, figures embedded by
relative path) is assembled from those files and the saved figures only, so its
numbers are the notebooks' saved results. It reads them by the keys the notebooks
write them with (:mod:`lsa.findings`): headlines by :meth:`lsa.findings.Key.pattern`,
single numbers by the same key functions. Where the numbers (their intervals, against their
references) do not decide a claim, the comparison with the paper says "inconclusive", by rules
written in the functions that apply them (:func:`ablation_verdict`, :func:`frequency_verdict`).
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path

from lsa import findings as keys
from lsa import runner

QUICK = {"n_prompts": [16], "n_texts": [200]}

# The real pretrained models of the "real" preset (lsa.pretrained): the multilingual one first.
REAL_MODELS = ("gemma-3-270m", "smollm2-135m")
NAMES = {"en": "English", "zh": "Chinese"}

LANGUAGES = tuple(NAMES)  # the two languages of the paper and of the report: en, zh
COMPARED = ("jaccard", "weighted_overlap", "role_agreement", "shared")  # compare() scores the report leads with


def _each(kinds: tuple[keys.Key, ...], **choices) -> tuple[re.Pattern, ...]:
    """The patterns of each of ``kinds`` with the same field ``choices``."""
    return tuple(kind.pattern(**choices) for kind in kinds)


ONE_CIRCUIT = (keys.circuit.pattern(stat=("edges", "edge_share", "nodes", "faithfulness", "ci")),)
PAST_TENSE_ROUTES = (
    keys.exactly(keys.FREQUENCY_CORRELATION),
    keys.frequency_split_half.pattern(language=LANGUAGES),
    keys.exactly(keys.FREQUENCY_SHUFFLED_P),
    keys.exactly(keys.ENGLISH_SPECIFIC_HEADS),
    keys.ablation.pattern(),
    keys.ablation_gap.pattern(language="en", other="zh"),
)
# the steering shares the paper comparison quotes: LAPE's, at every strength
PAPER_STEERING = keys.steering_share.pattern(method="lape")

# The findings the report leads with: (notebook, model, key patterns), a finding in any pattern.
HEADLINES: list[tuple[str, str, tuple[re.Pattern, ...]]] = [
    ("00_quickstart", "toy-bilingual", (keys.accuracy.pattern(language=LANGUAGES),)),
    ("03_compare_circuits", "toy-bilingual", (keys.circuit_comparison.pattern(task="ioi", score=COMPARED),)),
    ("03_compare_circuits", "toy-bilingual", (keys.cross_faithfulness.pattern(task="ioi"),)),
    (
        "03_compare_circuits",
        "toy-en+toy-zh",
        (keys.circuit_comparison.pattern(task="ioi", score=("jaccard", "role_agreement", "shared")),),
    ),
    ("03_compare_circuits", "toy-en+toy-zh", (keys.cross_faithfulness.pattern(task="ioi"),)),
    ("02_past_tense", "toy-bilingual", PAST_TENSE_ROUTES),
    ("06_latent_language", "toy-bilingual", (keys.latent_top1.pattern(), keys.latent_overtake.pattern())),
    (
        "04_language_neurons",
        "toy-bilingual",
        (
            keys.neuron_count.pattern(),
            keys.neurons_off.pattern(deactivated="en", evaluated=LANGUAGES),
            keys.steering_share.pattern(),
        ),
    ),
]


REAL_HEADLINES: list[tuple[str, str, tuple[re.Pattern, ...]]] = [
    ("00_quickstart", REAL_MODELS[0], _each((keys.accuracy, keys.top1), language=LANGUAGES)),
    ("00_quickstart", REAL_MODELS[1], _each((keys.accuracy, keys.top1), task="ioi", language="en")),
    ("01_ioi_circuit", REAL_MODELS[0], ONE_CIRCUIT),
    ("01_ioi_circuit", REAL_MODELS[1], ONE_CIRCUIT),
    ("03_compare_circuits", REAL_MODELS[0], (keys.verdict.pattern(task="ioi"),)),
    ("03_compare_circuits", REAL_MODELS[0], (keys.overlap.pattern(task="ioi", unit="nodes"),)),
    ("03_compare_circuits", REAL_MODELS[0], (keys.circuit_comparison.pattern(task="ioi", score=COMPARED),)),
    ("03_compare_circuits", REAL_MODELS[0], (keys.cross_faithfulness.pattern(task="ioi"),)),
    (
        "03_compare_circuits",
        f"{REAL_MODELS[0]}+{REAL_MODELS[1]}",
        (keys.circuit_comparison.pattern(task="ioi", score=("role_agreement", "shared")),),
    ),
    ("02_past_tense", REAL_MODELS[0], (keys.accuracy.pattern(task="past_tense"), *PAST_TENSE_ROUTES)),
    (
        "04_language_neurons",
        REAL_MODELS[0],
        _each((keys.neuron_count, keys.neurons_off, keys.steering_share), method="lape"),
    ),
    (
        "06_latent_language",
        REAL_MODELS[0],
        (keys.latent_top1.pattern(), keys.latent_overtake.pattern(), keys.latent_leads.pattern(role="other")),
    ),
    ("06_latent_language", REAL_MODELS[1], (keys.latent_top1.pattern(source="en", target="en"),)),
]


def _is_real(run: dict) -> bool:
    return any(name in run["provenance"]["model"] for name in REAL_MODELS)


def collect(output: Path) -> list[dict]:
    """Every run folder's findings, with its figures, in grid order."""
    found = []
    for prov_path in sorted(output.rglob("provenance.json")):
        folder = prov_path.parent
        prov = json.loads(prov_path.read_text())
        findings_path = folder / "findings.json"
        findings = json.loads(findings_path.read_text()) if findings_path.exists() else {}
        found.append(
            {
                "folder": folder,
                "provenance": prov,
                "findings": findings,
                "figures": sorted(folder.glob("*.png")),
            }
        )
    return found


def _fmt(value) -> str:
    if value is None:
        return "n/a"  # findings.json's null: a missing or undefined number (its note says why)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _runs_of(runs: list[dict], notebook: str, model: str) -> list[dict]:
    return [
        r
        for r in runs
        if r["provenance"]["notebook"].removesuffix(".ipynb") == notebook and r["provenance"]["model"] == model
    ]


def _headlines(runs: list[dict], headlines: list[tuple[str, str, tuple[re.Pattern, ...]]]) -> list[str]:
    lines = []
    for notebook, model, patterns in headlines:
        for run in _runs_of(runs, notebook, model):
            for key, item in run["findings"].items():
                if any(p.fullmatch(key) for p in patterns):
                    lines.append(f"- {model}, {notebook}: {item.get('statement', key)} = **{_fmt(item.get('value'))}**")
    return lines


def _finding(runs: list[dict], notebook: str, model: str, key: str):
    """One finding's value from any run of that notebook and model (``None`` where none has it)."""
    for run in _runs_of(runs, notebook, model):
        item = run["findings"].get(key)
        if item is not None:
            return item.get("value") if isinstance(item, dict) else item
    return None


def _parameter(runs: list[dict], notebook: str, model: str, name: str):
    found = [r["provenance"].get("parameters", {}).get(name) for r in _runs_of(runs, notebook, model)]
    return next((v for v in found if v is not None), None)


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None


def _grade(value: float | None, strong: float, weak: float, words=("agrees", "agrees in part", "disagrees")) -> str:
    if value is None:
        return "cannot be judged (missing)"
    return words[0] if value >= strong else words[1] if value >= weak else words[2]


def _pair(value) -> tuple[float, float] | None:
    """An interval ``[low, high]`` as saved in findings, or ``None``."""
    ok = isinstance(value, list) and len(value) == 2 and all(_num(v) is not None for v in value)
    return (float(value[0]), float(value[1])) if ok else None


def _span(interval: tuple[float, float] | None) -> str:
    return "(missing)" if interval is None else f"{interval[0]:.2f} to {interval[1]:.2f}"


def _two(value: float | None, digits: int = 2) -> str:
    return "(missing)" if value is None else f"{value:.{digits}f}"


def _with(value: float | None, interval: tuple[float, float] | None) -> str:
    """A number and its interval in words: ``0.92 (0.88 to 0.93)``; ``0.92 (no interval)`` without one."""
    return f"{_two(value)} ({'no interval' if interval is None else _span(interval)})"


P_LEVEL = 0.05  # a permutation p-value below this says the languages differ


def ablation_verdict(english: tuple[float, float] | None, gap: tuple[float, float] | None) -> str:
    """The paper's claim for a set of components, "ablating them hurts English, and more than Chinese", from
    95% intervals: English's relative metric and the gap (how much more English loses than Chinese).

    "as in the paper" when English's interval lies below 1 and the gap's above 0; "unlike the paper" when
    the gap's lies below 0 (Chinese loses more); otherwise "inconclusive": an interval crosses the line
    the claim needs (or is missing).
    """
    if english is None or gap is None:
        return "inconclusive"
    if gap[1] < 0:
        return "unlike the paper"
    return "as in the paper" if english[1] < 1 and gap[0] > 0 else "inconclusive"


def frequency_verdict(ci, chance, p: float | None) -> tuple[str, str]:
    """Two claims about head frequency, each "inconclusive" where the numbers do not decide it:

    - shared heads: "beyond chance" when the correlation's 95% interval ``ci`` lies above the 95% range
      with the heads paired at random (``chance``);
    - used differently: "yes" when shuffling the language labels across prompts gives a correlation as low
      as the observed one with ``p`` below :data:`P_LEVEL`.
    """
    shared = "beyond chance" if ci is not None and chance is not None and ci[0] > chance[1] else "inconclusive"
    different = "yes" if p is not None and p < P_LEVEL else "inconclusive"
    return shared, different


def _frequency_words(find, n_prompts) -> str:
    """Head frequency's correlation beside its references, and its verdict (:func:`frequency_verdict`)."""
    r, ci = _num(find(keys.FREQUENCY_CORRELATION)), _pair(find(keys.FREQUENCY_CORRELATION_CI))
    chance, p = _pair(find(keys.FREQUENCY_CHANCE)), _num(find(keys.FREQUENCY_SHUFFLED_P))
    halves = {lang: _two(_num(find(keys.frequency_split_half(lang)))) for lang in LANGUAGES}
    shared, different = frequency_verdict(ci, chance, p)
    return (
        f"On Gemma 3, head activation frequency in English and Chinese routes correlates at {_with(r, ci)} over "
        f"{n_prompts} prompts per language. Two halves of one language's prompts correlate at {halves['en']} "
        f"(English) and {halves['zh']} (Chinese), a half of each language at {_two(_num(find(keys.FREQUENCY_HALVES)))}, "
        f"heads paired at random {_span(chance)}; with the language labels shuffled across prompts, a correlation "
        f"this low has p = {_two(p, 3)}. Shared heads: {shared}; used differently: {different} (the rule: shared "
        f"beyond chance when the interval lies above the chance range, used differently when p < {P_LEVEL}, "
        f"otherwise inconclusive)."
    )


def _ablation_words(find) -> str:
    """The held-out ablation effects with their intervals, and each one's verdict (:func:`ablation_verdict`)."""
    heads = find(keys.ENGLISH_SPECIFIC_HEADS) or []
    n = {lang: find(keys.held_out_prompts(lang)) for lang in LANGUAGES}
    words = []
    for part, name in (
        (keys.ABLATE_ENGLISH_HEADS, "the English-specific heads"),
        (keys.ABLATE_LATE_FFNS, "the late FFNs"),
    ):
        en, zh = (_num(find(keys.ablation(lang, part))) for lang in LANGUAGES)
        en_ci, zh_ci = (_pair(find(keys.ablation_ci(lang, part))) for lang in LANGUAGES)
        gap, gap_ci = (
            _num(find(keys.ablation_gap(part, "en", "zh"))),
            _pair(find(keys.ablation_gap_ci(part, "en", "zh"))),
        )
        if en is None or zh is None or gap is None:
            continue
        words.append(
            f"ablating {name} leaves English at {_with(en, en_ci)} and Chinese at {_with(zh, zh_ci)} of the full "
            f"model's metric: English loses {_with(gap, gap_ci)} more, {ablation_verdict(en_ci, gap_ci)}"
        )
    return (
        f" The heads used more in English ({', '.join(map(str, heads)) or 'none'}) were chosen on one half of the "
        f"prompts; on the other half ({n['en']} English, {n['zh']} Chinese prompts; "
        f"{find(keys.ABLATION_METHOD) or 'unnamed'} ablation; 95% bootstrap intervals) "
        + "; ".join(words)
        + " (the rule: as in the paper when English's interval lies below 1 and the gap's above 0, unlike it "
        "when the gap's lies below 0, otherwise inconclusive)."
    )


def past_tense(runs: list[dict]) -> list[str]:
    """Gemma 3's past-tense findings against the paper's, from notebook 02's numbers: the head-frequency
    correlation against its references, and the ablation effects on held-out prompts, each with its verdict."""
    g = REAL_MODELS[0]
    find = lambda key: _finding(runs, "02_past_tense", g, key)  # noqa: E731
    words = _frequency_words(find, _parameter(runs, "02_past_tense", g, "n_prompts")) + _ablation_words(find)
    if _num(find(keys.FREQUENCY_CORRELATION)) is None:
        return []
    return [
        "- **Different process, different components?** The paper found Qwen2-0.5B using a copy head in both "
        "languages and a past-tense head and late FFNs only in English. " + words
    ]


def _circuit_words(find, model: str, language: str, method: str = "eap-ig") -> str | None:
    """``"499 edges (8.8% of the model's), 67 heads and MLPs, keeping 0.78 (0.69 to 0.87) of ..."`` from notebook 01."""
    stat = lambda name: find("01_ioi_circuit", model, keys.circuit("ioi", language, method, name))  # noqa: E731
    edges, share, nodes, faith = stat("edges"), _num(stat("edge_share")), stat("nodes"), _num(stat("faithfulness"))
    if edges is None or faith is None:
        return None
    ci = _pair(stat("ci"))
    over = ci is not None and ci[0] > 1  # the whole interval above the model's own behaviour
    return (
        f"{edges} edges ({share:.1%} of the model's), {nodes} heads and MLPs, keeping "
        f"{_with(faith, ci)} of its behaviour on held-out prompts"
        + (" (more than the model: it leaves out edges that work against the answer)" if over else "")
    )


def _same_circuit(find, g: str) -> list[str]:
    """Part 1: the paper found BLOOM-560M's English and Chinese IOI circuits sharing most functional heads."""
    nb, pair = "03_compare_circuits", ("en", "zh")
    word = find(nb, g, keys.verdict("ioi", *pair))
    circuits = {lang: _circuit_words(find, g, lang) for lang in pair}
    if word is None and not any(circuits.values()):
        return []
    cross = {
        (a, b): (_num(find(nb, g, keys.cross_faithfulness("ioi", a, b))), find(nb, g, keys.cross_ci("ioi", a, b)))
        for a, b in (pair, pair[::-1])
    }
    stat = lambda unit, name: find(nb, g, keys.overlap("ioi", unit, name, *pair))  # noqa: E731
    text = (
        "- **Same process, same circuit?** The paper found that BLOOM-560M's English and Chinese IOI circuits share "
        f"most of their functional heads. On Gemma 3 270M the verdict is **{word or 'missing'}** (the rule: "
        f"`lsa.circuits.VERDICT_RULE`, in notebook 03). Edge-attribution circuits (EAP-IG, 64 discovery prompts each): "
        f"English {circuits['en'] or 'missing'}; Chinese {circuits['zh'] or 'missing'}."
    )
    words = [
        f"the {NAMES[a]} circuit keeps {_with(v, _pair(ci))} of the {NAMES[b]} behaviour"
        for (a, b), (v, ci) in cross.items()
        if v is not None
    ]
    if words:
        text += " Across languages, " + " and ".join(words) + "."
    observed = _num(stat("nodes", "observed"))
    if observed is not None:
        text += (
            f" Their heads and MLPs overlap at Jaccard {_with(observed, _pair(stat('nodes', 'ci')))}, against "
            f"{_num(stat('nodes', 'chance')):.2f} for random circuits of the same sizes; two halves of one language's "
            f"prompts give {_num(stat('nodes', 'within_a')):.2f} (English) and {_num(stat('nodes', 'within_b')):.2f} "
            f"(Chinese), a half of each language against the other {_num(stat('nodes', 'across_halves')):.2f}."
        )
    return [text]


def _two_models(find, g: str, s: str) -> list[str]:
    """Part 2: the paper found GPT-2 and CPM largely using the same IOI algorithm."""
    smol = _circuit_words(find, s, "en")
    if smol is None:
        return []
    pair = (f"{g}/en", f"{s}/en")  # the circuits' labels: lsa.workbook.circuit_labels of two models
    roles = _num(find("03_compare_circuits", f"{g}+{s}", keys.circuit_comparison("ioi", "role_agreement", *pair)))
    shared = find("03_compare_circuits", f"{g}+{s}", keys.circuit_comparison("ioi", "shared", *pair))
    faithful = [_num(find("01_ioi_circuit", m, keys.circuit("ioi", "en", "eap-ig", "faithfulness"))) for m in (g, s)]
    judged = all(f is not None and f >= 0.8 for f in faithful)
    return [
        f"- **Independently trained models, one process?** The paper found GPT-2 and CPM largely using the same IOI "
        f"algorithm. SmolLM2 135M's English circuit: {smol}. The roles both circuits hold: "
        f"{', '.join(map(str, shared or [])) or 'none'}"
        + (f" (role agreement {roles:.2f})" if roles is not None else "")
        + (
            "."
            if judged
            else "; with a circuit below 0.8 of its behaviour on held-out prompts, the comparison of roles is inconclusive."
        )
    ]


def compare_with_paper(runs: list[dict]) -> list[str]:
    """Plain-words statements of what the real models show against the paper's findings, from the saved numbers."""
    g, s = REAL_MODELS
    out = []
    find = lambda nb, model, key: _finding(runs, nb, model, key)  # noqa: E731
    out += _same_circuit(find, g)
    out += _two_models(find, g, s)
    # 3. different process, different components (the paper: Qwen2's past-tense head and late FFNs only in English)
    out += past_tense(runs)
    # 4. language-specific neurons (LAPE) and steering
    counts = {lang: find("04_language_neurons", g, keys.neuron_count("lape", lang)) for lang in ("en", "zh")}
    off = {
        (a, b): _num(find("04_language_neurons", g, keys.neurons_off("lape", a, b)))
        for a in ("en", "zh")
        for b in ("en", "zh")
    }
    if counts["en"] is not None:
        words = []
        for a, b in (("zh", "en"), ("en", "zh")):
            own, other = off[a, a], off[a, b]
            if own is None or other is None:
                continue
            specific = own > 0.05 and own > 2 * max(
                other, 0.0
            )  # nats: it raises its own language's loss, not the other's
            words.append(
                f"switching the {NAMES[a]} ones off changes the {NAMES[a]} loss by {own:+.3g} nats and the {NAMES[b]} "
                f"loss by {other:+.3g}: "
                + (
                    f"{NAMES[a]}-specific, as LAPE's authors report"
                    if specific
                    else "not specific, unlike LAPE's report"
                )
            )
        steer = {
            k: v
            for run in _runs_of(runs, "04_language_neurons", g)
            for k, v in run["findings"].items()
            if PAPER_STEERING.fullmatch(k)
        }
        steered = "; ".join(f"{item.get('statement', k)}: {_fmt(item.get('value'))}" for k, item in steer.items())
        out.append(
            f"- **Language-specific neurons.** LAPE finds {counts['en']} English and {counts['zh']} Chinese neurons in "
            f"Gemma 3; " + "; ".join(words) + "." + (f" Steering ({steered})." if steered else "")
        )
    out += latent_language(runs)
    return out


def write_report(output: Path, runs: list[dict], wall_s: float, note: str = "") -> Path:
    """``report.md`` and ``report.html`` in ``output``; returns the HTML path. ``note``: a line for the
    real models' section (why it is missing)."""
    zoo = [r for r in runs if not _is_real(r)]
    real = [r for r in runs if _is_real(r)]
    lines = ["# lsa: findings on the toy zoo and real pretrained models", ""]
    lines += [f"Run folder: `{output}`; wall time {wall_s:.0f} s.", ""]
    lines += ["## Headline findings: the toy zoo", "", *_headlines(zoo, HEADLINES), ""]
    lines += ["## Real pretrained models: Gemma 3 270M and SmolLM2 135M", ""]
    if note:
        lines += [note, ""]
    if real:
        lines += [
            "Both are dequantised 4-bit copies of the released weights (close to them, not equal; see their cards "
            "in `data/models/`).",
            "",
            "### Against the paper",
            "",
            *compare_with_paper(real),
            "",
            "### Headline numbers",
            "",
            *_headlines(real, REAL_HEADLINES),
            "",
        ]
    runs = zoo + real
    for run in runs:
        prov = run["provenance"]
        rel = run["folder"].relative_to(output)
        lines += [f"## {prov['notebook'].removesuffix('.ipynb')} — {prov['model']} ({prov['language']})", ""]
        if prov["status"] != "ok":
            lines += [f"**Failed**: `{prov['error']}` (see `{rel}/notebook.ipynb`)", ""]
        for key, item in run["findings"].items():
            if isinstance(item, dict):
                note = f" ({item['note']})" if item.get("note") else ""
                lines.append(f"- **{key}** = {_fmt(item.get('value'))}: {item.get('statement', '')}{note}")
            else:
                lines.append(f"- **{key}** = {_fmt(item)}")
        lines.append("")
        for fig in run["figures"]:
            lines += [f"![{fig.stem}]({fig.relative_to(output)})", ""]
    md = "\n".join(lines)
    (output / "report.md").write_text(md)
    body = []
    for line in lines:
        if line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:]).replace('**', '')}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    page = "<!doctype html><meta charset='utf-8'><title>lsa report</title>" + "\n".join(body)
    path = output / "report.html"
    path.write_text(page)
    return path


def real_cells(output: Path, quick: bool) -> tuple[list[runner.Cell], str]:
    """The ``real`` preset's cells, or none and a line saying why (models not installed)."""
    from lsa import pretrained

    missing = [n for n in sorted(pretrained.NAMES) if not pretrained.is_installed(n)]
    if missing:
        return [], (
            f"real pretrained models not installed ({', '.join(missing)}): run `{pretrained.INSTALL_COMMAND}`; "
            "this report covers the toy zoo only"
        )
    return runner.plan_preset("real", output, params=QUICK if quick else None), ""


def main(
    output: str | Path | None = None,
    quick: bool = False,
    cell_timeout: int | None = runner.DEFAULT_CELL_TIMEOUT,
    jobs: int = 1,
    real: bool = True,
) -> int:
    """Run the zoo grid and the real models' grid (``real``), write the report, print where it is.
    Non-zero exit if any run failed.

    ``cell_timeout``: seconds one notebook cell may run before its grid cell fails (0 or ``None``: no limit);
    ``jobs``: notebooks run at once."""
    output = Path(output or Path("runs") / time.strftime("reproduce-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    cells = runner.plan_preset("zoo", output, params=QUICK if quick else None)
    note = ""
    if real:
        extra, note = real_cells(output, quick)
        cells = extra + cells  # the long real-model runs first: with two jobs the zoo's short ones fill in
        if note:
            print(f"lsa reproduce: {note}")
    result = runner.run_grid(cells, cell_timeout=cell_timeout, jobs=jobs)
    report = write_report(output, collect(output), time.perf_counter() - start, note=note)
    print(result.table()[["notebook", "model", "language", "status", "wall_s"]].to_string(index=False))
    for cell in result.failed:
        print(f"FAILED {cell.label}: {cell.error}")
    print(f"\nreport: {report}\n        {output / 'report.md'}")
    return 1 if result.failed else 0


# ---------------------------------------------------------------------------- latent language (notebook 06)
LATENT = "06_latent_language"
ANSWERED = 0.5  # top-1 accuracy from which a set is evidence about the layers' language
LATENT_CLAIMS = {  # target language: (what the paper found, verdict when the other language leads in all / some / none)
    "zh": (
        "Wendler et al. found Llama-2's middle layers favour the English version of the answer, the prompt's "
        "language taking over only in the last layers",
        (
            "agrees: English leads in the middle layers",
            "agrees in part: English leads in {k} of {n} sets",
            "disagrees: it shows no English phase",
        ),
    ),
    "en": (
        "Zhong et al. found that models trained largely on a language other than English think in that language, "
        "or in it and English, where English-centric models think in English",
        (
            "shows a Chinese phase, as Zhong et al. find for models trained much on that language",
            "shows a Chinese phase in {k} of {n} sets",
            "shows no Chinese phase, as for the English-centric models Zhong et al. compare against",
        ),
    ),
}


def _layer_list(layers: list) -> str:
    """``[12, 13, 14, 16]`` -> ``"12-14, 16"``."""
    parts: list[list[int]] = []
    for layer in layers:
        if parts and layer == parts[-1][-1] + 1:
            parts[-1].append(layer)
        else:
            parts.append([layer])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def _latent_set(runs: list[dict], model: str, task: str, source: str, target: str) -> dict | None:
    """What notebook 06 saved on one set of ``model``: top-1, takeover, and the other language's leads, peak
    median probability and best median rank (before the last layer); None where it saved nothing."""
    where = (task, source, target)
    top1 = _num(_finding(runs, LATENT, model, keys.latent_top1(*where)))
    if top1 is None:
        return None
    medians = _finding(runs, LATENT, model, keys.latent_median(*where, "other")) or [0.0]
    ranks = _finding(runs, LATENT, model, keys.latent_rank(*where, "other")) or [0.0, 0.0]
    peak = max(range(len(medians)), key=medians.__getitem__)
    best = min(range(len(ranks) - 1), key=ranks.__getitem__)
    return {
        "name": f"{task} {source}->{target}" if task == "translation" else f"{task} {target}",
        "top1": top1,
        "layer": _num(_finding(runs, LATENT, model, keys.latent_overtake(*where))),
        "last": len(medians) - 2,
        "leads": _finding(runs, LATENT, model, keys.latent_leads(*where, "other")) or [],
        "peak": (medians[peak], peak - 1),
        "rank": (ranks[best], best - 1),
    }


def _latent_words(s: dict, other: str) -> str:
    """One set in words: its top-1, where the other language leads (else its peak and best rank), the takeover."""
    leads = (
        f"leads at layer{'s' * (len(s['leads']) > 1)} {_layer_list(s['leads'])}" if s["leads"] else "leads at no layer"
    )
    peak, rank = s["peak"], s["rank"]
    take = "the target never takes over" if s["layer"] is None else f"the target leads from layer {s['layer']:.0f}"
    return (
        f"{s['name']} (top-1 {s['top1']:.2f}): {NAMES[other]} {leads} (median probability at most {peak[0]:.3f}, "
        f"layer {peak[1]}; best median rank {rank[0]:.0f}, layer {rank[1]}), {take} (layers 0-{s['last']})"
    )


def latent_language(runs: list[dict], model: str = REAL_MODELS[0]) -> list[str]:
    """Two sentences on the layers' language (notebook 06): Chinese prompts against Wendler et al.'s English
    latent, English prompts against Zhong et al.'s non-English one. The verdict rests on the repetition and
    cloze sets (no word of the other language in the prompt) that the model answers (top-1 >= ANSWERED)."""
    out = []
    for target, other in (("zh", "en"), ("en", "zh")):
        clean = [s for task in ("repetition", "cloze") if (s := _latent_set(runs, model, task, target, target))]
        if not clean:
            continue
        answered = [s for s in clean if s["top1"] >= ANSWERED]
        leading = [s for s in answered if s["leads"]]
        claim, (every, some, none) = LATENT_CLAIMS[target]
        verdict = (
            "cannot be judged (it answers too few of these prompts)"
            if not answered
            else every
            if len(leading) == len(answered)
            else some.format(k=len(leading), n=len(answered))
            if leading
            else none
        )
        translation = _latent_set(runs, model, "translation", other, target)
        out.append(
            f"- **Latent language ({NAMES[target]} prompts).** {claim}. Gemma 3 270M {verdict}. On {NAMES[target]} "
            f"prompts that hold no {NAMES[other]}: "
            + "; ".join(_latent_words(s, other) for s in clean)
            + (
                ""
                if translation is None
                else f". Translating from {NAMES[other]}, whose word is then in the prompt: "
                + _latent_words(translation, other)
            )
            + ". (The logit lens at each layer, medians over words; a lead: the 95% interval of the paired "
            "difference excludes 0 and the leader holds at least 1%; sets with top-1 below 0.5 do not count.)"
        )
    return out
