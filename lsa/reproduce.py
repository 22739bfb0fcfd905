"""``lsa reproduce``: every analysis on the toy zoo, then one report of the findings.

Each notebook writes ``findings.json`` into its run folder: named numbers with a
one-line statement each. The report (Markdown and HTML, figures embedded by
relative path) is assembled from those files and the saved figures only, so its
numbers are the notebooks' saved results.
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path

from lsa import runner

QUICK = {"n_prompts": [16], "n_texts": [200]}

# The findings the report leads with: (notebook, model, key pattern).
HEADLINES: list[tuple[str, str, str]] = [
    ("00_quickstart", "toy-bilingual", r"(ioi|past_tense)_(en|zh)_accuracy"),
    ("03_compare_circuits", "toy-bilingual", r"ioi_circuit_(jaccard|weighted_overlap|role_agreement|shared)_.*"),
    ("03_compare_circuits", "toy-bilingual", r"ioi_faithfulness_.*"),
    ("03_compare_circuits", "toy-en+toy-zh", r"ioi_circuit_(jaccard|role_agreement|shared)_.*"),
    ("03_compare_circuits", "toy-en+toy-zh", r"ioi_faithfulness_.*"),
    ("02_past_tense", "toy-bilingual", r"frequency_correlation|english_specific_heads|ablation_.*"),
    (
        "04_language_neurons",
        "toy-bilingual",
        r"(lape|plnd)_neurons_.*|(lape|plnd)_off_(en_loss_en|en_loss_zh)|.*_steer_.*",
    ),
]


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
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def write_report(output: Path, runs: list[dict], wall_s: float) -> Path:
    """``report.md`` and ``report.html`` in ``output``; returns the HTML path."""
    lines = ["# lsa: findings on the toy zoo", "", f"Run folder: `{output}`; wall time {wall_s:.0f} s.", ""]
    lines += ["## Headline findings", ""]
    for notebook, model, pattern in HEADLINES:
        for run in runs:
            prov = run["provenance"]
            if prov["notebook"].removesuffix(".ipynb") != notebook or prov["model"] != model:
                continue
            for key, item in run["findings"].items():
                if re.fullmatch(pattern, key):
                    lines.append(f"- {model}, {notebook}: {item.get('statement', key)} = **{_fmt(item.get('value'))}**")
    lines.append("")
    for run in runs:
        prov = run["provenance"]
        rel = run["folder"].relative_to(output)
        lines += [f"## {prov['notebook'].removesuffix('.ipynb')} — {prov['model']} ({prov['language']})", ""]
        if prov["status"] != "ok":
            lines += [f"**Failed**: `{prov['error']}` (see `{rel}/notebook.ipynb`)", ""]
        for key, item in run["findings"].items():
            if isinstance(item, dict):
                lines.append(f"- **{key}** = {_fmt(item.get('value'))}: {item.get('statement', '')}")
            else:
                lines.append(f"- **{key}** = {_fmt(item)}")
        lines.append("")
        for fig in run["figures"]:
            lines += [f"![{fig.stem}]({fig.relative_to(output)})", ""]
    md = "\n".join(lines)
    (output / "report.md").write_text(md)
    body = []
    for line in lines:
        if line.startswith("# "):
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


def main(
    output: str | Path | None = None, quick: bool = False, cell_timeout: int | None = runner.DEFAULT_CELL_TIMEOUT
) -> int:
    """Run the zoo grid, write the report, print where it is. Non-zero exit if any run failed.

    ``cell_timeout``: seconds one notebook cell may run before its grid cell fails (0 or ``None``: no limit)."""
    output = Path(output or Path("runs") / time.strftime("reproduce-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    cells = runner.plan_preset("zoo", output, params=QUICK if quick else None)
    result = runner.run_grid(cells, cell_timeout=cell_timeout)
    report = write_report(output, collect(output), time.perf_counter() - start)
    print(result.table()[["notebook", "model", "language", "status", "wall_s"]].to_string(index=False))
    for cell in result.failed:
        print(f"FAILED {cell.label}: {cell.error}")
    print(f"\nreport: {report}\n        {output / 'report.md'}")
    return 1 if result.failed else 0
