"""`lsa run`: a grid of notebooks x models x languages, each in its own folder with provenance."""

import json

import pandas as pd
import pytest

from lsa import cli, runner

PROBE = "tests/notebooks/grid_probe.ipynb"


def test_two_models_by_two_languages_make_four_run_folders_with_notebook_and_provenance(tmp_path):
    out = tmp_path / "grid"
    code = cli.main(
        ["run", PROBE, "-m", "random:gpt2", "random:qwen2", "-l", "en", "zh", "-p", "n_prompts=3", "-o", str(out)]
    )
    assert code == 0
    folders = sorted(p.parent for p in out.rglob("provenance.json"))
    assert len(folders) == 4
    for folder in folders:
        prov = json.loads((folder / "provenance.json").read_text())
        result = json.loads((folder / "result.json").read_text())
        assert (folder / "notebook.ipynb").exists()
        assert prov["status"] == "ok" and prov["parameters"]["n_prompts"] == 3
        assert {"torch", "transformers", "nnsight", "lsa"} <= set(prov["versions"])
        # the notebook really ran with the cell's own parameters
        assert result["model"] == prov["model"] and result["language"] == prov["language"]
        assert result["n_layers"] == 2
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok"] * 4


def test_a_bad_parameter_fails_its_cell_with_a_clear_error_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "grid"
    code = cli.main(["run", PROBE, "-m", "random:gpt2", "-l", "en", "fr", "-o", str(out)])
    assert code == 1
    ok = json.loads((out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text())
    bad = json.loads((out / "grid_probe" / "random_gpt2" / "fr" / "provenance.json").read_text())
    assert ok["status"] == "ok"
    assert bad["status"] == "failed" and "unknown language 'fr'" in bad["error"]
    assert "unknown language 'fr'" in capsys.readouterr().err


def test_an_earlier_run_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "grid"
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out)]) == 0
    before = (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text()
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out)]) == 2
    assert (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text() == before
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out), "--skip-existing"]) == 0
    assert (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text() == before


def test_unknown_parameter_name_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(runner.GridError, match="has no parameter n_promts"):
        runner.plan([PROBE], ["random:gpt2"], ["en"], runner.parse_params(["n_promts=3"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_parameter_values_parse_as_json_and_repeats_make_a_grid(tmp_path):
    params = runner.parse_params(["n_prompts=3", "seed=0", "seed=1", "device=cpu"])
    assert params == {"n_prompts": [3], "seed": [0, 1], "device": ["cpu"]}
    cells = runner.plan([PROBE], ["random:gpt2"], ["en", "zh"], params, tmp_path)
    assert len(cells) == 4 and len({c.folder for c in cells}) == 4
    with pytest.raises(runner.GridError, match="write key=value"):
        runner.parse_params(["n_prompts"])


def test_unknown_notebook_names_the_known_ones():
    with pytest.raises(runner.GridError, match="known notebooks: .*00_quickstart"):
        runner.resolve_notebook("no_such_notebook")
