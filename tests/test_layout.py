"""How the package is laid out: no import cycles, no names taken from outside a module's exports, no function
longer than a screen or wider than a dozen parameters (``scripts/engine_stats.py --check`` measures all three)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_cycle_no_import_from_outside_all_and_no_function_over_the_limits():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "engine_stats.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "import cycles (imports inside functions counted): 0" in out.stdout


def test_the_check_finds_a_cycle_an_unexported_name_and_a_long_function(tmp_path):
    """The measure itself, on a package written here: each kind of finding is reported."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import engine_stats as stats
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import ast

    trees = {
        "lsa.a": ast.parse("def f():\n    from lsa.b import g\n"),
        "lsa.b": ast.parse("__all__ = ['g']\nfrom lsa.a import f\ndef g(): pass\ndef _h(): pass\ndef k(): pass\n"),
        "lsa.c": ast.parse("from lsa.b import k\nfrom lsa import b\nx = b._h\n" + "def long():\n" + "    y = 1\n" * 81),
    }
    assert stats.import_cycles(trees) == [["lsa.a", "lsa.b"]]
    assert {(s, n) for _, s, n, _ in stats.unexported_imports(trees)} == {("lsa.b", "k"), ("lsa.b", "_h")}
    assert stats.functions(trees)[0][:2] == (82, 0)
