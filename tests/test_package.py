"""``import lsa`` reaches every method module, and imports none of them until it is used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lsa

METHODS = ("ablation", "attribution", "behaviour", "circuits", "engine", "flow", "lens", "neurons", "patching")


def test_import_lsa_imports_no_method_module_until_one_is_used():
    code = (
        "import json, sys, lsa\n"
        f"methods = {list(METHODS)!r}\n"
        "before = [m for m in methods if 'lsa.' + m in sys.modules]\n"
        "lsa.patching, lsa.circuits, lsa.engine\n"
        "after = [m for m in methods if 'lsa.' + m in sys.modules]\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout)
    assert before == []
    assert {"patching", "circuits", "engine"} <= set(after)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_module_is_an_attribute_of_lsa(name):
    module = getattr(lsa, name)
    assert module.__name__ == f"lsa.{name}"
    assert Path(module.__file__).parent.name in ("lsa", name)


def test_a_name_that_is_no_module_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'patchng'"):
        lsa.patchng  # noqa: B018
    with pytest.raises(ImportError):
        from lsa import patchng  # noqa: F401
