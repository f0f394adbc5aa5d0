"""The models one server serves: a ChatRuntime and an EmbeddingRuntime, each loaded on first use.

Loading takes seconds and hundreds of MB, so an app that only lists files never loads a model (but a server
process loads the chat model while it starts when it is built and served on ONNX: `process.run`).

>>> models = Models(home)  # doctest: +SKIP
>>> models.chat() is models.chat()  # doctest: +SKIP
True
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class Models:
    """One ChatRuntime and one EmbeddingRuntime per app, created on first use."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._chat: Any = None
        self._embedding: Any = None

    def chat(self) -> Any:
        with self._lock:
            if self._chat is None:
                from llmlab.local.runtime import ChatRuntime

                self._chat = ChatRuntime(self.home)
            return self._chat

    def embedding(self) -> Any:
        with self._lock:
            if self._embedding is None:
                from llmlab.local.embedding_runtime import EmbeddingRuntime

                self._embedding = EmbeddingRuntime(self.home)
            return self._embedding
