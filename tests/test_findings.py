"""Findings files: what a notebook run states, and nothing left from an earlier run; the keys that the
notebooks write and the report reads, made in one place."""

import ast
import itertools
import json
import re
import sys

import numpy as np
import pytest
import torch
from helpers import strict_json

from lsa import findings as keys
from lsa import reproduce, runner
from lsa.circuits import Circuit
from lsa.findings import Findings
from lsa.workbook import circuit_labels


def test_a_rerun_replaces_the_findings_file_and_keeps_no_stale_key(tmp_path):
    first = Findings(tmp_path)
    first.add("old_key", 1.0, "stated by the first run only")
    first.add("shared", 2.0)
    second = Findings(tmp_path)
    second.add("shared", torch.tensor(3.5), "restated")
    saved = json.loads((tmp_path / "findings.json").read_text())
    assert saved == {"shared": {"value": 3.5, "statement": "restated"}}


def test_values_are_saved_as_plain_json_numbers_and_lists(tmp_path):
    f = Findings(tmp_path)
    f.add("scalar", np.float32(0.25))
    f.add("vector", torch.tensor([1, 2, 3]))
    saved = json.loads((tmp_path / "findings.json").read_text())
    assert saved["scalar"]["value"] == 0.25 and saved["vector"]["value"] == [1, 2, 3]
    assert f["vector"] == [1, 2, 3]


def test_undefined_and_missing_numbers_are_written_as_null_with_a_note_saying_why(tmp_path):
    f = Findings(tmp_path)
    f.add("nan", float("nan"), "a correlation")
    f.add("inf", np.float64("inf"), "a ratio")
    f.add("missing", None, "a number nobody computed")
    f.add("partly", torch.tensor([1.0, float("nan")]), "two means")
    f.add("explained", float("nan"), "a correlation", note="the effects do not vary: no correlation")
    f.add("fine", 0.5, "a share")
    saved = strict_json((tmp_path / "findings.json").read_text())
    assert [saved[k]["value"] for k in ("nan", "inf", "missing", "partly", "fine")] == [
        None,
        None,
        None,
        [1.0, None],
        0.5,
    ]
    assert "nan" in saved["nan"]["note"] and "inf" in saved["inf"]["note"] and "missing" in saved["missing"]["note"]
    assert "nan" in saved["partly"]["note"]
    assert saved["explained"]["note"] == "the effects do not vary: no correlation"
    assert "note" not in saved["fine"]


def test_the_report_shows_a_null_finding_with_its_note(tmp_path):
    run = tmp_path / "05_activation_patching" / "toy-bilingual" / "en+zh"
    Findings(run).add(keys.HEAD_EFFECT_CORRELATION, float("nan"), "per-head correlation", note="one language only")
    (run / "provenance.json").write_text(
        json.dumps(
            {"notebook": "05_activation_patching.ipynb", "model": "toy-bilingual", "language": "en+zh", "status": "ok"}
        )
    )
    reproduce.write_report(tmp_path, reproduce.collect(tmp_path), 1.0)
    report = (tmp_path / "report.md").read_text()
    assert f"**{keys.HEAD_EFFECT_CORRELATION}** = n/a: per-head correlation (one language only)" in report


# ---------------------------------------------------------------- keys shared by the notebooks and the report
NOTEBOOK_DIR = runner.NOTEBOOK_DIR
LANGUAGE_FIELDS = ("language", "other", "deactivated", "evaluated", "source", "target")
CIRCUIT_FIELDS = ("a", "b", "circuit")  # labels of circuits (lsa.workbook.circuit_labels)


def _source(notebook: str) -> ast.Module:
    cells = json.loads((NOTEBOOK_DIR / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    return ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))


def _written(notebook: str) -> set[str]:
    """The names in lsa.findings of the keys a notebook writes; fails on a key not made there."""
    tree = _source(notebook)
    alias = next(
        (
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "lsa"
            for a in n.names
            if a.name == "findings"
        ),
        None,
    )
    assert alias, f"{notebook} does not import lsa.findings, whose keys it must write with"
    stores = {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "Findings"
        for t in n.targets
    }
    names = set()
    for n in ast.walk(tree):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add"):
            continue
        if not (isinstance(n.func.value, ast.Name) and n.func.value.id in stores):
            continue
        key = n.args[0] if n.args else None
        made = key.func if isinstance(key, ast.Call) else key
        where = f"{notebook}, line {n.lineno} of its code: {ast.unparse(key) if key else 'no key'}"
        assert isinstance(made, ast.Attribute) and isinstance(made.value, ast.Name), where
        assert made.value.id == alias, where
        found = getattr(keys, made.attr, None)
        if isinstance(key, ast.Call):
            assert isinstance(found, keys.Key), where
        else:
            assert found in keys.FIXED_KEYS, where
        names.add(made.attr)
    return names


def test_every_notebook_writes_its_findings_with_the_keys_of_lsa_findings():
    written = {path.stem: _written(path.stem) for path in sorted(NOTEBOOK_DIR.glob("*.ipynb"))}
    assert len(written) == 7 and all(written.values()), written
    assert {"accuracy", "top1", "logit_diff"} <= written["00_quickstart"]
    assert "FREQUENCY_CORRELATION" in written["02_past_tense"] and "ablation" in written["02_past_tense"]


def test_a_key_written_as_text_fails_the_notebook_check(tmp_path, monkeypatch):
    text = {
        "cells": [
            {
                "cell_type": "code",
                "source": [
                    "from lsa import findings as keys\n",
                    "findings = Findings('.')\n",
                    "findings.add(keys.accuracy('ioi', 'en'), 1.0)\n",
                    "findings.add(f'ioi_{language}_top1', 1.0)\n",
                ],
            }
        ]
    }
    (tmp_path / "99_probe.ipynb").write_text(json.dumps(text))
    monkeypatch.setattr(sys.modules[__name__], "NOTEBOOK_DIR", tmp_path)
    with pytest.raises(AssertionError, match="ioi_"):
        _written("99_probe")


def _rows(preset: str, notebook: str, model: str) -> list[tuple]:
    rows = [r for r in runner.PRESETS[preset] if r[0] == notebook and model in r[1]]
    assert rows, f"the {preset} preset does not run {notebook} on {model}"
    return rows


def _candidates(preset: str, notebook: str, model: str) -> set[str]:
    """Every key ``notebook`` can write on ``model`` in ``preset``: its key kinds over the preset's languages,
    its circuits' labels, its parameters and each field's declared values."""
    rows = _rows(preset, notebook, model)
    languages = sorted({lang for r in rows for entry in r[2] for lang in entry.split("+")})
    refs = [
        re.fullmatch(r"\{circuit:([^:}]+):([^}]+)\}", ref).groups() for r in rows for ref in r[3].get("circuits", [])
    ]
    labels = circuit_labels([Circuit(m, 1, 1, "ioi", lang) for m, lang in refs])
    declared = runner.declared_parameters(NOTEBOOK_DIR / f"{notebook}.ipynb")
    strengths = [
        s for r in rows for s in r[3].get("strengths", declared["strengths"].value() if "strengths" in declared else [])
    ]
    out = set()
    for name in _written(notebook):
        kind = getattr(keys, name)
        if isinstance(kind, str):
            out.add(kind)
            continue
        domains = []
        for field in kind.fields:
            if field in kind.values:
                domains.append(kind.values[field])
            elif field in LANGUAGE_FIELDS:
                domains.append(languages)
            elif field in CIRCUIT_FIELDS:
                domains.append(labels)
            elif field == "strength":
                domains.append(strengths)
            else:
                raise AssertionError(f"no values to try for field {field!r} of {kind}")
        out |= {kind(*values) for values in itertools.product(*domains)}
    return out


def _headline_patterns():
    """``(preset, notebook, model, pattern)``: each pattern of each headline, and the paper comparison's one."""
    for preset, headlines in (("zoo", reproduce.HEADLINES), ("real", reproduce.REAL_HEADLINES)):
        yield from ((preset, nb, model, p) for nb, model, patterns in headlines for p in patterns)
    yield "real", "04_language_neurons", reproduce.REAL_MODELS[0], reproduce.PAPER_STEERING


@pytest.mark.parametrize(("preset", "notebook", "model", "pattern"), list(_headline_patterns()))
def test_every_headline_of_the_report_matches_a_key_its_notebook_writes(preset, notebook, model, pattern):
    candidates = _candidates(preset, notebook, model)
    matched = sorted(k for k in candidates if pattern.fullmatch(k))
    assert matched, f"{pattern.pattern} matches none of the keys {notebook} writes on {model}: {sorted(candidates)}"


class _Reads(dict):
    """Findings that remember every key asked for."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def get(self, key, default=None):
        self.asked.append(key)
        return super().get(key, default)


def test_every_number_the_paper_comparison_reads_is_a_key_its_notebook_writes():
    pairs = sorted({(nb, model) for nb, models, _, _ in runner.PRESETS["real"] for model in models})
    runs = [
        {"provenance": {"notebook": f"{nb}.ipynb", "model": model, "language": "en+zh"}, "findings": _Reads()}
        for nb, model in pairs
    ]
    assert reproduce.compare_with_paper(runs) == []  # nothing found: every section is skipped, every key asked
    asked = 0
    for (nb, model), run in zip(pairs, runs):
        unknown = set(run["findings"].asked) - _candidates("real", nb, model)
        assert not unknown, f"the paper comparison reads {sorted(unknown)} from {nb} on {model}, which it never writes"
        asked += len(run["findings"].asked)
    assert asked >= 20


def test_keys_are_formatted_one_word_per_field_and_refuse_undeclared_values():
    assert keys.accuracy("ioi", "en") == keys.accuracy(task="ioi", language="en") == "ioi_en_accuracy"
    assert keys.cross_faithfulness("ioi", "toy-en/en", "zh") == "ioi_faithfulness_toy-en_en_on_zh"
    assert keys.ablation("zh-marking", keys.ABLATE_LATE_FFNS) == "ablation_zh-marking_late_FFNs"
    assert keys.steering_share("lape", "en", "zh", 4.0) == "lape_steer_en_to_zh_x4"
    with pytest.raises(ValueError, match="late MLPs"):
        keys.ablation("en", "late MLPs")
    with pytest.raises(ValueError, match="takes ioi, past_tense"):
        keys.accuracy("sva", "en")
    with pytest.raises(TypeError, match="needs language"):
        keys.accuracy("ioi")
    pattern = keys.circuit_comparison.pattern(task="ioi", score=("jaccard", "shared"))
    assert pattern.fullmatch("ioi_circuit_shared_toy-en_en_vs_toy-zh_zh")
    assert not pattern.fullmatch("ioi_circuit_weighted_overlap_en_vs_zh")
    assert not pattern.fullmatch("past_tense_circuit_jaccard_en_vs_zh")
    ablation = keys.ablation.pattern(language="en")
    assert ablation.fullmatch("ablation_en_English-specific_heads") and not ablation.fullmatch("ablation_zh_late_FFNs")
    fixed = keys.exactly(keys.FREQUENCY_CORRELATION)
    assert fixed.fullmatch("frequency_correlation") and not fixed.fullmatch("frequency-correlation")
