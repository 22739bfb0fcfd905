"""Run every notebook's Colab set-up cell in a stand-in for a Colab runtime; show what it installed.

    python3 scripts/colab_check.py [--venv DIR] [--ipykernel 6.17.1] [--pandas 2.2.2] [--run 00_quickstart]

The stand-in: a fresh venv (``--venv``, created if missing) that already has torch
and an ipykernel and a pandas other than constraints.txt's pins, as Colab has its
own; a fake ``google.colab`` module; a local clone of this checkout's committed HEAD
as the repository (its path typed into the cell's LSA_REPO field, as a user would).
Each notebook's first cell runs in a fresh interpreter started in a "content"
folder (Colab's working folder); ``pip freeze`` is taken before and after each.
Then the code cells of ``--run`` notebooks run in that same interpreter, after the
set-up cell (their defaults; no Jupyter).

Exits non-zero when a cell fails, or when the set-up changed ipykernel or pandas
or installed any of the pinned Jupyter, kernel, test or lint stack.
Cost: the first cell resolves and installs the runtime dependencies (minutes); the
others find them installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_COLAB = "import sys, types; sys.modules['google'] = types.ModuleType('google'); "
FAKE_COLAB += "sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
NEVER = ("jupyterlab", "pytest", "ruff", "playwright", "nbval", "papermill")


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        if line.startswith("-e "):
            found["lsa (editable)"] = line[3:]
        elif not line.startswith("#") and (" @ " in line or "==" in line):
            name, _, version = line.partition(" @ " if " @ " in line else "==")
            found[name.lower().replace("_", "-")] = version.strip()
    return found


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            lines.append(f"  {name}: {before.get(name, '-')} -> {after.get(name, '-')}")
    return lines


def cells(notebook: Path) -> list[str]:
    nb = json.loads(notebook.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "lsa-colab-check" / "venv")
    parser.add_argument("--ipykernel", default="6.17.1", help="the ipykernel the runtime already has")
    parser.add_argument("--pandas", default="2.2.2", help="the pandas the runtime already has")
    parser.add_argument("--run", nargs="*", default=["00_quickstart"], help="notebooks to run after their set-up")
    args = parser.parse_args()
    work = args.venv.parent
    python = args.venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", args.venv], check=True)
        pre = ["torch==2.13.0", f"ipykernel=={args.ipykernel}", f"pandas=={args.pandas}"]
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pre], check=True)
    clone = work / "repository"
    subprocess.run(["rm", "-rf", clone, work / "content"], check=True)
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    (work / "content").mkdir()
    first = freeze(python)
    print(f"before: ipykernel {first.get('ipykernel')}, pandas {first.get('pandas')}, torch {first.get('torch')}")
    ok = True
    for notebook in sorted((clone / "notebooks").glob("*.ipynb")):
        setup = cells(notebook)[0]
        if not setup.startswith("# lsa: Colab set-up"):
            print(f"{notebook.stem}: its first code cell is not the Colab set-up cell")
            ok = False
            continue
        setup = re.sub(r'LSA_REPO = ".*?"', f"LSA_REPO = {json.dumps(str(clone))}", setup, count=1)
        program = FAKE_COLAB + setup + "\nimport lsa, widgets\nprint('lsa from', lsa.__file__, 'cwd', os.getcwd())\n"
        if notebook.stem in args.run:
            program += "".join(f"\n{cell}\n" for cell in cells(notebook)[1:])
        before = freeze(python)
        proc = subprocess.run([python, "-c", program], cwd=work / "content", capture_output=True, text=True)
        after = freeze(python)
        changed = diff(before, after)
        bad = [n for n in ("ipykernel", "pandas") if before.get(n) != after.get(n)] + [n for n in NEVER if n in after]
        status = "ok" if proc.returncode == 0 and not bad else "FAILED"
        ok &= status == "ok"
        ran = " (and all its cells)" if notebook.stem in args.run else ""
        print(f"\n{notebook.stem}: set-up cell{ran} {status}; pip freeze changes: {len(changed)}")
        print("\n".join(changed[:80]) + ("\n  ..." if len(changed) > 80 else ""))
        print("  " + (proc.stdout.strip().splitlines() or [""])[-1][:300])
        if proc.returncode:
            print(proc.stderr[-3000:])
        if bad:
            print(f"  changed or installed what it must not: {bad}")
    last = freeze(python)
    print(f"\nafter: ipykernel {last.get('ipykernel')}, pandas {last.get('pandas')}, torch {last.get('torch')}")
    print(f"never installed: {', '.join(n for n in NEVER if n not in last)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
