"""Notebooks 02, 02b, 06 and 07 on a server without fine-tuning (Ollama, llama.cpp, LM Studio, vLLM): they say so and
skip the fine-tuning cells instead of failing.

The stand-in for such a server is a real HTTP proxy in front of the session's local server: it passes every
request through (real chat and embeddings) except `/v1/fine_tuning/...` and `/v1/files...`, which answer 404
as Ollama does. The notebooks run in real kernels (nbclient) that find it through `OPENAI_BASE_URL`.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

NO_FINE_TUNING = ("/v1/fine_tuning", "/v1/files")
SKIPPED = "cannot fine-tune"


def _stand_in(upstream: str, key: str) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler that forwards to `upstream` (adding its key) and 404s the fine-tuning and files routes."""

    class NoFineTuning(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        seen: list[str] = []

        def _forward(self) -> None:
            self.seen.append(f"{self.command} {self.path}")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith(NO_FINE_TUNING):
                status, content, kind = 404, b"404 page not found", "text/plain"
            else:
                reply = httpx.request(
                    self.command,
                    upstream + self.path.removeprefix("/v1"),
                    content=body,
                    headers={
                        "Content-Type": self.headers.get("Content-Type", "application/json"),
                        "Authorization": f"Bearer {key}",
                    },
                    timeout=600,
                )
                status, content = reply.status_code, reply.content
                kind = reply.headers.get("Content-Type", "application/json")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    return NoFineTuning


@pytest.fixture
def no_fine_tuning_url(lab, monkeypatch) -> Iterator[tuple[str, list[str]]]:
    """The stand-in's base URL, set as OPENAI_BASE_URL for the kernels; and the requests it saw."""
    handler = _stand_in(lab.base_url.rstrip("/"), lab.client.api_key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    try:
        yield url, handler.seen
    finally:
        server.shutdown()


def run_notebook(name: str, tmp_path: Path, edits: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Run notebooks/`name` in a fresh kernel (after replacing source text `edits`); raises on a failing cell."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    for old, new in (edits or {}).items():
        cells = [c for c in nb.cells if old in c.source]
        assert len(cells) == 1, old
        cells[0].source = cells[0].source.replace(old, new)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO / "notebooks"}}
    ).execute()
    return nb


def shown(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        "".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_notebook_02_says_it_cannot_fine_tune_and_skips_the_job(no_fine_tuning_url, tmp_path):
    url, seen = no_fine_tuning_url
    nb = run_notebook("02_finetuning_job.ipynb", tmp_path)
    assert f"{url}/ {SKIPPED}: the cells that upload files and train are skipped." in shown(nb)
    assert "GET /v1/fine_tuning/jobs?limit=1" in seen  # lab.supports asked the server
    assert not [r for r in seen if r.startswith("POST")]  # no upload, no job was tried


def test_notebook_02b_compares_the_prompt_only_ways_without_the_fine_tuned_model(
    no_fine_tuning_url, tmp_path
):
    url, seen = no_fine_tuning_url
    one_per_category = {
        "held_out = formatting.load_format_eval()": (
            'held_out = formatting.load_format_eval().groupby("category").head(1)'
        )
    }
    nb = run_notebook("02b_finetuning_for_format.ipynb", tmp_path, one_per_category)
    text = shown(nb)
    assert f"{url}/ {SKIPPED}: the fine-tuned model is left out of the comparison." in text
    assert "schema       valid  4/4" in text and "fine-tuned   valid" not in text
    assert any(r.startswith("POST /v1/chat/completions") for r in seen)
    assert not [r for r in seen if r.startswith(("POST /v1/fine_tuning", "POST /v1/files"))]


def test_notebook_06_measures_the_base_model_and_skips_the_tool_use_fine_tune(no_fine_tuning_url, tmp_path):
    url, seen = no_fine_tuning_url
    nb = run_notebook("06_function_calling.ipynb", tmp_path)
    assert f"{url}/ {SKIPPED}: the fine-tuned model is left out." in shown(nb)
    assert any(r.startswith("POST /v1/chat/completions") for r in seen)
    assert not [r for r in seen if r.startswith(("POST /v1/fine_tuning", "POST /v1/files"))]


def test_notebook_07_compares_without_the_fine_tuned_model(no_fine_tuning_url, tmp_path):
    url, seen = no_fine_tuning_url
    nb = run_notebook("07_compare_and_combine.ipynb", tmp_path, {"PER_KIND = None": "PER_KIND = 1"})
    assert f"{url}/ {SKIPPED}: the fine-tuned model is left out of the comparison." in shown(nb)
    summary = next(c for c in nb.cells if c.source.startswith("rows = ") and "summarize(" in c.source)
    table = next(o["data"]["text/plain"] for o in summary.outputs if o["output_type"] == "execute_result")
    assert "RAG" in table and "hybrid" in table and "fine-tuned" not in table
    assert any(r.startswith("POST /v1/chat/completions") for r in seen)
    assert any(r.startswith("POST /v1/embeddings") for r in seen)
    assert not [r for r in seen if r.startswith(("POST /v1/fine_tuning", "POST /v1/files"))]
