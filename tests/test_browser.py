"""End to end in a real browser: JupyterLab renders the widgets and their controls update what they show.

Starts JupyterLab on 127.0.0.1 (free port, token, temp root with a copy of
``tests/notebooks/widget_demo.ipynb`` and of ``notebooks/05_activation_patching.ipynb``
at 8 prompts per language), opens each notebook in headless Chromium through Playwright
and runs its cells. Then:

1) HeadExplorer: the rendered vocabulary projection matches an independent
   computation (plain hooks in this process, same random model); selecting
   layer 1 and head 3 in its dropdowns changes the rendered tokens to that head's;
2) PatchingMap: clicking the map's cell (layer 1, head 2) updates the cell's
   details and the HeadExplorer embedded under it;
3) notebook 05 on toy-bilingual: clicking the map's language switch to Chinese moves its
   HeadExplorer to the first Chinese prompt; a Chinese prompt typed into the explorer is
   shown (its tokens and projection as computed here from the model's own files); switching
   back to English keeps the typed prompt, and picking a Chinese prompt in the explorer
   switches the map back to Chinese.

Needs Debian's ``chromium`` and the ``playwright`` package (its driver only; no
browser download): ``scripts/install_system.sh --browser`` installs both. Without them
these tests fail (CI installs them). Screenshots under ``runs/browser/``: ``widget.png``,
``patching_map.png``, ``language_switch.png`` (``failure.png`` when a step fails).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import lsa

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "widget_demo.ipynb"
PATCHING = ROOT / "notebooks" / "05_activation_patching.ipynb"
N_PROMPTS = 8  # notebook 05's prompts per language here (its default is 64)
TYPED_ZH = "当小明和小红去商店时，小明把一杯饮料给了"  # a Chinese prompt none of the 8 sets holds
CHROMIUM = os.environ.get("LSA_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "runs" / "browser" / "widget.png"
K = 5  # the demo notebook's HeadExplorer(k=5)
K_MAP = 10  # the HeadExplorer a PatchingMap opens (its default k)


def _require_browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/install_system.sh --browser (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail(
            "the playwright package is missing: run scripts/install_system.sh --browser (pip install playwright)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_top_ids(hf, tokens: torch.Tensor, heads: list[tuple[int, int]], k: int = K) -> list[list[int]]:
    """Top-``k`` promoted token ids of each head ``(layer, head)``'s write at the last of ``tokens`` ``[pos]``.

    Independent of lsa.lens: a forward pre-hook on the attention output projection of a GPT-2
    model takes the head's slice, multiplies it by its rows of ``c_proj.weight`` (Conv1D,
    ``[in, out]``), applies ln_f's centring, the final residual's scale and gain, and the
    tied unembedding.
    """
    n = tokens.shape[0]
    seen = {}
    hooks = [
        block.attn.c_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i, block in enumerate(hf.transformer.h)
    ]
    hooks.append(hf.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.__setitem__("resid", args[0])))
    with torch.no_grad():
        hf(tokens[None])
    for h in hooks:
        h.remove()
    ln = hf.transformer.ln_f
    resid = seen["resid"][0, n - 1]
    scale = torch.sqrt(resid.var(unbiased=False) + ln.eps)
    out = []
    for layer, head in heads:
        c_proj = hf.transformer.h[layer].attn.c_proj
        d_head = hf.transformer.h[layer].attn.head_dim
        z = seen[layer][0, n - 1, head * d_head : (head + 1) * d_head]
        write = z @ c_proj.weight[head * d_head : (head + 1) * d_head]
        logits = hf.lm_head.weight @ ((write - write.mean()) / scale * ln.weight)
        out.append(logits.topk(k).indices.tolist())
    return out


def _promoted_ids(html_widget) -> list[int]:
    """token_id column of the 'promoted' table in a rendered projection HTML widget."""
    rows = html_widget.locator("table.dataframe").first.locator("tbody tr")
    return [int(rows.nth(i).locator("td").nth(2).inner_text()) for i in range(rows.count())]


def _run_cell(page, cell, tries: int = 3) -> None:
    """Run one code cell (select it, Ctrl+Enter) and wait for its execution count; resend if the request was lost.

    Right after the page reports the kernel idle, JupyterLab sometimes drops the
    first request (the cell's prompt never turns to ``[*]``); it is sent again.
    """
    from playwright.sync_api import expect

    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(tries):
        prompt.click()  # select the cell (command mode)
        page.keyboard.press("Control+Enter")  # run in place (no new cell at the end)
        try:
            expect(prompt).to_have_text(re.compile(r"\[(\*|\d+)\]"), timeout=5_000)  # queued or done
        except AssertionError:
            print(f"[browser] the cell did not start (prompt {prompt.inner_text()!r}); sending it again")
            continue  # nothing happened: the kernel was not ready
        expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=75_000)
        return
    raise AssertionError(f"the cell never started running; its prompt reads {prompt.inner_text()!r}")


def _start_lab(root: Path, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """JupyterLab serving ``root`` on a free port with a token (settings under ``tmp``): ``(server, base, token)``."""
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    # every cell rendered (JupyterLab 4 otherwise renders only the cells near the viewport)
    (tracker / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true, "windowingMode": "none"}')
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
            "--LabApp.extension_manager=readonly",
            "--allow-root",
        ],
        env=env,
        stdout=open(tmp / "jupyter.log", "w"),  # noqa: SIM115 - the server writes to it until it stops
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 40
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return server, base, token
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start; log:\n{(tmp / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab with the demo notebook and notebook 05 (8 prompts per language), and a headless Chromium."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    nb = json.loads(PATCHING.read_text(encoding="utf-8"))
    (params,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    params["source"] = [re.sub(r"^n_prompts = \d+", f"n_prompts = {N_PROMPTS}", line) for line in params["source"]]
    assert any(line.startswith(f"n_prompts = {N_PROMPTS}") for line in params["source"])
    (root / PATCHING.name).write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")
    server, base, token = _start_lab(root, tmp)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            yield browser, base, token, root
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _open_and_run(lab, name: str):
    """Open notebook ``name`` in a new page with its kernel started, and run every code cell: ``(page, cells)``."""
    browser, base, token, root = lab
    # start the notebook's kernel now (no kernel dialog in the page; the imports run while the page loads)
    request = urllib.request.Request(
        f"{base}/api/sessions?token={token}",
        data=json.dumps({"path": name, "type": "notebook", "kernel": {"name": "python3"}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=30)
    page = browser.new_page(viewport={"width": 1500, "height": 1900})
    page.set_default_timeout(60_000)
    # should a kernel dialog come up anyway, take the notebook's kernel
    page.add_locator_handler(
        page.locator(".jp-Dialog", has_text="Select Kernel"),
        lambda dialog: dialog.get_by_role("button", name="Select", exact=True).click(),
    )
    t0 = time.time()
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?token={token}")  # a workspace per notebook
    page.locator(".jp-Notebook").first.wait_for()
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for()
    print(f"[browser] {name} open, kernel idle at {time.time() - t0:.0f} s")
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    n_code = sum(c["cell_type"] == "code" for c in json.loads((root / name).read_text(encoding="utf-8"))["cells"])
    for i in range(n_code):
        _run_cell(page, cells.nth(i))
        print(f"[browser] cell {i + 1} of {n_code} ran at {time.time() - t0:.0f} s")
    return page, [cells.nth(i) for i in range(n_code)]


@contextlib.contextmanager
def _screenshot_on_failure(page):
    try:
        yield
    except Exception:
        failed = SCREENSHOT.with_name("failure.png")
        failed.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(failed), full_page=True)
        print(f"failure screenshot: {failed}")
        print("outputs:", page.locator(".jp-OutputArea").all_inner_texts())
        raise


def _screenshot(cell, name: str) -> None:
    cell.page.wait_for_timeout(1500)  # let the last figure replace the previous one
    path = SCREENSHOT.with_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    cell.screenshot(path=str(path))
    print(f"screenshot: {path}")


def _control(area, kind: str, label: str):
    """The input element of the widget of ``kind`` (``"dropdown"``, ``"text"``) labelled ``label`` in ``area``."""
    box = area.locator(f".widget-{kind}", has=area.page.locator("label", has_text=label)).first
    return box.locator("select" if kind == "dropdown" else "input")


def _selected(select) -> str:
    """The shown option's text (ipywidgets writes its spaces as no-break spaces)."""
    return select.evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")


def test_jupyterlab_renders_the_widgets_and_a_dropdown_change_or_map_click_updates_them(lab):
    from playwright.sync_api import expect

    from lsa.model import random_model

    model = random_model("gpt2", seed=0)
    prompts = lsa.tasks.build("ioi", "en", model.tokenizer, n=4)
    tokens = prompts.clean[0, : int(prompts.lengths[0])]
    want_first, want_new = _expected_top_ids(model.hf, tokens, [(0, 0), (1, 3)])
    assert want_first != want_new  # the check below can tell the heads apart

    page, cells = _open_and_run(lab, NOTEBOOK.name)
    with _screenshot_on_failure(page):
        explorer = cells[1].locator(".jp-OutputArea")
        html_out = explorer.locator(".widget-html", has_text="writes at position").first
        html_out.wait_for(timeout=75_000)
        expect(html_out).to_contain_text("head 0.0 writes at position")
        got_first = _promoted_ids(html_out)

        for label, value in (("layer", "1"), ("head", "3")):
            _control(explorer, "dropdown", label).select_option(value)
        expect(html_out).to_contain_text("head 1.3 writes at position", timeout=30_000)
        got_new = _promoted_ids(html_out)
        explorer.locator("img").first.wait_for()
        _screenshot(cells[1], "widget.png")

        # PatchingMap: click the map's cell (layer 1, head 2); its details and its HeadExplorer follow
        pmap = cells[2].locator(".jp-OutputArea")
        buttons = pmap.locator(".widget-button")
        expect(buttons).to_have_count(2 * 4)  # 2 layers x 4 heads
        buttons.nth(1 * 4 + 2).click()
        expect(pmap.locator(".widget-html", has_text="mean over prompts").first).to_contain_text(
            "layer 1, head 2", timeout=30_000
        )
        expect(pmap.locator(".widget-html", has_text="writes at position").first).to_contain_text(
            "head 1.2 writes at position", timeout=30_000
        )
        _screenshot(cells[2], "patching_map.png")
    page.close()

    assert got_first == want_first
    assert got_new == want_new


def test_notebook_05_language_switch_moves_the_head_explorer_and_a_typed_chinese_prompt_is_shown(lab):
    from playwright.sync_api import expect
    from transformers import AutoModelForCausalLM

    from lsa.model import resolve_name

    folder = resolve_name("toy-bilingual")
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = lsa.load_model("toy-bilingual", device="cpu").tokenizer
    zh = lsa.tasks.build("ioi", "zh", tok, n=N_PROMPTS, seed=0)  # the notebook's own call (build_sets, seed 0)
    typed = torch.tensor(tok(TYPED_ZH)["input_ids"])  # the tokenizer's own special tokens (none for the zoo)
    assert tok.unk_token_id not in typed.tolist() and TYPED_ZH not in set(zh.meta["clean_text"])
    prompts = {"zh #0": zh.clean[0, : int(zh.lengths[0])], "typed": typed, "zh #1": zh.clean[1, : int(zh.lengths[1])]}
    want = {name: _expected_top_ids(hf, t, [(0, 0)], K_MAP)[0] for name, t in prompts.items()}
    last = {name: f"position {len(t) - 1} ({tok.decode([int(t[-1])])})" for name, t in prompts.items()}
    assert len({tuple(ids) for ids in want.values()}) == 3  # the checks below can tell the prompts apart

    page, cells = _open_and_run(lab, PATCHING.name)
    got = {}
    with _screenshot_on_failure(page):
        pmap = cells[-1].locator(".jp-OutputArea")
        projection = pmap.locator(".widget-html", has_text="writes at position").first
        projection.wait_for(timeout=75_000)
        prompt = _control(pmap, "dropdown", "prompt")
        language = pmap.locator(".widget-toggle-buttons").first

        def active(name: str) -> None:
            expect(language.get_by_role("button", name=name, exact=True)).to_have_class(re.compile("mod-active"))

        assert _selected(prompt).startswith("en #0")
        language.get_by_role("button", name="zh", exact=True).click()  # the map's language switch
        active("zh")
        page.wait_for_function(
            "s => s.options[s.selectedIndex].text.startsWith('zh\\u00a0#0')", arg=prompt.element_handle()
        )
        expect(projection).to_contain_text(f"head 0.0 writes at {last['zh #0']}", timeout=30_000)
        got["zh #0"] = _promoted_ids(projection)

        typed_box = _control(pmap, "text", "typed")
        typed_box.fill(TYPED_ZH)
        typed_box.press("Enter")
        expect(projection).to_contain_text(f"head 0.0 writes at {last['typed']}", timeout=30_000)
        assert _selected(prompt) == "(typed prompt)"
        got["typed"] = _promoted_ids(projection)
        _screenshot(cells[-1], "language_switch.png")

        language.get_by_role("button", name="en", exact=True).click()  # a typed prompt stays
        active("en")
        page.wait_for_timeout(1500)
        assert _selected(prompt) == "(typed prompt)" and _promoted_ids(projection) == got["typed"]

        prompt.select_option(label=_option_label(prompt, "zh #1"))  # a Chinese prompt picked: the map follows
        active("zh")
        expect(projection).to_contain_text(f"head 0.0 writes at {last['zh #1']}", timeout=30_000)
        got["zh #1"] = _promoted_ids(projection)
    page.close()

    assert got == want


def _option_label(select, prefix: str) -> str:
    """The text of the option that starts with ``prefix`` (spaces as ipywidgets writes them)."""
    return select.evaluate(
        "(s, p) => [...s.options].map(o => o.text).find(t => t.startsWith(p))", prefix.replace(" ", "\xa0")
    )
