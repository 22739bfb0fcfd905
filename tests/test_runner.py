"""`lsa run`: a grid of notebooks x models x languages, each in its own folder with provenance.

Kernel runs use two tiny notebooks: ``grid_probe`` (loads the model it is given) and
``sleeper`` (sleeps ``seconds``, then writes ``done.json``; no lsa import, ~1 s a run).
"""

import json

import nbformat
import pandas as pd
import pytest

from lsa import cli, model, runner

PROBE = "tests/notebooks/grid_probe.ipynb"
SLEEPER = "tests/notebooks/sleeper.ipynb"


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
        assert prov["seed"] == 0  # not injected: the notebook's declared default, which it ran with
        assert {"torch", "transformers", "nnsight", "lsa"} <= set(prov["versions"])
        # the notebook really ran with the cell's own parameters
        assert result["model"] == prov["model"] and result["language"] == prov["language"]
        assert result["n_layers"] == 2
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok"] * 4


def test_an_earlier_run_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "grid"
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out)]) == 0
    before = (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text()
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out)]) == 2
    assert (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text() == before
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-o", str(out), "--skip-existing"]) == 0
    assert (out / "grid_probe" / "random_gpt2" / "en" / "provenance.json").read_text() == before
    # the skipped cell keeps its row (and its real status) in summary.csv
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["ok"]


def test_unknown_parameter_name_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(runner.GridError, match="has no parameter n_promts"):
        runner.plan([PROBE], ["random:gpt2"], ["en"], runner.parse_params(["n_promts=3"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_parameter_values_parse_as_json_and_repeats_make_a_grid(tmp_path):
    params = runner.parse_params(["n_prompts=3", "seed=0", "seed=1", "device=cpu"])
    assert params == {"n_prompts": [3], "seed": [0, 1], "device": ["cpu"]}
    assert runner.parse_params(["a=True", "b=None", "c=['en']", "d=[1, 2]"]) == {
        "a": [True],
        "b": [None],
        "c": [["en"]],
        "d": [[1, 2]],
    }
    cells = runner.plan([PROBE], ["random:gpt2"], ["en", "zh"], params, tmp_path)
    assert len(cells) == 4 and len({c.folder for c in cells}) == 4
    with pytest.raises(runner.GridError, match="write key=value"):
        runner.parse_params(["n_prompts"])


def test_unknown_notebook_names_the_known_ones():
    with pytest.raises(runner.GridError, match="known notebooks: .*00_quickstart"):
        runner.resolve_notebook("no_such_notebook")


def test_a_cell_past_the_cell_timeout_fails_naming_the_timeout_and_its_neighbour_succeeds(tmp_path, capfd):
    out = tmp_path / "grid"
    # the sleeping cell comes first: the grid goes on after it
    args = ["run", SLEEPER, "-p", "seconds=60", "-p", "seconds=0", "--cell-timeout", "3", "-o", str(out)]
    assert cli.main(args) == 1
    slow = json.loads((out / "sleeper/toy-bilingual/en/seconds=60/provenance.json").read_text())
    fast = json.loads((out / "sleeper/toy-bilingual/en/seconds=0/provenance.json").read_text())
    assert slow["status"] == "failed" and slow["cell_timeout_s"] == 3
    assert "ran longer than the cell timeout (3 s)" in slow["error"] and "--cell-timeout" in slow["error"]
    assert "time.sleep(seconds)" in slow["error"]  # it says which cell
    assert slow["wall_time_s"] < 50  # stopped, not slept out
    assert not (out / "sleeper/toy-bilingual/en/seconds=60/done.json").exists()
    assert fast["status"] == "ok"
    assert json.loads((out / "sleeper/toy-bilingual/en/seconds=0/done.json").read_text())["slept"] == 0
    captured = capfd.readouterr()  # file-descriptor level: the kernels' own stderr is in here too
    assert "cell timeout (3 s)" in captured.err
    assert "without encryption" not in captured.out + captured.err  # no ipykernel 7 warning noise


def test_jobs_run_independent_cells_at_once_and_a_reader_after_the_cell_it_reads(tmp_path):
    out = tmp_path / "grid"
    first = out / "sleeper/writer/en"
    cells = runner.plan([SLEEPER], ["writer"], ["en"], {"seconds": [4]}, out)
    cells += runner.plan([SLEEPER], ["other"], ["en"], {"seconds": [4]}, out)
    # listed first, it reads what the writer writes: it must wait although a kernel is free
    reader = runner.plan([SLEEPER], ["reader"], ["en"], {"after": [str(first / "done.json")]}, out)
    assert runner.dependencies(reader + cells) == {0: [1], 1: [], 2: []}
    result = runner.run_grid(reader + cells, jobs=2, progress=False)
    assert [c.status for c in result.cells] == ["ok", "ok", "ok"]
    times = {c.model: json.loads((c.folder / "done.json").read_text()) for c in result.cells}
    assert times["writer"]["start"] < times["other"]["end"] and times["other"]["start"] < times["writer"]["end"]
    assert times["reader"]["start"] >= times["writer"]["end"]
    # one job: one after the other, in the order given (the reader first, so it fails)
    serial = runner.plan([SLEEPER], ["reader"], ["en"], {"after": [str(tmp_path / "none.json")]}, tmp_path / "s")
    serial += runner.plan([SLEEPER], ["a", "b"], ["en"], {"seconds": [1]}, tmp_path / "s")
    result = runner.run_grid(serial, jobs=1, progress=False)
    assert [c.status for c in result.cells] == ["failed", "ok", "ok"]
    a, b = (json.loads((c.folder / "done.json").read_text()) for c in result.cells[1:])
    assert a["end"] <= b["start"]
    with pytest.raises(runner.GridError, match="jobs must be at least 1"):
        runner.run_grid(serial, jobs=0, overwrite=True)


def test_a_cell_whose_kernel_dies_fails_saying_so_and_its_neighbour_succeeds(tmp_path):
    out = tmp_path / "grid"
    assert cli.main(["run", SLEEPER, "-p", "die=true", "-p", "die=false", "-o", str(out)]) == 1
    dead = json.loads((out / "sleeper/toy-bilingual/en/die=True/provenance.json").read_text())
    alive = json.loads((out / "sleeper/toy-bilingual/en/die=False/provenance.json").read_text())
    assert dead["status"] == "failed" and dead["error"].startswith("DeadKernelError: the kernel died")
    assert f"cell timeout ({runner.DEFAULT_CELL_TIMEOUT} s)" in dead["error"]
    assert alive["status"] == "ok" and (out / "sleeper/toy-bilingual/en/die=False/done.json").exists()


def test_overwrite_removes_a_cells_old_outputs_and_summary_keeps_the_cells_not_rerun(tmp_path):
    out = tmp_path / "grid"
    assert cli.main(["run", SLEEPER, "-m", "a", "b", "-o", str(out)]) == 0
    stale = out / "sleeper" / "a" / "en" / "figure_from_before.png"
    stale.write_bytes(b"old")
    # rerun only "a", and make it fail: its old done.json and figure must not stay beside the failed notebook
    args = ["run", SLEEPER, "-m", "a", "-p", "seconds=30", "--cell-timeout", "2", "--overwrite", "-o", str(out)]
    assert cli.main(args) == 1
    assert sorted(p.name for p in (out / "sleeper" / "a" / "en").iterdir()) == ["notebook.ipynb", "provenance.json"]
    assert (out / "sleeper" / "b" / "en" / "done.json").exists()
    summary = pd.read_csv(out / "summary.csv").set_index("folder")
    assert summary.loc["sleeper/a/en", "status"] == "failed"
    assert summary.loc["sleeper/b/en", "status"] == "ok"
    assert len(summary) == 2


def test_clearing_a_cell_folder_keeps_the_cell_folders_nested_in_it(tmp_path):
    folder = tmp_path / "nb" / "m" / "en"
    (folder / "seed=0").mkdir(parents=True)
    (folder / "seed=0" / "provenance.json").write_text("{}")
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"x")
    (folder / "notebook.ipynb").write_text("{}")
    runner.clear_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["seed=0"]
    assert (folder / "seed=0" / "provenance.json").exists()


def test_a_value_of_the_wrong_type_is_refused_before_any_kernel_naming_parameter_value_and_type(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["run", "quickstart", "-p", "n_prompts=abc", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parameter n_prompts=abc is str, expected int" in err and "n_prompts = 100" in err
    assert not out.exists()
    refused = {
        "n_prompts=2.5": "expected int",
        "n_prompts=true": "is bool, expected int",
        "tasks=ioi": "expected list",
        'tasks=["ioi", 3]': "item 3 is int, expected str",
        "remote=3": "expected bool or str",
    }
    for pair, message in refused.items():
        with pytest.raises(runner.GridError, match=message.replace("[", r"\[")):
            runner.plan(["quickstart"], ["toy-bilingual"], ["en"], runner.parse_params([pair]), out)
    # accepted: the annotated `remote: bool | str`, an int where the default is a float, Python literals
    for pair in ("remote=local", "remote=True", "n_prompts=8", "tasks=['ioi']", "seed=3"):
        runner.plan(["quickstart"], ["toy-bilingual"], ["en"], runner.parse_params([pair]), out)
    runner.plan(["past_tense"], ["toy-bilingual"], ["en"], runner.parse_params(["tau=1"]), out)
    assert not out.exists()


def test_a_language_the_notebook_does_not_take_is_refused_before_any_kernel(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["run", PROBE, "-m", "random:gpt2", "-l", "en", "fr", "-o", str(out)]) == 2
    assert "grid_probe does not take language 'fr'; it takes en, zh" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(runner.GridError, match="does not take language 'de'"):
        runner.plan(["quickstart"], ["toy-bilingual"], ["en"], runner.parse_params(['languages=["en", "zh", "de"]']))
    # a notebook may declare its own languages in its metadata
    nb = nbformat.read(PROBE, as_version=4)
    nb.metadata["lsa"] = {"languages": ["en", "fr"]}
    custom = tmp_path / "probe_fr.ipynb"
    nbformat.write(nb, custom)
    assert len(runner.plan([custom], ["random:gpt2"], ["en", "fr"], {}, out)) == 2
    with pytest.raises(runner.GridError, match="does not take language 'zh'; it takes en, fr"):
        runner.plan([custom], ["random:gpt2"], ["zh"], {}, out)


def test_an_unknown_model_or_missing_path_is_a_one_line_error_naming_what_is_accepted_and_why(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["run", PROBE, "-m", "toy-bilingal", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown model 'toy-bilingal'" in err and "did you mean toy-bilingual?" in err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err
    assert all(name in err for name in model.known_names())
    assert "a local model folder, or a Hugging Face id" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="no such folder /nonexistent/model"):
        model.resolve_name("/nonexistent/model")
    with pytest.raises(ValueError, match="has no config.json"):
        model.resolve_name(tmp_path)
    with pytest.raises(ValueError, match="did you mean random:qwen2"):
        model.resolve_name("random:qwen3")
    assert model.resolve_name("toy-en") == str(model.ZOO_DIR / "toy-en")
    assert model.resolve_name("random-narrow:Qwen/Qwen2-0.5B") == "random-narrow:Qwen/Qwen2-0.5B"


def test_the_presets_model_names_and_pair_labels_pass_the_model_check(tmp_path):
    for preset, random in (("zoo", False), ("paper", True)):
        cells = runner.plan_preset(preset, tmp_path, random=random)
        assert any("+" in c.model for c in cells)  # "toy-en+toy-zh", "gpt2+CPM": labels of pairs
        runner.check_models(cells)
    (bare,) = runner.plan(["compare_circuits"], ["toy-en+toy-zh"], ["en+zh"], {}, tmp_path)
    with pytest.raises(runner.GridError, match="pair label"):
        runner.check_models([bare])
    (pair,) = runner.plan(
        ["compare_circuits"], ["toy-en+toy-zh"], ["en+zh"], runner.parse_params(['models=["toy-en", "toy-zx"]'])
    )
    with pytest.raises(runner.GridError, match="unknown model 'toy-zx'"):
        runner.check_models([pair])


def test_the_real_preset_compares_only_circuits_that_its_own_earlier_cells_write(tmp_path):
    cells = runner.plan_preset("real", tmp_path)
    written = {
        str((c.folder / "circuit.json").resolve()): (i, c.model, c.language)
        for i, c in enumerate(cells)
        if c.notebook.stem == "01_ioi_circuit"
    }
    compared = []
    for i, c in enumerate(cells):
        refs = c.params.get("circuits", [])
        assert all(written[ref][0] < i for ref in refs)  # each circuit exists before its comparison runs
        if refs:
            compared.append({written[ref][1:] for ref in refs})
    assert {("gemma-3-270m", "en"), ("gemma-3-270m", "zh")} in compared
    assert {("gemma-3-270m", "en"), ("smollm2-135m", "en")} in compared
    assert runner.dependencies(cells) == {
        i: [written[r][0] for r in c.params.get("circuits", [])] for i, c in enumerate(cells)
    }
    assert {c.notebook.stem for c in cells} == {
        "00_quickstart",
        "01_ioi_circuit",
        "02_past_tense",
        "03_compare_circuits",
        "04_language_neurons",
        "06_latent_language",
    }


def test_reproduce_passes_its_cell_timeout_to_the_grid(tmp_path, monkeypatch):
    seen = {}

    def fake_run_grid(cells, **kwargs):
        seen.update(kwargs, n=len(cells))
        return runner.GridResult()

    monkeypatch.setattr(runner, "run_grid", fake_run_grid)
    assert cli.main(["reproduce", "--cell-timeout", "7", "-j", "3", "--no-real", "-o", str(tmp_path)]) == 0
    assert seen["cell_timeout"] == 7 and seen["jobs"] == 3 and seen["n"] == len(runner.plan_preset("zoo", tmp_path))
    assert cli.build_parser().parse_args(["run", "x"]).cell_timeout == runner.DEFAULT_CELL_TIMEOUT


def test_parallel_jobs_share_the_cores_unless_the_environment_sets_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    with runner.threads_per_job(2):
        assert runner.os.environ["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in runner.os.environ
    with runner.threads_per_job(16):
        assert runner.os.environ["OMP_NUM_THREADS"] == "1"
    with runner.threads_per_job(1):
        assert "OMP_NUM_THREADS" not in runner.os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with runner.threads_per_job(2):
        assert runner.os.environ["OMP_NUM_THREADS"] == "3"
    assert runner.os.environ["OMP_NUM_THREADS"] == "3"


def test_a_cross_model_comparison_is_filed_under_its_circuits_models_not_the_model_flag(tmp_path):
    from lsa.circuits import Circuit, Component

    paths = []
    for name, language in (("toy-en", "en"), ("toy-zh", "zh"), ("toy-en", "en")):
        circuit = Circuit(name, 4, 4, "ioi", language, [Component("head", 3, 0)])
        paths.append(str(circuit.to_json(tmp_path / f"{name}_{language}_{len(paths)}.json")))
    out = tmp_path / "runs"
    params = {"circuits": [paths[:2]]}
    (cell,) = runner.plan(["compare_circuits"], ["toy-bilingual"], ["en+zh"], params, out)
    assert cell.model == "toy-en+toy-zh"
    assert cell.folder == out / "03_compare_circuits" / "toy-en+toy-zh" / "en+zh"
    runner.check_models([cell])
    # two circuits of one model: that model, however -m reads
    (same,) = runner.plan(["compare_circuits"], ["toy-zh"], ["en"], {"circuits": [[paths[0], paths[2]]]}, out)
    assert same.folder == out / "03_compare_circuits" / "toy-en" / "en"
    # one model per language, by name
    models = runner.parse_params(['models=["toy-en", "toy-zh"]'])
    (named,) = runner.plan(["compare_circuits"], ["toy-bilingual"], ["en+zh"], models, out)
    assert named.folder == out / "03_compare_circuits" / "toy-en+toy-zh" / "en+zh"
    # without circuits or models, -m is what ran
    (own,) = runner.plan(["compare_circuits"], ["toy-bilingual"], ["en+zh"], {}, out)
    assert own.folder == out / "03_compare_circuits" / "toy-bilingual" / "en+zh"
    with pytest.raises(runner.GridError, match="would share the folder.*give -m once"):
        runner.plan(["compare_circuits"], ["toy-bilingual", "toy-en"], ["en+zh"], params, out)


def test_a_grid_skips_the_cells_tagged_widget(tmp_path):
    """The sleeper's last cell is tagged ``widget`` and raises: in a grid it is skipped, the cells before it run."""
    out = tmp_path / "grid"
    assert cli.main(["run", SLEEPER, "-p", "seconds=0", "-o", str(out)]) == 0
    folder = out / "sleeper/toy-bilingual/en"
    assert json.loads((folder / "provenance.json").read_text())["status"] == "ok"
    cells = nbformat.read(folder / "notebook.ipynb", as_version=4).cells
    assert runner.WIDGET_TAG in cells[-1].metadata.tags and cells[-1].outputs == []
    assert json.loads((folder / "done.json").read_text())["slept"] == 0
