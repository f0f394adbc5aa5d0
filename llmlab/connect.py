"""Choose a backend and hand back an `openai.OpenAI` client with the model names to use.

Three kinds of backend: OpenAI (with `OPENAI_API_KEY`), any OpenAI-compatible server (`base_url=`, or
`OPENAI_BASE_URL`: vLLM, Ollama, llama.cpp, LM Studio, another `llmlab serve`), and the local backend: one
server process per `LLMLAB_HOME`, shared by every kernel (this module is the one place that starts it).

>>> lab = connect()                    # doctest: +SKIP
llmlab: local backend at http://127.0.0.1:51234/v1 (OPENAI_API_KEY is not set; started the home's server)
>>> lab.client.chat.completions.create(model=lab.chat_model, messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
>>> connect(base_url="http://localhost:11434/v1")  # Ollama: model names from its /v1/models  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID
from llmlab.openai_facts import CHAT_MODEL, EMBEDDING_MODEL, FINETUNE_MODEL
from llmlab.paths import llmlab_home

if TYPE_CHECKING:
    from openai import OpenAI
# `openai` is imported where it is used: importing llmlab must stay light, for the server process
# (`python -m llmlab.local.process`, which answers /v1/models before it imports the SDK's types).

OPENAI_MODELS = {"chat": CHAT_MODEL, "embedding": EMBEDDING_MODEL, "finetune": FINETUNE_MODEL}
LOCAL_MODELS = {"chat": CHAT_MODEL_ID, "embedding": EMBEDDING_MODEL_ID, "finetune": CHAT_MODEL_ID}
ENDPOINT_TIMEOUT = 10.0  # seconds an OpenAI-compatible server has to answer GET /v1/models
CAPABILITIES = ("chat", "embeddings", "fine_tuning")
# Substrings of model ids that mark an embedding model, and models that are neither chat nor embeddings
_EMBEDDING_HINTS = ("embed", "minilm", "bge-", "e5-", "gte-", "mpnet", "arctic-embed")
_OTHER_HINTS = ("whisper", "tts", "dall-e", "moderation", "rerank", "transcribe", "image", "audio", "sora")


@dataclass
class Lab:
    """An `openai.OpenAI` client and the model names that fit its backend.

    `backend` is "local", "openai" or "endpoint" (any other OpenAI-compatible server); a model name is None
    when the backend has no such model (see `supports`).
    """

    client: OpenAI
    backend: str
    chat_model: str | None
    embedding_model: str | None
    finetune_model: str | None
    _supports: dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    def supports(self, capability: str) -> bool:
        """Whether the backend offers "chat", "embeddings" or "fine_tuning" (asked once, then remembered).

        >>> if not lab.supports("fine_tuning"):   # doctest: +SKIP
        ...     print("this server cannot fine-tune: skipping")
        """
        if capability not in CAPABILITIES:
            raise ValueError(f"capability must be one of {', '.join(CAPABILITIES)}, not {capability!r}")
        if capability not in self._supports:
            self._supports[capability] = self._probe(capability)
        return self._supports[capability]

    def _probe(self, capability: str) -> bool:
        if capability == "chat":
            return self.chat_model is not None
        if capability == "embeddings":
            return self.embedding_model is not None
        if self.backend != "endpoint":
            return True
        import openai

        try:  # Ollama, llama.cpp, LM Studio and vLLM have no /v1/fine_tuning/jobs: a 404
            self.client.with_options(timeout=ENDPOINT_TIMEOUT, max_retries=0).fine_tuning.jobs.list(limit=1)
        except openai.OpenAIError:
            return False
        return True

    def __repr__(self) -> str:  # never shows the key
        return f"Lab(backend={self.backend!r}, base_url={self.base_url!r}, chat_model={self.chat_model!r})"


@functools.cache
def _http_module() -> Any:
    """The httpx flavour that the installed `openai` SDK builds its clients on (httpx2 in SDK 3.x, httpx before)."""
    import openai

    client = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(client.__module__.split(".")[0])


def _openai_host(url: str) -> bool:
    return urlsplit(url).hostname == "api.openai.com"


def choose_backend(backend: str = "auto", base_url: str | None = None) -> tuple[str, str]:
    """The backend `connect(backend, base_url=...)` would use, and why, without starting anything.

    >>> choose_backend("local")
    ('local', 'asked for the local backend')
    >>> choose_backend(base_url="http://localhost:11434/v1")
    ('endpoint', 'base_url was given')
    """
    if backend not in ("auto", "local", "openai"):
        raise ValueError(f"backend must be 'auto', 'local' or 'openai', not {backend!r}")
    if base_url is not None:
        if backend != "auto":
            raise ValueError(f"base_url= names a server of its own: leave backend='auto', not {backend!r}")
        return (
            ("openai", "base_url is OpenAI's")
            if _openai_host(base_url)
            else ("endpoint", "base_url was given")
        )
    has_key = bool(os.environ.get("OPENAI_API_KEY"))
    if backend == "openai":
        if not has_key:
            raise RuntimeError(
                "backend='openai' needs OPENAI_API_KEY: set it, or call llmlab.ui.ask_api_key()"
            )
        return "openai", "asked for OpenAI"
    if backend == "local":
        return "local", "asked for the local backend"
    env_url = os.environ.get("OPENAI_BASE_URL")
    if env_url and not _openai_host(env_url):
        return "endpoint", "OPENAI_BASE_URL is set"
    if has_key:
        return "openai", "OPENAI_API_KEY is set"
    return "local", "OPENAI_API_KEY is not set"


def pick_models(model_ids: list[str]) -> tuple[str | None, str | None]:
    """(chat model, embedding model) among a server's model ids; None where it has none.

    >>> pick_models(["nomic-embed-text:latest", "llama3.2:latest", "whisper-1"])
    ('llama3.2:latest', 'nomic-embed-text:latest')
    >>> pick_models(["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "ft:SmolLM2-135M-Instruct:llmlab::abc"])
    ('SmolLM2-135M-Instruct', 'all-MiniLM-L6-v2')
    """
    lower = {m: m.lower() for m in model_ids}
    embedding = [m for m in model_ids if any(h in lower[m] for h in _EMBEDDING_HINTS)]
    chat = [
        m
        for m in model_ids
        if m not in embedding and not m.startswith("ft:") and not any(h in lower[m] for h in _OTHER_HINTS)
    ]
    return (chat[0] if chat else None, embedding[0] if embedding else None)


def _listed(name: str, model_ids: list[str]) -> bool:
    """True when the server lists `name` (Ollama also answers to a name without its ":latest" tag)."""
    return name in model_ids or f"{name}:latest" in model_ids


def _endpoint_lab(
    base_url: str, api_key: str | None, chat_model: str | None, embedding_model: str | None
) -> Lab:
    import openai
    from openai import OpenAI

    # Many local servers need no key; the SDK insists on a non-empty one.
    client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
    try:
        listing = client.with_options(timeout=ENDPOINT_TIMEOUT, max_retries=0).models.list()
    except openai.AuthenticationError as error:
        raise PermissionError(f"{base_url} refused the API key (401): pass api_key=") from error
    except (openai.APIConnectionError, openai.APIStatusError) as error:
        raise ConnectionError(
            f"{base_url} did not answer GET /models within {ENDPOINT_TIMEOUT:.0f} s ({error}): is the server "
            "running, and does the URL end in /v1?"
        ) from error
    model_ids = [m.id for m in listing]
    picked_chat, picked_embedding = pick_models(model_ids)
    for given, kind in ((chat_model, "chat_model"), (embedding_model, "embedding_model")):
        if given is not None and not _listed(given, model_ids):
            raise ValueError(f"{base_url} has no model {given!r} ({kind}); it lists: {', '.join(model_ids)}")
    chat = chat_model or picked_chat
    return Lab(client, "endpoint", chat, embedding_model or picked_embedding, chat)


@functools.cache
def _follow_server_transport() -> type:
    """`_FollowServer`, made on first use (its base class is the transport of the SDK's httpx flavour)."""
    import openai

    http = _http_module()

    class _FollowServer(http.HTTPTransport):
        """Sends the client's requests to the home's server, starting it again if it stopped (idle, or killed)."""

        def __init__(self, home: Path) -> None:
            super().__init__(limits=openai.DEFAULT_CONNECTION_LIMITS)
            self.home = home
            self.client: OpenAI | None = None

        def handle_request(self, request: Any) -> Any:
            try:
                return super().handle_request(request)
            except http.ConnectError:
                from llmlab.local.process import ensure_server

                record, _ = ensure_server(self.home)
                if record.port == request.url.port:
                    raise
            if self.client is not None:  # later requests go straight to the new server
                self.client.base_url, self.client.api_key = record.url, record.key
            request.url = request.url.copy_with(port=record.port)
            request.headers["Authorization"] = f"Bearer {record.key}"
            return super().handle_request(request)

    return _FollowServer


def _lab(
    client: OpenAI, backend: str, models: dict, chat_model: str | None, embedding_model: str | None
) -> Lab:
    """A Lab with the backend's default models, or the ones the learner named."""
    return Lab(
        client,
        backend,
        chat_model or models["chat"],
        embedding_model or models["embedding"],
        models["finetune"],
    )


def _local_lab(chat_model: str | None, embedding_model: str | None) -> tuple[Lab, str]:
    from llmlab.local.process import ensure_server

    home = llmlab_home()
    # the SDK's import (1-2 s) runs while a new server starts, in its own process
    threading.Thread(target=importlib.import_module, args=("openai",), daemon=True).start()
    record, started = ensure_server(home)
    import openai
    from openai import OpenAI

    transport = _follow_server_transport()(home)
    client = OpenAI(
        base_url=record.url, api_key=record.key, http_client=openai.DefaultHttpxClient(transport=transport)
    )
    transport.client = client
    lab = _lab(client, "local", LOCAL_MODELS, chat_model, embedding_model)
    return (
        lab,
        f"started the home's server, pid {record.pid}"
        if started
        else f"using its running server, pid {record.pid}",
    )


def connect(
    backend: str = "auto",
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    chat_model: str | None = None,
    embedding_model: str | None = None,
    quiet: bool = False,
) -> Lab:
    """A `Lab` for `backend`: "auto", "local" or "openai"; or for the OpenAI-compatible server at `base_url`.

    "auto" = `base_url` if given, else `OPENAI_BASE_URL` if set, else OpenAI when `OPENAI_API_KEY` is set,
    else the local backend. For a server at `base_url`, the chat and embedding models are picked from its
    `/v1/models` unless `chat_model=` / `embedding_model=` name them.
    """
    chosen, why = choose_backend(backend, base_url)
    if chosen == "endpoint":
        lab = _endpoint_lab(base_url or os.environ["OPENAI_BASE_URL"], api_key, chat_model, embedding_model)
    elif chosen == "openai":
        from openai import OpenAI

        client = OpenAI(base_url=base_url, api_key=api_key) if base_url else OpenAI(api_key=api_key)
        lab = _lab(client, "openai", OPENAI_MODELS, chat_model, embedding_model)
    else:
        lab, how = _local_lab(chat_model, embedding_model)
        why = f"{why}; {how}"
    if not quiet:
        models = f": chat {lab.chat_model}, embeddings {lab.embedding_model}" if chosen == "endpoint" else ""
        print(f"llmlab: {chosen} backend at {lab.base_url} ({why}){models}")
    return lab
