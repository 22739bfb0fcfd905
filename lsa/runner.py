"""Batch runs: execute parameterised notebooks with papermill over a grid.

A grid is notebooks x models x languages x parameter values. Each cell of the
grid runs in its own folder::

    <output>/<notebook>/<model>/<language>[/<k=v,...>]/
        notebook.ipynb     the executed notebook (saved even when a cell fails)
        provenance.json    model, languages, parameters, seed, versions, git revision, wall time, status
        ...                whatever the notebook writes to ``output_dir`` (figures, result tables)

A failing cell of the grid is reported and the others still run. An existing
cell folder is never overwritten silently: the run stops before executing
anything unless ``overwrite`` or ``skip_existing`` is given.

Notebook convention: a cell tagged ``parameters`` defining ``model``,
``language`` or ``languages``, ``n_prompts``, ``seed``, ``device``,
``output_dir``; kernelspec metadata present.
"""

from __future__ import annotations

import itertools
import json
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
VERSIONED = ("lsa", "torch", "transformers", "nnsight", "tokenizers", "papermill", "pandas", "numpy")


# Named grids: (notebook, models, languages, parameters). The zoo mirrors the paper's
# design on the shipped toy models; "paper" names the paper's real models (these
# need internet or NDIF; ``random=True`` swaps in random models of the same shapes).
PRESETS: dict[str, list[tuple[str, list[str], list[str], dict]]] = {
    "zoo": [
        ("00_quickstart", ["toy-bilingual"], ["en+zh"], {}),
        ("00_quickstart", ["toy-en"], ["en"], {}),
        ("00_quickstart", ["toy-zh"], ["zh"], {}),
        ("01_ioi_circuit", ["toy-bilingual"], ["en", "zh"], {}),
        ("01_ioi_circuit", ["toy-en"], ["en"], {}),
        ("01_ioi_circuit", ["toy-zh"], ["zh"], {}),
        ("02_past_tense", ["toy-bilingual"], ["en+zh"], {}),
        (
            "03_compare_circuits",
            ["toy-bilingual"],
            ["en+zh"],
            {"circuits": ["{circuit:toy-bilingual:en}", "{circuit:toy-bilingual:zh}"]},
        ),
        (
            "03_compare_circuits",
            ["toy-en+toy-zh"],
            ["en+zh"],
            {"circuits": ["{circuit:toy-en:en}", "{circuit:toy-zh:zh}"]},
        ),
        ("04_language_neurons", ["toy-bilingual"], ["en+zh"], {}),
        ("05_activation_patching", ["toy-bilingual"], ["en+zh"], {}),
    ],
    "paper": [
        ("00_quickstart", ["bigscience/bloom-560m", "Qwen/Qwen2-0.5B"], ["en+zh"], {}),
        ("00_quickstart", ["openai-community/gpt2"], ["en"], {}),
        ("00_quickstart", ["mymusise/CPM-Generate-distill"], ["zh"], {}),
        ("01_ioi_circuit", ["bigscience/bloom-560m"], ["en", "zh"], {}),
        ("01_ioi_circuit", ["openai-community/gpt2"], ["en"], {}),
        ("01_ioi_circuit", ["mymusise/CPM-Generate-distill"], ["zh"], {}),
        (
            "03_compare_circuits",
            ["bigscience/bloom-560m"],
            ["en+zh"],
            {"circuits": ["{circuit:bigscience/bloom-560m:en}", "{circuit:bigscience/bloom-560m:zh}"]},
        ),
        (
            "03_compare_circuits",
            ["gpt2+CPM"],
            ["en+zh"],
            {"circuits": ["{circuit:openai-community/gpt2:en}", "{circuit:mymusise/CPM-Generate-distill:zh}"]},
        ),
        ("05_activation_patching", ["bigscience/bloom-560m"], ["en+zh"], {}),
        ("02_past_tense", ["Qwen/Qwen2-0.5B"], ["en+zh"], {}),
    ],
}
# "{circuit:<model>:<language>}" in a preset parameter is the circuit.json that
# 01_ioi_circuit writes for that model and language in the same grid.
_CIRCUIT_REF = re.compile(r"\{circuit:([^:}]+):([^}]+)\}")


class GridError(ValueError):
    """A grid that cannot run (unknown notebook or parameter, existing output)."""


@dataclass
class Cell:
    """One run of one notebook: its parameters and its folder."""

    notebook: Path
    model: str
    language: str
    params: dict
    folder: Path
    root: Path
    status: str = "pending"
    error: str = ""
    wall_s: float = 0.0

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.notebook.stem} | {self.model} | {self.language}" + (f" | {extra}" if extra else "")


def parse_value(text: str):
    """``-p`` values: JSON where it parses (numbers, booleans, lists, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(pairs: list[str] | None) -> dict[str, list]:
    """``["n_prompts=20", "seed=0", "seed=1"]`` -> ``{"n_prompts": [20], "seed": [0, 1]}`` (repeats make a grid)."""
    grid: dict[str, list] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise GridError(f"bad parameter {pair!r}: write key=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise GridError(f"bad parameter name {key!r} in {pair!r}")
        grid.setdefault(key, []).append(parse_value(value))
    return grid


def resolve_notebook(name: str | Path) -> Path:
    """A notebook path, or a name under ``notebooks/`` with or without ``.ipynb`` or its number prefix."""
    path = Path(name)
    if path.exists():
        return path.resolve()
    stem = path.name.removesuffix(".ipynb")
    matches = [p for p in sorted(NOTEBOOK_DIR.glob("*.ipynb")) if p.stem == stem or p.stem.split("_", 1)[-1] == stem]
    if len(matches) != 1:
        known = ", ".join(p.stem for p in sorted(NOTEBOOK_DIR.glob("*.ipynb")))
        raise GridError(f"no notebook {name!r}; known notebooks: {known}")
    return matches[0]


def declared_parameters(notebook: Path) -> dict:
    """The names (and defaults, as text) in a notebook's ``parameters`` cell."""
    from papermill import inspect_notebook

    declared = inspect_notebook(str(notebook))
    if not declared:
        raise GridError(f"{notebook.name} has no cell tagged 'parameters'")
    return declared


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", str(text)).strip("_") or "x"


def language_params(declared: dict, language: str) -> dict:
    """Map one grid language (``en``, or ``en+zh`` for several) onto what the notebook declares."""
    langs = [lang for lang in re.split(r"[+,]", language) if lang]
    if "languages" in declared:
        return {"languages": langs}
    if "language" in declared:
        if len(langs) != 1:
            raise GridError(f"notebook takes one `language`, got {language!r}")
        return {"language": langs[0]}
    return {}


def plan(
    notebooks: list[str | Path],
    models: list[str],
    languages: list[str],
    params: dict[str, list] | None = None,
    output: str | Path = "runs",
) -> list[Cell]:
    """The grid as a list of :class:`Cell` (nothing runs). Unknown parameters are errors here."""
    params = params or {}
    output = Path(output)
    if not notebooks or not models or not languages:
        raise GridError("a grid needs at least one notebook, one model and one language")
    keys = sorted(params)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(params[k] for k in keys))]
    cells = []
    for nb_name in notebooks:
        notebook = resolve_notebook(nb_name)
        declared = declared_parameters(notebook)
        unknown = sorted(set(keys) - set(declared))
        if unknown:
            raise GridError(
                f"{notebook.name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(declared))}"
            )
        for model, language, combo in itertools.product(models, languages, combos):
            folder = output / notebook.stem / slug(model) / slug(language)
            if len(combos) > 1:
                folder = folder / slug(",".join(f"{k}={v}" for k, v in sorted(combo.items())))
            cells.append(Cell(notebook, model, language, dict(combo), folder, output))
    return cells


def plan_preset(
    name: str,
    output: str | Path = "runs",
    *,
    random: bool = False,
    params: dict[str, list] | None = None,
    notebooks: list[str] | None = None,
) -> list[Cell]:
    """The cells of a named grid. ``params`` override the preset's (only where a notebook declares them);
    ``random`` replaces each model id by ``random-narrow:<id>`` (its layer and head counts, random weights, offline)."""
    if name not in PRESETS:
        raise GridError(f"no preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    available = {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
    cells: list[Cell] = []
    for notebook, models, languages, preset_params in PRESETS[name]:
        if notebook not in available or (notebooks and notebook not in notebooks):
            continue
        declared = declared_parameters(resolve_notebook(notebook))
        name_of = lambda m: f"random-narrow:{m}" if random and "+" not in m else m  # noqa: E731
        values = {k: [_circuit_refs(v, Path(output), name_of)] for k, v in preset_params.items()}
        values.update({k: v for k, v in (params or {}).items() if k in declared})
        names = [name_of(m) for m in models]
        cells += plan([notebook], names, languages, values, output)
    return cells


def _circuit_refs(value, output: Path, name_of):
    """Replace ``{circuit:<model>:<language>}`` references by the path 01_ioi_circuit writes."""
    if isinstance(value, list):
        return [_circuit_refs(v, output, name_of) for v in value]
    if isinstance(value, str) and (m := _CIRCUIT_REF.fullmatch(value)):
        model, language = m.groups()
        return str(output.resolve() / "01_ioi_circuit" / slug(name_of(model)) / slug(language) / "circuit.json")
    return value


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_cell(cell: Cell, *, kernel: str | None = None, log_output: bool = False) -> Cell:
    """Execute one cell of the grid; failures are recorded in the cell, never raised."""
    import papermill

    cell.folder.mkdir(parents=True, exist_ok=True)
    declared = declared_parameters(cell.notebook)
    parameters = {"model": cell.model, **language_params(declared, cell.language), **cell.params}
    if "output_dir" in declared:
        parameters["output_dir"] = str(cell.folder.resolve())
    parameters = {k: v for k, v in parameters.items() if k in declared}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(cell.notebook),
            str(cell.folder / "notebook.ipynb"),
            parameters=parameters,
            kernel_name=kernel,
            progress_bar=False,
            log_output=log_output,
            cwd=str(cell.folder),
        )
        cell.status = "ok"
    except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the grid
        cell.status = "failed"
        cell.error = _short_error(exc)
    cell.wall_s = time.perf_counter() - start
    provenance = {
        "notebook": cell.notebook.name,
        "model": cell.model,
        "language": cell.language,
        "parameters": parameters,
        "seed": parameters.get("seed"),
        "status": cell.status,
        "error": cell.error,
        "wall_time_s": round(cell.wall_s, 2),
        "versions": versions(),
        "git_revision": git_revision(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (cell.folder / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    return cell


def _short_error(exc: Exception) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
    return f"{name}: {value}".strip()[:2000]


@dataclass
class GridResult:
    cells: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "failed"]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "notebook": c.notebook.stem,
                    "model": c.model,
                    "language": c.language,
                    "params": json.dumps(c.params, sort_keys=True),
                    "status": c.status,
                    "wall_s": round(c.wall_s, 1),
                    "folder": str(c.folder),
                    "error": c.error,
                }
                for c in self.cells
            ]
        )


def run_grid(
    cells: list[Cell],
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    kernel: str | None = None,
    progress: bool = True,
) -> GridResult:
    """Run every cell, one after the other, with a progress bar; write ``summary.csv`` beside them."""
    from tqdm.auto import tqdm

    existing = [c for c in cells if (c.folder / "notebook.ipynb").exists()]
    if existing and not (overwrite or skip_existing):
        listed = "\n  ".join(str(c.folder) for c in existing[:10])
        raise GridError(
            f"{len(existing)} run folder(s) already hold results (pass --overwrite or --skip-existing):\n  {listed}"
        )
    result = GridResult()
    bar = tqdm(cells, desc="grid", unit="run", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.label[:60])
        if skip_existing and cell in existing:
            cell.status = "skipped"
        else:
            run_cell(cell, kernel=kernel)
        result.cells.append(cell)
    for root in {c.root for c in cells}:
        root.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(root / "summary.csv", index=False)
    return result
