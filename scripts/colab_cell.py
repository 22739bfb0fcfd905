"""Give every notebook under notebooks/ the workbook's set-up cells (idempotent).

    .venv/bin/python scripts/colab_cell.py [--repo URL] [NOTEBOOK ...]

1. The Colab set-up cell, first: it does nothing outside Colab. On Colab it clones
   the workbook (from the URL baked in here: ``--repo``, else this checkout's
   ``git remote get-url origin``; Colab's form field can change it), installs the
   package with its runtime dependencies only (pyproject's ``dependencies``: what
   Colab already has that satisfies them, torch with CUDA, pandas, Jupyter,
   ipykernel, stays as it is; never the pinned Jupyter, kernel, test or lint
   stack of ``constraints.txt``) and changes into the clone's ``notebooks/``.
2. The ``output_dir`` default in the parameters cell: ``../runs/interactive/<stem>``
   (relative to ``notebooks/``, where Jupyter starts the kernel; ``runs/`` is
   git-ignored), so an interactive run writes its figures, tables and
   ``findings.json`` into a folder of its own. ``lsa run`` passes its own folder.
3. Right after the parameters cell, a cell that creates ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
MARK = "# lsa: Colab set-up"
OUTPUT_MARK = "# lsa: output folder"
TEMPLATE = """{mark} (does nothing outside Colab)
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    LSA_REPO = {repo}  # @param {{type:"string"}}
    home = os.environ.setdefault("LSA_HOME", os.path.abspath("lsa-workbook"))
    if not os.path.isdir(home):
        if not LSA_REPO:
            raise RuntimeError(f"Type this workbook's git URL into LSA_REPO above (or clone it to {{home}}), then rerun")
        subprocess.run(["git", "clone", "--depth", "1", LSA_REPO, home], check=True)
    # The package and its runtime dependencies only: Colab's torch (CUDA), pandas, Jupyter and kernel stay as they are.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", home], check=True)
    sys.path.insert(0, home)
    os.chdir(os.path.join(home, "notebooks"))"""
OUTPUT_SOURCE = f"""{OUTPUT_MARK}: `lsa run` passes one per grid cell; interactive runs write under runs/interactive/ (git-ignored)
import os

os.makedirs(output_dir, exist_ok=True)"""
_OUTPUT_DEFAULT = re.compile(r"^output_dir\s*=.*$", re.MULTILINE)


def origin_url() -> str:
    """This checkout's ``origin`` as an https URL Colab can clone without keys ("" when there is none)."""
    try:
        url = subprocess.run(
            ["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    if m := re.fullmatch(r"git@([^:]+):(.+)", url):
        url = f"https://{m.group(1)}/{m.group(2)}"
    return url if url.startswith("https://") else ""


def colab_source(repo: str) -> str:
    return TEMPLATE.format(mark=MARK, repo=json.dumps(repo))


def ensure(path: Path, repo: str) -> bool:
    """Insert or refresh the set-up cells and the ``output_dir`` default; returns whether the file changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    source = colab_source(repo)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    if code and nb.cells[code[0]].source.startswith(MARK):
        nb.cells[code[0]].source = source
    else:
        nb.cells.insert(code[0] if code else 0, nbformat.v4.new_code_cell(source, id="lsa-colab-setup"))
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = nb.cells[index]
    default = f'output_dir = "../runs/interactive/{path.stem}"  # lsa run passes its own'
    params.source = _OUTPUT_DEFAULT.sub(default, params.source) if "output_dir" in params.source else params.source
    nxt = nb.cells[index + 1] if index + 1 < len(nb.cells) else None
    if nxt is not None and nxt.cell_type == "code" and nxt.source.startswith(OUTPUT_MARK):
        nxt.source = OUTPUT_SOURCE
    else:
        nb.cells.insert(index + 1, nbformat.v4.new_code_cell(OUTPUT_SOURCE, id="lsa-output-dir"))
    if nbformat.writes(nb) == before:
        return False
    nbformat.write(nb, path)
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook under notebooks/")
    parser.add_argument("--repo", help="the git URL Colab clones (default: this checkout's origin, if https or ssh)")
    args = parser.parse_args()
    repo = args.repo if args.repo is not None else origin_url()
    if not repo:
        print("no --repo and no git origin: the Colab cell will ask the user for the URL in one line")
    for p in args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")):
        print(("updated " if ensure(p, repo) else "ok      ") + str(p))
