"""The widgets in a real browser: Debian's chromium, driven by Playwright, against a JupyterLab started here.

The test copies tests/browser/widgets.ipynb to a temporary folder (JupyterLab's autosave never touches the
repository), starts JupyterLab there on a free loopback port with the session's LLMLAB_HOME (its `weights/` links to the
weight cache, and its server is the one the other tests use), runs all cells,
types a query into the SearchBox and presses Enter, and checks the hits, the DatasetEditor and the
ComparisonView in the DOM. A screenshot is saved as `widgets.png` in the test's tmp folder.

Chromium comes from apt (`make browser`, run by `make test`); no browser is ever downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = Path(__file__).parent / "browser" / "widgets.ipynb"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
KERNEL_TIMEOUT_MS = 120_000
WIDGETS_TIMEOUT_MS = 300_000  # a fresh kernel starts the local backend and embeds three documents

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, lab):
    """A JupyterLab serving a copy of the widgets notebook: yields its base URL.

    The kernel inherits the session's `LLMLAB_HOME` and finds its running server (the `lab` fixture starts it):
    a home of its own would dequantize the GGUF first, over a minute on a busy machine.
    """
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
    }
    env.pop("OPENAI_API_KEY", None)
    log = open(tmp_path / "jupyterlab.log", "wb")  # noqa: SIM115  (closed after the server stops)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--allow-root",
            "--IdentityProvider.token=",
            "--ServerApp.disable_check_xsrf=True",
            "--LabApp.expose_app_in_browser=True",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],  # fmt: skip
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # the server shuts its kernels down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run_all_cells(page) -> None:
    """Run all cells and wait until every code cell has run.

    A dialog ("Select Kernel", "Restart Kernel?") is accepted, then given 5 s to close before another click:
    in a failed run it was clicked each half second while it closed, beside five kernel starts in two seconds,
    and in another a click made while it opened was lost (the dialog stayed). On a busy machine JupyterLab may also
    replace the kernel while the first run is queued, so some cells never run (`[ ]:`) or run in the new kernel
    without the cells before them (a `NameError`), or lose the widgets' models ("Error displaying widget: model
    not found", after jupyter_server refused the kernel's first websocket while it started). While the kernel
    is idle and a cell has not run, run all cells again; after a `NameError` or a lost widget, reload the page
    (a new kernel connection and widget manager) and run all again. (Starting the kernel without the dialog,
    JupyterLab's `autoStartDefaultKernel`, failed 2 runs of 3 here: the kernel was shut down as it started.)
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + (KERNEL_TIMEOUT_MS + WIDGETS_TIMEOUT_MS) / 1000
    dialog = page.locator(".jp-Dialog")
    accept = dialog.locator(".jp-mod-accept")
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    not_run = prompts.filter(has_text=re.compile(r"^\s*\[ \]:\s*$"))
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    out_of_order = errors.filter(has_text="NameError")
    lost_widgets = page.get_by_text("Error displaying widget")
    last_try = None
    while time.monotonic() < deadline:
        if accept.count():
            accept.first.click()
            with contextlib.suppress(PlaywrightTimeout):
                dialog.first.wait_for(state="detached", timeout=5_000)
        elif idle.count() and (last_try is None or time.monotonic() - last_try > 10):
            if last_try is not None:  # a run was asked for, and every queued cell has ended since
                if out_of_order.count() or lost_widgets.count():
                    page.once("dialog", lambda unsaved: unsaved.accept())  # "leave the page?": yes
                    page.reload()
                    last_try = None
                    continue
                if prompts.count() and not not_run.count():
                    return
            # not awaited: the command's promise resolves only when every cell has run (it clears their outputs)
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            last_try = time.monotonic()
        page.wait_for_timeout(500)
    shown = "\n---\n".join(errors.all_inner_texts())[-3000:]
    raise AssertionError(f"the notebook's cells did not all run; its error outputs:\n{shown or '(none)'}")


def test_widgets_render_and_search_in_a_real_browser(jupyterlab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        try:
            page.goto(f"{jupyterlab}/lab/tree/{NOTEBOOK.name}")
            _run_all_cells(page)

            # the SearchBox: type a query, press Enter, the hits appear
            query = page.locator(".llmlab-search-box .llmlab-search-query input")
            query.wait_for(timeout=WIDGETS_TIMEOUT_MS)
            query.fill("How many days of annual leave do I get?")
            query.press("Enter")
            hits = page.locator(".llmlab-search-box .llmlab-search-results table.llmlab-hits tr")
            expect(hits).to_have_count(4, timeout=120_000)  # a header and k = 3 hits
            expect(hits.nth(1)).to_contain_text("leave.md")
            expect(page.locator(".llmlab-search-info")).to_contain_text("3 hits")

            # the DatasetEditor: a page of 3 rows, validation and tokens; the next page
            editor = page.locator(".llmlab-dataset-editor")
            expect(editor.locator(".llmlab-row")).to_have_count(3)
            expect(editor.locator(".llmlab-validation")).to_contain_text("OK")
            expect(editor.locator(".llmlab-tokens")).to_contain_text("tokens")
            expect(editor.locator(".llmlab-page-label")).to_contain_text("examples 1–3 of")
            editor.locator(".llmlab-page-next").click()
            expect(editor.locator(".llmlab-page-label")).to_contain_text("examples 4–6 of")

            # the ComparisonView: a table and one bar chart per metric
            comparison = page.locator(".llmlab-comparison")
            expect(comparison.locator(".llmlab-comparison-chart svg")).to_have_count(2)
            expect(comparison.locator("table")).to_contain_text("RAG")
            expect(page.locator(".llmlab-error").filter(has_text="Error")).to_have_count(0)
        finally:
            page.screenshot(path=str(tmp_path / "widgets.png"), full_page=True)
            browser.close()
    assert (tmp_path / "widgets.png").stat().st_size > 10_000
