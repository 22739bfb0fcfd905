"""Put the Colab set-up cell first in every notebook under notebooks/ (idempotent).

    .venv/bin/python scripts/colab_cell.py

The cell does nothing outside Colab. On Colab it clones the workbook (from the
URL in the form field, unless the folder is already there), installs its pinned
requirements except torch (Colab's own CUDA build is kept) and the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

MARK = "# lsa: Colab set-up"
SOURCE = f"""{MARK} (does nothing outside Colab)
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    LSA_REPO = ""  # @param {{type:"string"}} the git URL of this workbook
    if not os.path.isdir("lsa-workbook"):
        if not LSA_REPO:
            raise RuntimeError("On Colab, set LSA_REPO above to the git URL of the lsa workbook, then run this cell")
        subprocess.run(["git", "clone", "--depth", "1", LSA_REPO, "lsa-workbook"], check=True)
    os.chdir("lsa-workbook")
    reqs = [line for line in open("requirements.txt") if not line.startswith("torch==")]
    open("/tmp/lsa-requirements.txt", "w").writelines(reqs)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "/tmp/lsa-requirements.txt"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "."], check=True)
    sys.path.insert(0, os.getcwd())"""


def ensure(path: Path) -> bool:
    """Insert or refresh the cell; returns whether the file changed."""
    nb = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_code_cell(SOURCE)
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if first_code is not None and nb.cells[first_code].source.startswith(MARK):
        if nb.cells[first_code].source == SOURCE:
            return False
        nb.cells[first_code] = cell
    else:
        nb.cells.insert(first_code if first_code is not None else 0, cell)
    nbformat.write(nb, path)
    return True


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "notebooks"
    paths = [Path(p) for p in sys.argv[1:]] or sorted(root.glob("*.ipynb"))
    for p in paths:
        print(("updated " if ensure(p) else "ok      ") + str(p))
