"""Choose a backend and hand back an `openai.OpenAI` client with the model names to use.

>>> lab = connect()                    # doctest: +SKIP
llmlab: local backend at http://127.0.0.1:51234/v1 (OPENAI_API_KEY is not set)
>>> lab.client.chat.completions.create(model=lab.chat_model, messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from openai import OpenAI

from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID

OPENAI_MODELS = {
    "chat": "gpt-4o-mini",
    "embedding": "text-embedding-3-small",
    "finetune": "gpt-4o-mini-2024-07-18",
}
LOCAL_MODELS = {"chat": CHAT_MODEL_ID, "embedding": EMBEDDING_MODEL_ID, "finetune": CHAT_MODEL_ID}
LOCAL_API_KEY = (
    "llmlab-local"  # the local server on 127.0.0.1 needs no key; the SDK insists on a non-empty one
)

_local_lock = threading.Lock()
_local_base_url: str | None = None


@dataclass
class Lab:
    """An `openai.OpenAI` client and the model names that fit its backend."""

    client: OpenAI
    backend: str  # "local" or "openai"
    chat_model: str
    embedding_model: str
    finetune_model: str
    base_url: str

    def __repr__(self) -> str:  # never shows the key
        return f"Lab(backend={self.backend!r}, base_url={self.base_url!r}, chat_model={self.chat_model!r})"


def choose_backend(backend: str = "auto") -> tuple[str, str]:
    """The backend `connect(backend)` would use, and why, without starting anything.

    >>> choose_backend("local")
    ('local', 'asked for the local backend')
    """
    if backend not in ("auto", "local", "openai"):
        raise ValueError(f"backend must be 'auto', 'local' or 'openai', not {backend!r}")
    has_key = bool(os.environ.get("OPENAI_API_KEY"))
    if backend == "openai":
        if not has_key:
            raise RuntimeError(
                "backend='openai' needs OPENAI_API_KEY: set it, or call llmlab.ui.ask_api_key()"
            )
        return "openai", "asked for OpenAI"
    if backend == "local":
        return "local", "asked for the local backend"
    if has_key:
        return "openai", "OPENAI_API_KEY is set"
    return "local", "OPENAI_API_KEY is not set"


def local_base_url() -> str:
    """Start the local server once per process (127.0.0.1, a free port) and return its base URL."""
    global _local_base_url
    with _local_lock:
        if _local_base_url is None:
            from llmlab.local.server import start_in_thread  # the one place that starts the local backend

            _local_base_url, _stop = start_in_thread()
        return _local_base_url


def connect(backend: str = "auto", *, quiet: bool = False) -> Lab:
    """A `Lab` for `backend`: "auto" (OpenAI when OPENAI_API_KEY is set, else local), "local" or "openai"."""
    chosen, why = choose_backend(backend)
    if chosen == "openai":
        client = OpenAI()
        models = OPENAI_MODELS
    else:
        client = OpenAI(base_url=local_base_url(), api_key=LOCAL_API_KEY)
        models = LOCAL_MODELS
    base_url = str(client.base_url)
    if not quiet:
        print(f"llmlab: {chosen} backend at {base_url} ({why})")
    return Lab(client, chosen, models["chat"], models["embedding"], models["finetune"], base_url)
