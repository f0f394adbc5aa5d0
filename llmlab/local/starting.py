"""The server's first second: answer ``GET /v1/models`` while the app itself is still being built.

Building the app means importing FastAPI (0.5-1 s on a small machine); the port is bound and `connect()`
is told where it is before that. `StartingApp` is what uvicorn serves from the first moment: until the real app is ready it answers the one request `connect()` waits for — a
``GET /v1/models`` with the server's key, addressed to a loopback host, from no foreign web page — with
the home's model list; every other request waits for the real app, which answers it (errors included).
Once the app is ready, every request goes to it. The models load on first use (the chat model, when built
and served on ONNX, while the app is being built: `process.run`).

>>> front = StartingApp(home, api_key=key)                           # doctest: +SKIP
>>> front.start(lambda: create_app(home, api_key=key), on_error=stop)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from llmlab.local.loopback import refusal
from llmlab.local.store import Store
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID

# A request that sets no max_tokens gets at most this many (shown in /v1/models as `default_max_tokens`):
# SmolLM2 can loop for its whole 8,192-token context, minutes on a CPU with the shared model locked.
DEFAULT_MAX_TOKENS = 512
_CREATED = 1730000000  # a fixed "created" time for the bundled models
_log = logging.getLogger(__name__)


def model_entry(name: str, created: int) -> dict:
    """One model of the listing, as `openai.types.Model(...).model_dump(mode="json")` gives it (checked by
    tests/test_backend.py and tests/test_conformance.py); a chat model adds its `default_max_tokens`.

    >>> model_entry("all-MiniLM-L6-v2", 0)
    {'id': 'all-MiniLM-L6-v2', 'created': 0, 'object': 'model', 'owned_by': 'llmlab'}
    """
    entry = {"id": name, "created": created, "object": "model", "owned_by": "llmlab"}
    return entry if name == EMBEDDING_MODEL_ID else {**entry, "default_max_tokens": DEFAULT_MAX_TOKENS}


def model_list(store: Store) -> list[dict]:
    """The bundled models, then the model of every succeeded fine-tuning job of `store`."""
    local = [model_entry(name, _CREATED) for name in (CHAT_MODEL_ID, EMBEDDING_MODEL_ID)]
    tuned = []
    for job in store.list_jobs():
        if job["status"] == "succeeded" and job.get("fine_tuned_model"):
            try:
                tuned.append(model_entry(job["fine_tuned_model"], int(job["finished_at"])))
            except (TypeError, ValueError) as exc:
                _log.warning(
                    "llmlab: skipping the stored record %s: it does not render: %s", job.get("id"), exc
                )
    return local + tuned


class StartingApp:
    """The ASGI app uvicorn serves: `GET /v1/models` at once, everything else by the app `start` builds."""

    def __init__(self, home: Path, api_key: str, allow_remote: bool = False) -> None:
        self.store = Store(home)
        self._key = f"Bearer {api_key}".encode()
        self.allow_remote = allow_remote
        self.app: Any = None
        self._built: Future = Future()

    def start(self, build: Callable[[], Any], on_error: Callable[[], None]) -> None:
        """Run `build()` (which returns the real app) in a thread of its own; `on_error()` if it fails."""

        def run() -> None:
            try:
                app = build()
            except BaseException as exc:
                _log.exception("llmlab: the server could not start")
                self._built.set_exception(exc)
                on_error()
                return
            self.app = app
            self._built.set_result(app)

        threading.Thread(target=run, name="llmlab-starting", daemon=True).start()

    def wait(self, timeout: float | None = None) -> Any:
        """The real app, once built (raises what building it raised)."""
        return self._built.result(timeout)

    def _answers_early(self, scope: dict) -> bool:
        """A request the real app would answer with the model list (the checks of its key and guard)."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/v1/models":
            return False
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("authorization", "").encode("latin-1")
        return secrets.compare_digest(given, self._key) and refusal(headers, self.allow_remote) is None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        app = self.app
        if app is None:
            if self._answers_early(scope):
                body = json.dumps({"object": "list", "data": model_list(self.store)}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            app = await asyncio.wrap_future(self._built)
        await app(scope, receive, send)
