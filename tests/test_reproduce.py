"""`lsa reproduce` end to end on the toy zoo (small prompt sets), and the paper preset on random models."""

import json
import math
import re
from pathlib import Path

import pytest
from helpers import strict_json

from lsa import reproduce, runner


def _report_sections(text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """``(notebook, model, language) -> {finding: value text}`` parsed back out of report.md."""
    sections, current = {}, None
    for line in text.splitlines():
        if m := re.fullmatch(r"## (\S+) — (\S+) \((\S+)\)", line):
            current = sections.setdefault(m.groups(), {})
        elif current is not None and (m := re.match(r"- \*\*(\S+)\*\* = (.*?): ", line)):
            current[m.group(1)] = m.group(2)
    return sections


def _same(text: str, value) -> bool:
    if value is None:  # findings.json's null (a missing or undefined number)
        return text == "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return text == str(value)
    return math.isclose(float(text), value, rel_tol=5e-3, abs_tol=1e-12)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    code = reproduce.main(output=out, quick=True, real=False, jobs=2, cell_timeout=300)  # 03 waits for 01
    return code, out


def test_reproduce_runs_every_notebook_on_the_zoo_and_all_succeed(reproduced):
    code, out = reproduced
    provenance = [json.loads(p.read_text()) for p in out.rglob("provenance.json")]
    failed = [(p["notebook"], p["model"], p["error"]) for p in provenance if p["status"] != "ok"]
    assert failed == []
    assert code == 0
    notebooks = {p["notebook"].removesuffix(".ipynb") for p in provenance}
    assert notebooks == {p.stem for p in runner.NOTEBOOK_DIR.glob("*.ipynb")}
    assert len(provenance) == len(runner.PRESETS["zoo"]) + 1  # 01_ioi_circuit runs twice on toy-bilingual


def test_report_numbers_are_the_notebooks_saved_findings(reproduced):
    _, out = reproduced
    sections = _report_sections((out / "report.md").read_text())
    checked = 0
    for prov_path in out.rglob("provenance.json"):
        prov = json.loads(prov_path.read_text())
        findings = strict_json((prov_path.parent / "findings.json").read_text())
        assert findings, f"{prov['notebook']} wrote no findings"
        section = sections[(prov["notebook"].removesuffix(".ipynb"), prov["model"], prov["language"])]
        for key, item in findings.items():
            assert _same(section[key], item["value"]), (key, section[key], item["value"])
            checked += 1
    assert checked >= 40
    html = (out / "report.html").read_text()
    for png in out.rglob("*.png"):
        assert str(png.relative_to(out)) in html


def _run(notebook: str, model: str, findings: dict) -> dict:
    prov = {"notebook": f"{notebook}.ipynb", "model": model, "language": "en+zh", "status": "ok"}
    return {"provenance": prov, "findings": {k: {"value": v, "statement": k} for k, v in findings.items()}}


def _circuit(language: str, edges: int, share: float, nodes: int, faith: float, interval: list) -> dict:
    stat = lambda name: f"ioi_circuit_{language}_eap-ig_{name}"  # noqa: E731
    return {stat("edges"): edges, stat("edge_share"): share, stat("nodes"): nodes}.__or__(
        {stat("faithfulness"): faith, stat("ci"): interval}
    )


def test_the_real_models_section_states_agreement_with_the_paper_from_the_numbers():
    g, s = reproduce.REAL_MODELS
    overlap = {"observed": 0.5, "ci": [0.4, 0.6], "chance": 0.2, "within_a": 0.7, "within_b": 0.65}
    runs = [
        _run(
            "01_ioi_circuit",
            g,
            _circuit("en", 93, 0.0162, 40, 0.85, [0.8, 0.9]) | _circuit("zh", 120, 0.02, 44, 0.7, [0.6, 0.8]),
        ),
        _run("01_ioi_circuit", s, _circuit("en", 300, 0.004, 50, 1.2, [1.05, 1.4])),  # more than the model
        _run(
            "03_compare_circuits",
            g,
            {
                "ioi_verdict_en_vs_zh": "inconclusive",
                "ioi_faithfulness_en_on_zh": 0.61,
                "ioi_ci_en_on_zh": [0.5, 0.7],
                "ioi_faithfulness_zh_on_en": 0.83,
                **{f"ioi_overlap_nodes_{k}_en_vs_zh": v for k, v in overlap.items()},
                "ioi_overlap_nodes_across_halves_en_vs_zh": 0.45,
            },
        ),
        _run(
            "03_compare_circuits",
            f"{g}+{s}",
            {
                f"ioi_circuit_role_agreement_{g}_en_vs_{s}_en": 0.5,
                f"ioi_circuit_shared_{g}_en_vs_{s}_en": ["name mover"],
            },
        ),
        _run(
            "02_past_tense",
            g,
            {
                "frequency_correlation": 0.8,
                "frequency_correlation_ci": [0.7, 0.9],
                "frequency_split_half_en": 0.95,
                "frequency_split_half_zh": 0.93,
                "frequency_correlation_halves": 0.78,
                "frequency_correlation_chance": [-0.2, 0.25],
                "frequency_correlation_shuffled_p": 0.001,
                "english_specific_heads": ["7.1"],
                "ablation_method": "interchange",
                "held_out_prompts_en": 24,
                "held_out_prompts_zh": 23,
                # English loses more, every interval clear of the line: as in the paper
                "ablation_en_English-specific_heads": 0.4,
                "ablation_en_English-specific_heads_ci": [0.3, 0.5],
                "ablation_zh_English-specific_heads": 0.95,
                "ablation_zh_English-specific_heads_ci": [0.9, 1.0],
                "ablation_English-specific_heads_gap_en_vs_zh": 0.55,
                "ablation_English-specific_heads_gap_en_vs_zh_ci": [0.4, 0.7],
                # the gap's interval crosses 0: inconclusive
                "ablation_en_late_FFNs": 0.7,
                "ablation_en_late_FFNs_ci": [0.5, 0.9],
                "ablation_zh_late_FFNs": 0.8,
                "ablation_zh_late_FFNs_ci": [0.6, 1.0],
                "ablation_late_FFNs_gap_en_vs_zh": 0.1,
                "ablation_late_FFNs_gap_en_vs_zh_ci": [-0.1, 0.3],
            },
        ),
        _run(
            "04_language_neurons",
            g,
            {"lape_neurons_en": 30, "lape_neurons_zh": 40, "lape_off_en_loss_en": 0.5, "lape_off_en_loss_zh": 0.01}
            | {"lape_off_zh_loss_zh": 0.02, "lape_off_zh_loss_en": 0.3},
        ),
    ]
    text = "\n".join(reproduce.compare_with_paper(runs))
    assert "On Gemma 3 270M the verdict is **inconclusive**" in text
    assert "English 93 edges (1.6% of the model's), 40 heads and MLPs, keeping 0.85 (0.80 to 0.90)" in text
    assert "Chinese 120 edges (2.0% of the model's), 44 heads and MLPs, keeping 0.70 (0.60 to 0.80)" in text
    assert "the English circuit keeps 0.61 (0.50 to 0.70) of the Chinese behaviour" in text
    assert "the Chinese circuit keeps 0.83 (no interval) of the English behaviour" in text
    assert "Jaccard 0.50 (0.40 to 0.60), against 0.20 for random circuits" in text
    assert "give 0.70 (English) and 0.65 (Chinese), a half of each language against the other 0.45" in text
    assert "SmolLM2 135M's English circuit: 300 edges (0.4% of the model's)" in text
    assert "keeping 1.20 (1.05 to 1.40) of its behaviour on held-out prompts (more than the model: it leaves" in text
    assert text.count("more than the model") == 1  # not where the interval reaches 1 or below
    assert "The roles both circuits hold: name mover (role agreement 0.50)." in text
    assert "correlates at 0.80 (0.70 to 0.90)" in text and "heads paired at random -0.20 to 0.25" in text
    assert "at 0.95 (English) and 0.93 (Chinese), a half of each language at 0.78" in text
    assert "Shared heads: beyond chance; used differently: yes" in text
    assert "(7.1) were chosen on one half" in text and "(24 English, 23 Chinese prompts; interchange ablation" in text
    assert "English at 0.40 (0.30 to 0.50) and Chinese at 0.95 (0.90 to 1.00)" in text
    assert "English loses 0.55 (0.40 to 0.70) more, as in the paper" in text
    assert "English loses 0.10 (-0.10 to 0.30) more, inconclusive" in text
    past = next(r for r in runs if r["provenance"]["notebook"] == "02_past_tense.ipynb")["findings"]
    past["ablation_late_FFNs_gap_en_vs_zh_ci"]["value"] = [-0.3, -0.05]  # Chinese loses more
    past["ablation_en_English-specific_heads_ci"]["value"] = [0.3, 1.05]  # English may not lose at all
    past["frequency_correlation_chance"]["value"] = [-0.2, 0.75]  # the interval reaches into chance
    past["frequency_correlation_shuffled_p"]["value"] = 0.2
    text = "\n".join(reproduce.compare_with_paper(runs))
    assert "more, unlike the paper" in text and "English loses 0.55 (0.40 to 0.70) more, inconclusive" in text
    assert "Shared heads: inconclusive; used differently: inconclusive" in text
    # the English neurons matter to English; the Chinese ones more to English than to Chinese: not specific
    assert "English loss by +0.5 nats and the Chinese loss by +0.01: English-specific, as LAPE" in text
    assert "Chinese loss by +0.02 nats and the English loss by +0.3: not specific, unlike LAPE" in text
    runs[-1]["findings"]["lape_off_zh_loss_zh"]["value"] = 0.9
    assert "+0.9 nats and the English loss by +0.3: Chinese-specific" in "\n".join(reproduce.compare_with_paper(runs))
    assert reproduce.compare_with_paper([]) == []


def test_paper_preset_dry_run_lists_the_papers_models(capsys):
    from lsa import cli

    assert cli.main(["run", "--preset", "paper", "--dry-run", "-o", "/nonexistent/out"]) == 0
    listed = capsys.readouterr().out
    for model in ("bigscience/bloom-560m", "openai-community/gpt2", "mymusise/CPM-Generate-distill", "Qwen/Qwen2-0.5B"):
        assert f"| {model} |" in listed
    assert not Path("/nonexistent/out").exists()


def test_paper_preset_runs_offline_on_random_models_with_the_papers_layer_and_head_counts(tmp_path):
    params = {
        "n_prompts": [4],
        "n_heldout": [4],
        "n_path_prompts": [4],
        "steps": [1],
        "max_steps": [1],
        "n_texts": [16],
    }
    cells = runner.plan_preset("paper", tmp_path, random=True, params=params)
    assert {c.model for c in cells} >= {
        "random-narrow:bigscience/bloom-560m",
        "random-narrow:Qwen/Qwen2-0.5B",
        "random-narrow:openai-community/gpt2",
        "random-narrow:mymusise/CPM-Generate-distill",
    }
    result = runner.run_grid(cells, progress=False, cell_timeout=300)  # a hung kernel fails in minutes
    assert [(c.label, c.error) for c in result.failed] == []
    shapes = {json.loads(p.read_text())["model"]: p.parent for p in tmp_path.glob("01_ioi_circuit/*/*/provenance.json")}
    assert len(shapes) == 3  # BLOOM (en, zh), GPT-2 (en), CPM (zh): every IOI circuit run finished
