"""Findings files: what a notebook run states, and nothing left from an earlier run."""

import json

import numpy as np
import torch

from lsa.findings import Findings


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
