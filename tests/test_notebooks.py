"""The notebooks as a user opens them: every notebook in notebooks/, as it stands, with its default
parameters, run top to bottom under nbval (``--nbval-lax``: every cell must run without an error;
outputs are not compared, they hold timings and figures).

The notebooks are copied into a temporary folder first, so what they write (their default
``output_dir`` is ``../runs/interactive/<notebook>``) lands there and never in the repository.
Cost: one kernel per notebook on the toy zoo, about 2-4 minutes in all on one thread.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import ipywidgets

import widgets

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells(path: Path) -> int:
    return sum(c["cell_type"] == "code" for c in json.loads(path.read_text())["cells"])


def _interactive_outputs() -> set[Path]:
    return set((ROOT / "runs" / "interactive").rglob("*"))


def test_every_notebook_runs_with_its_defaults_under_nbval_and_writes_only_its_own_output_folder(tmp_path):
    assert NOTEBOOKS, "no notebooks found"
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the repository's pytest settings out
    repo_before = _interactive_outputs()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            "pytest.ini",
            "-p",
            "no:cacheprovider",
            "-q",
            "--nbval-lax",
            "--nbval-current-env",
            "--nbval-cell-timeout=600",  # a hung kernel fails this cell in minutes
            f"--junitxml={junit}",
            "notebooks",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # a guard against a hung kernel, far above the few minutes this takes
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    # every code cell of every notebook ran and passed
    cases = ET.parse(junit).getroot().iter("testcase")
    passed: dict[str, int] = {}
    for case in cases:
        assert not list(case), f"{case.get('classname')} {case.get('name')}: not passed"
        stem = (
            case.get("classname").removeprefix("notebooks.").removesuffix(".ipynb")
        )  # "notebooks.00_quickstart.ipynb"
        passed[stem] = passed.get(stem, 0) + 1
    assert passed == {p.stem: _code_cells(p) for p in NOTEBOOKS}

    # each notebook wrote into its own folder under runs/interactive/, with its own findings
    for path in NOTEBOOKS:
        folder = tmp_path / "runs" / "interactive" / path.stem
        findings = json.loads((folder / "findings.json").read_text())
        assert findings, f"{path.stem} stated no findings"
    assert sorted(p.name for p in (tmp_path / "notebooks").iterdir()) == sorted(p.name for p in NOTEBOOKS)
    assert _interactive_outputs() == repo_before  # nothing landed in the repository's runs/


def test_every_widget_class_imports_from_the_widgets_package():
    defined = {
        name
        for module in Path(widgets.__file__).parent.glob("*.py")
        if module.stem != "__init__"
        for name, obj in inspect.getmembers(__import__(f"widgets.{module.stem}", fromlist=["_"]), inspect.isclass)
        if issubclass(obj, ipywidgets.DOMWidget) and obj.__module__ == f"widgets.{module.stem}"
    }
    assert "NeuronExplorer" in defined
    assert defined <= set(widgets.__all__)
    assert all(getattr(widgets, name).__name__ == name for name in defined)


# ---------------------------------------------------------------- the widgets each notebook embeds
README = ROOT / "README.md"


# Notebooks whose explorer is still to come, and what it will be: an entry fails the test below
# as soon as its notebook embeds a widget (then remove the entry).
def _code_sources(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _widgets_used(source: str) -> set[str]:
    """The explorer classes (``widgets.__all__``) a piece of notebook code uses (not just imports)."""
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and n.id in widgets.__all__}


def _readme_widgets() -> dict[str, set[str]]:
    """``{notebook: widgets}`` from the README's notebook table (its last column, comma-separated)."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\| `(\d\d_\w+)` \|", line):
            last = line.strip().strip("|").split("|")[-1]
            rows[m.group(1)] = {name.strip() for name in last.split(",") if name.strip()}
    return rows


def test_the_readme_widget_table_names_the_widgets_each_notebook_embeds():
    table = _readme_widgets()
    assert sorted(table) == [p.stem for p in NOTEBOOKS], "the README's table needs one row per notebook"
    for path in NOTEBOOKS:
        used = set().union(*map(_widgets_used, _code_sources(path)))
        assert table[path.stem] == used, f"{path.stem}: the README says {table[path.stem]}, the notebook uses {used}"


def test_every_notebook_ends_with_an_explorer_of_its_results():
    for path in NOTEBOOKS:
        last = _widgets_used(_code_sources(path)[-1])
        assert last, f"{path.stem}: its last code cell shows no explorer (one of {widgets.__all__})"


def test_the_cells_that_show_an_explorer_and_only_those_are_tagged_for_the_grid_to_skip():
    from lsa.runner import WIDGET_TAG

    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "code":
                shows = bool(_widgets_used("".join(cell["source"])))
                tagged = WIDGET_TAG in cell["metadata"].get("tags", [])
                assert shows == tagged, f"{path.stem}: {''.join(cell['source'])[:60]!r} shows an explorer: {shows}"
