"""Embed many texts through the `openai` client: batched requests, a content-addressed disk cache, progress.

>>> lab = llmlab.connect()                                          # doctest: +SKIP
>>> vectors = embed(lab, ["How many leave days do I get?", "Who pays for my laptop?"])  # doctest: +SKIP
>>> vectors.shape, vectors.dtype                                    # doctest: +SKIP
((2, 384), dtype('float32'))

Each vector is cached under ``llmlab_home()/embeddings``, keyed by the SHA-256 of the backend, the model
and the text, so re-embedding an unchanged corpus sends no request at all. The cache is a set of shards:
``<name>.npy`` (float32 vectors) and ``<name>.keys.npy`` (their 32-byte keys), written atomically, keys
last, so a shard without its keys file is simply ignored. Many small shards are merged from time to time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.openai_facts import EMBEDDING_MODEL
from llmlab.paths import atomic_write_bytes, llmlab_home, remove_orphans, temp_names

# Texts per request: OpenAI accepts up to 2,048 inputs and ~300k tokens per request. Big requests are faster
# locally too (the server sorts a request's texts by length before batching them through the model).
DEFAULT_BATCH_SIZE = 1024
MAX_REQUEST_TOKENS = 250_000  # a request also ends before its texts reach this many tokens
PROGRESS_ABOVE = 1000  # progress=None shows a bar when more texts than this need a request
MAX_SHARDS = 64  # more shard files than this get merged into one
_KEYS = ".keys.npy"


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class EmbeddingCache:
    """Vectors on disk, addressed by the SHA-256 of ``backend/model`` and the text.

    >>> import tempfile
    >>> cache = EmbeddingCache(Path(tempfile.mkdtemp()))
    >>> keys = [cache.key("local/m", "hello")]
    >>> cache.put(keys, np.ones((1, 3), dtype=np.float32))
    >>> cache.get(keys)[0]
    array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._where: dict[bytes, tuple[str, int]] = {}  # key -> (shard name, row)
        self._shards: set[str] = set()

    @staticmethod
    def key(model: str, text: str) -> bytes:
        """The cache key of `text` embedded by `model`."""
        return hashlib.sha256(f"{model}\0{text}".encode("utf-8", "surrogatepass")).digest()

    def _scan(self) -> None:
        """Index the shards written since the last scan (by this or another process); forget removed ones."""
        names = (
            {p.name[: -len(_KEYS)] for p in self.folder.glob(f"*{_KEYS}")} if self.folder.is_dir() else set()
        )
        if self._shards - names:  # shards were merged away: rebuild the map
            self._where.clear()
            self._shards.clear()
        for name in sorted(names - self._shards):
            try:
                keys = np.load(self.folder / f"{name}{_KEYS}", allow_pickle=False)
                rows = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False).shape[0]
            except (OSError, ValueError):  # a foreign or damaged file: not part of the cache
                continue
            if keys.ndim != 2 or keys.shape != (rows, 32):
                continue
            self._where.update((k.tobytes(), (name, i)) for i, k in enumerate(keys))
            self._shards.add(name)

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """The cached vector for each key, or None."""
        with self._lock:
            self._scan()
            found: list[np.ndarray | None] = [None] * len(keys)
            by_shard: dict[str, list[tuple[int, int]]] = {}
            for j, k in enumerate(keys):
                if k in self._where:
                    name, row = self._where[k]
                    by_shard.setdefault(name, []).append((j, row))
            for name, pairs in by_shard.items():
                try:
                    vectors = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                    rows = vectors[[row for _, row in pairs]]
                except (OSError, ValueError, IndexError):  # removed or damaged meanwhile: a miss
                    continue
                for (j, _), vector in zip(pairs, rows, strict=True):
                    found[j] = np.array(vector, dtype=np.float32)
            return found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store vectors (n, d) under their keys as one new shard."""
        if not len(keys):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = hashlib.sha256(key_array.tobytes()).hexdigest()[:32]
        with self._lock:
            remove_orphans(self.folder, temp_names())  # temp files of puts that were killed
            atomic_write_bytes(self.folder / f"{name}.npy", _array_bytes(vectors))
            atomic_write_bytes(self.folder / f"{name}{_KEYS}", _array_bytes(key_array))
            self._where.update((k, (name, i)) for i, k in enumerate(keys))
            self._shards.add(name)
            if len(self._shards) > MAX_SHARDS:
                self._merge()

    def _merge(self) -> None:
        """Rewrite all shards of one dimension as a single shard, then delete the old ones."""
        groups: dict[int, list[str]] = {}
        for name in sorted(self._shards):
            shape = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False).shape
            groups.setdefault(shape[1], []).append(name)
        for names in groups.values():
            if len(names) < 2:
                continue
            keys = np.concatenate([np.load(self.folder / f"{n}{_KEYS}", allow_pickle=False) for n in names])
            vectors = np.concatenate([np.load(self.folder / f"{n}.npy", allow_pickle=False) for n in names])
            merged = hashlib.sha256(keys.tobytes()).hexdigest()[:32]
            atomic_write_bytes(self.folder / f"{merged}.npy", _array_bytes(vectors))
            atomic_write_bytes(self.folder / f"{merged}{_KEYS}", _array_bytes(keys))
            for name in names:
                if name != merged:
                    (self.folder / f"{name}{_KEYS}").unlink(missing_ok=True)
                    (self.folder / f"{name}.npy").unlink(missing_ok=True)
        self._where.clear()
        self._shards.clear()
        self._scan()

    def clear(self) -> None:
        """Delete every cached vector."""
        with self._lock:
            for path in self.folder.glob("*.npy"):
                path.unlink(missing_ok=True)
            self._where.clear()
            self._shards.clear()


_caches: dict[Path, EmbeddingCache] = {}
_caches_lock = threading.Lock()


def embedding_cache() -> EmbeddingCache:
    """The cache under ``llmlab_home()/embeddings`` (one object per folder and process)."""
    folder = llmlab_home() / "embeddings"
    with _caches_lock:
        return _caches.setdefault(folder, EmbeddingCache(folder))


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts; wrap a single text in a list: embed(lab, [text])")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
        if not text:
            raise ValueError(f"texts[{i}] is an empty string: embedding APIs reject empty input")
    return texts


def _request(lab: Any, model: str, batch: list[str]) -> np.ndarray:
    """One embeddings request; base64 is decoded straight into numpy (no list of floats)."""
    response = lab.client.embeddings.create(model=model, input=batch, encoding_format="base64")
    data = sorted(response.data, key=lambda item: item.index)
    if len(data) != len(batch):
        raise RuntimeError(f"asked for {len(batch)} embeddings, the server returned {len(data)}")
    rows = [
        np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        if isinstance(item.embedding, str)
        else np.asarray(item.embedding, dtype=np.float32)
        for item in data
    ]
    return np.stack(rows).astype(np.float32, copy=False)


def _batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Positions of `texts` split into requests of at most `batch_size` texts and `MAX_REQUEST_TOKENS` tokens."""
    from llmlab.tokens import count_tokens

    batches: list[list[int]] = [[]]
    tokens = 0
    for i, text in enumerate(texts):
        n = count_tokens(text, EMBEDDING_MODEL)
        if batches[-1] and (len(batches[-1]) == batch_size or tokens + n > MAX_REQUEST_TOKENS):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += n
    return batches if batches[0] else []


def embed(
    lab: Any,
    texts: Sequence[str],
    model: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache: bool = True,
    progress: bool | None = None,
) -> np.ndarray:
    """Embed `texts` with `lab`'s client → float32 array (len(texts), dim), rows in input order.

    Repeated texts are embedded once; with `cache`, texts embedded before (same backend and model) cost no
    request. `progress`: True/False, or None for a progress bar when more than `PROGRESS_ABOVE` texts need
    a request. An empty list gives an array of shape (0, 0).

    >>> embed(lab, ["a cat", "a dog", "a cat"]).shape                  # doctest: +SKIP
    (3, 384)
    """
    texts = _check_texts(texts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = model or lab.embedding_model
    unique = list(dict.fromkeys(texts))
    store = embedding_cache() if cache else None
    keys = [EmbeddingCache.key(f"{lab.backend}/{model}", t) for t in unique] if store else []
    found = store.get(keys) if store else [None] * len(unique)
    missing = [j for j, v in enumerate(found) if v is None]
    if missing:
        from tqdm.auto import tqdm

        show = len(missing) > PROGRESS_ABOVE if progress is None else progress
        with tqdm(total=len(missing), desc="embed", unit="text", disable=not show) as bar:
            for part in _batches([unique[j] for j in missing], batch_size):
                part = [missing[i] for i in part]
                vectors = _request(lab, model, [unique[j] for j in part])
                if store:
                    store.put([keys[j] for j in part], vectors)
                for j, vector in zip(part, vectors, strict=True):
                    found[j] = vector
                bar.update(len(part))
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    dims = {v.shape[0] for v in found}
    if len(dims) > 1:
        raise RuntimeError(f"embeddings of different sizes {sorted(dims)} for model {model!r}")
    row_of = {text: j for j, text in enumerate(unique)}
    table = np.stack(found)
    return np.ascontiguousarray(table[[row_of[t] for t in texts]])


def clear_cache() -> None:
    """Delete every cached embedding (under the current ``LLMLAB_HOME``)."""
    embedding_cache().clear()


__all__ = ["EmbeddingCache", "clear_cache", "embed", "embedding_cache"]
