"""End to end in a real browser: JupyterLab renders the widgets and their controls update what they show.

Starts JupyterLab on 127.0.0.1 (free port, token, temp root with a copy of
``tests/notebooks/widget_demo.ipynb``), opens the notebook in headless Chromium
through Playwright and runs its cells. Then:

1) HeadExplorer: the rendered vocabulary projection matches an independent
   computation (plain hooks in this process, same random model); selecting
   layer 1 and head 3 in its dropdowns changes the rendered tokens to that head's;
2) PatchingMap: clicking the map's cell (layer 1, head 2) updates the cell's
   details and the HeadExplorer embedded under it.

Needs Debian's ``chromium`` and the ``playwright`` package (its driver only; no
browser download): ``scripts/install_system.sh --browser`` installs both. Without them
this test fails (CI installs them). Screenshots: ``runs/browser/widget.png`` and
``runs/browser/patching_map.png`` (``failure.png`` when a step fails).
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "widget_demo.ipynb"
CHROMIUM = os.environ.get("LSA_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "runs" / "browser" / "widget.png"
K = 5  # the notebook's HeadExplorer(k=5)


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


def _expected_top_ids(heads: list[tuple[int, int]]) -> list[list[int]]:
    """Top-K promoted token ids of each head ``(layer, head)``'s write at the last token of the notebook's first prompt.

    Independent of lsa.lens: a forward pre-hook on the attention output projection
    takes the head's slice, multiplies it by its rows of ``c_proj.weight`` (Conv1D,
    ``[in, out]``), applies ln_f's centring, the final residual's scale and gain,
    and the tied unembedding.
    """
    import lsa
    from lsa.configs import random_model

    model = random_model("gpt2", seed=0)
    prompts = lsa.tasks.build("ioi", "en", model.tokenizer, n=4)
    hf = model.hf
    n = int(prompts.lengths[0])
    tokens = prompts.clean[:1, :n]
    seen = {}
    hooks = [
        block.attn.c_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i, block in enumerate(hf.transformer.h)
    ]
    hooks.append(hf.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.__setitem__("resid", args[0])))
    with torch.no_grad():
        hf(tokens)
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
        out.append(logits.topk(K).indices.tolist())
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


def test_jupyterlab_renders_the_widgets_and_a_dropdown_change_or_map_click_updates_them(tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    want_first, want_new = _expected_top_ids([(0, 0), (1, 3)])
    assert want_first != want_new  # the check below can tell the heads apart

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true}')
    log = open(tmp_path / "jupyter.log", "w")
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
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 40
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterLab did not start; log:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)

        # Start the notebook's kernel now (no kernel dialog in the page; the imports run while the browser starts).
        request = urllib.request.Request(
            f"{base}/api/sessions?token={token}",
            data=json.dumps({"path": NOTEBOOK.name, "type": "notebook", "kernel": {"name": "python3"}}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=30)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1900})
            page.set_default_timeout(60_000)
            # should a kernel dialog come up anyway, take the notebook's kernel
            page.add_locator_handler(
                page.locator(".jp-Dialog", has_text="Select Kernel"),
                lambda dialog: dialog.get_by_role("button", name="Select", exact=True).click(),
            )
            try:
                t0 = time.time()
                page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
                page.locator(".jp-Notebook").first.wait_for()
                page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for()
                print(f"[browser] notebook open, kernel idle at {time.time() - t0:.0f} s")
                n_code = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
                for i in range(n_code):
                    _run_cell(page, page.locator(".jp-Notebook .jp-CodeCell").nth(i))
                    print(f"[browser] cell {i + 1} of {n_code} ran at {time.time() - t0:.0f} s")

                cells = page.locator(".jp-Notebook .jp-CodeCell")
                explorer = cells.nth(1).locator(".jp-OutputArea")
                html_out = explorer.locator(".widget-html", has_text="writes at position").first
                html_out.wait_for(timeout=75_000)
                expect(html_out).to_contain_text("head 0.0 writes at position")
                got_first = _promoted_ids(html_out)

                for label, value in (("layer", "1"), ("head", "3")):
                    explorer.locator(".widget-dropdown", has=page.locator("label", has_text=label)).locator(
                        "select"
                    ).select_option(value)
                expect(html_out).to_contain_text("head 1.3 writes at position", timeout=30_000)
                got_new = _promoted_ids(html_out)
                explorer.locator("img").first.wait_for()
                page.wait_for_timeout(1500)  # let the last figure replace the previous one
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                cells.nth(1).screenshot(path=str(SCREENSHOT))
                print(f"screenshot: {SCREENSHOT}")

                # PatchingMap: click the map's cell (layer 1, head 2); its details and its HeadExplorer follow
                pmap = cells.nth(2).locator(".jp-OutputArea")
                buttons = pmap.locator(".widget-button")
                expect(buttons).to_have_count(2 * 4)  # 2 layers x 4 heads
                buttons.nth(1 * 4 + 2).click()
                expect(pmap.locator(".widget-html", has_text="mean over prompts").first).to_contain_text(
                    "layer 1, head 2", timeout=30_000
                )
                expect(pmap.locator(".widget-html", has_text="writes at position").first).to_contain_text(
                    "head 1.2 writes at position", timeout=30_000
                )
                page.wait_for_timeout(1500)
                cells.nth(2).screenshot(path=str(SCREENSHOT.with_name("patching_map.png")))
                print(f"screenshot: {SCREENSHOT.with_name('patching_map.png')}")
            except Exception:
                failed = SCREENSHOT.with_name("failure.png")
                failed.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(failed), full_page=True)
                print(f"failure screenshot: {failed}")
                print("outputs:", page.locator(".jp-OutputArea").all_inner_texts())
                raise
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    assert got_first == want_first
    assert got_new == want_new
