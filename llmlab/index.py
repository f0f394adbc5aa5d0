"""`VectorIndex`: exact (numpy) or approximate (hnswlib) nearest-neighbour search behind one API.

>>> import numpy as np
>>> from llmlab.index import VectorIndex
>>> index = VectorIndex(dim=3)                       # metric="cosine", backend="exact"
>>> index.add(np.eye(3), texts=["x", "y", "z"], metadata=[{"axis": a} for a in "xyz"])
['0', '1', '2']
>>> [hit.id for hit in index.search([1.0, 0.2, 0.0], k=2)]
['0', '1']
>>> index.search([1.0, 0.2, 0.0], k=3, where={"axis": {"$in": ["y", "z"]}}).ids
['1', '2']

Scores: for ``metric="cosine"`` and ``"ip"`` a hit's score is the similarity (higher is better); for
``"l2"`` it is the Euclidean distance (lower is better). Hits always come best first, and equal scores
come in insertion order. ``"cosine"`` stores unit-length copies of the vectors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmlab import jsontext
from llmlab.paths import remove_orphans

METRICS = ("cosine", "ip", "l2")
BACKENDS = ("exact", "hnsw")
HNSW_DEFAULTS = {"M": 16, "ef_construction": 200, "ef": 64}
FORMAT = "llmlab.VectorIndex"
FORMAT_VERSION = 1
# With a `where` filter, the hnsw backend searches the matching rows exactly when they are fewer than this
# fraction of the index: hnswlib's Python filter callback slows down as matches get rarer, while exact search
# over few rows is fast. At 100k x 384 (bench/results/index.json): callback 12 q/s at 0.1% allowed, 222 at
# 10%, 512 at 20%; exact over the matching rows 14,000 q/s at 0.1%, 265 at 10%, 117 at 20%.
FILTER_EXACT_BELOW = 0.15

_CHUNK = 32  # exact top-k: database rows per chunk whose maxima bound the k-th best score
_TILE_CELLS = 1 << 20  # exact search: scores per tile (4 MB), reduced to chunk maxima while still in cache
_LOWEST = np.finfo(np.float32).min
_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")


class IndexFormatError(ValueError):
    """A save directory that is missing, corrupted, foreign, or does not match what was asked for."""


def _copies(path: Path, kind: str) -> str:
    """A `remove_orphans` pattern for the copies that `save` writes ("tmp") or moves aside ("old") next to
    `path`: ``.<name>.tmp-<pid>-<random>`` and ``.<name>.old-<pid>-<thread>`` (older versions: no pid in tmp).
    """
    return rf"\.{re.escape(path.name)}\.{kind}-(?:(?P<pid>\d+)-)?\w+"


def _whole(value: Any) -> bool:
    """A count or label read from JSON: a non-negative int (not a bool)."""
    return type(value) is int and value >= 0


def _moved_aside(path: Path) -> Path | None:
    """The copy of a saved index that a save killed between its two moves left next to `path`, if any."""
    try:
        found = [p for p in path.parent.iterdir() if re.fullmatch(_copies(path, "old"), p.name)]
    except OSError:
        return None
    found = [p for p in found if (p / "manifest.json").is_file()]
    return max(found, key=lambda p: p.stat().st_ctime) if found else None  # ctime: when it was moved


class Metadata(dict):
    """An item's metadata as the index keeps it and hits show it: a dict that cannot be changed, so that every
    hit can share the index's own (``dict(hit.metadata)`` is a copy to change).

    >>> Metadata({"source": "a.md"})["page"] = 2
    Traceback (most recent call last):
    TypeError: metadata in an index is read-only: change a copy, dict(metadata), and upsert it
    """

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("metadata in an index is read-only: change a copy, dict(metadata), and upsert it")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple:  # copy and pickle without calling __setitem__
        return Metadata, (dict(self),)


class Hit(NamedTuple):
    """One search result; `metadata` is read-only."""

    id: str
    score: float
    text: str | None
    metadata: Metadata


class Record(NamedTuple):
    """One stored item, as returned by `VectorIndex.get`."""

    id: str
    vector: np.ndarray
    text: str | None
    metadata: dict


class SearchResults(list):
    """The hits for one query, best first; `.ids` and `.to_dataframe()` for display."""

    @property
    def ids(self) -> list[str]:
        return [hit.id for hit in self]

    def to_dataframe(self):
        """One row per hit: id, score, text, then one column per metadata key."""
        import pandas as pd

        rows = []
        for hit in self:
            row = {"id": hit.id, "score": hit.score, "text": hit.text}
            for key, value in hit.metadata.items():
                row[f"metadata.{key}" if key in ("id", "score", "text") else key] = value
            rows.append(row)
        return pd.DataFrame(rows, columns=None if rows else ["id", "score", "text"])


class _RWLock:
    """Many readers or one writer; a waiting writer keeps new readers out.

    `with lock.read():` / `with lock.write():`. Plain context-manager objects rather than `@contextmanager`
    generators: every search takes the read side, so its cost adds to each query.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # taken with its C-level `with`: cheaper than the Condition's
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._read = _Held(self._acquire_read, self._release_read)
        self._write = _Held(self._acquire_write, self._release_write)

    def read(self) -> _Held:
        return self._read

    def write(self) -> _Held:
        return self._write

    def _acquire_read(self) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._mutex:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:
        with self._mutex:
            self._writer = False
            self._cond.notify_all()


class _Held:
    """One side of an `_RWLock` as a context manager."""

    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()


def compile_where(where: dict) -> Callable[[dict], bool]:
    """Turn a Chroma-style filter into a predicate on a metadata dict.

    ``{"field": value}``, ``{"field": {"$eq|$ne|$gt|$gte|$lt|$lte|$in|$nin": v}}``, ``{"$and": [...]}``,
    ``{"$or": [...]}``; several fields in one dict must all match. A record without the field never matches.

    >>> compile_where({"$or": [{"year": {"$gte": 2024}}, {"team": "hr"}]})({"year": 2023, "team": "hr"})
    True
    """
    if not isinstance(where, dict) or not where:
        raise ValueError(f"a where filter must be a non-empty dict, got {where!r}")
    parts = []
    for key, cond in where.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise ValueError(f"{key} needs a non-empty list of filters, got {cond!r}")
            subs = [compile_where(c) for c in cond]
            combine = all if key == "$and" else any
            parts.append(lambda m, subs=subs, combine=combine: combine(s(m) for s in subs))
        elif key.startswith("$"):
            raise ValueError(f"unknown operator {key!r} at the top of a where filter: use $and or $or")
        elif isinstance(cond, dict):
            if len(cond) != 1:
                raise ValueError(f"give exactly one operator for field {key!r}, got {cond!r}")
            ((op, value),) = cond.items()
            parts.append(_field_test(key, op, value))
        else:
            parts.append(_field_test(key, "$eq", cond))
    return parts[0] if len(parts) == 1 else lambda m: all(p(m) for p in parts)


def _field_test(field: str, op: str, value: Any) -> Callable[[dict], bool]:
    if op not in _OPS:
        raise ValueError(f"unknown operator {op!r} for field {field!r}; known: {', '.join(_OPS)}")
    missing = object()
    if op in ("$in", "$nin"):
        if not isinstance(value, (list, tuple, set)):
            raise ValueError(f"{op} needs a list of values for field {field!r}, got {value!r}")
        values = list(value)
        if op == "$in":
            return lambda m: (v := m.get(field, missing)) is not missing and v in values
        return lambda m: (v := m.get(field, missing)) is not missing and v not in values
    if op == "$eq":
        return lambda m: (v := m.get(field, missing)) is not missing and v == value
    if op == "$ne":
        return lambda m: (v := m.get(field, missing)) is not missing and v != value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{op} compares numbers or strings; got {value!r} for field {field!r}")
    compare = {"$gt": float.__gt__, "$gte": float.__ge__, "$lt": float.__lt__, "$lte": float.__le__}[op]
    if isinstance(value, str):
        compare = {"$gt": str.__gt__, "$gte": str.__ge__, "$lt": str.__lt__, "$lte": str.__le__}[op]
        return lambda m: isinstance(v := m.get(field), str) and compare(v, value)
    value = float(value)
    return lambda m: (
        isinstance(v := m.get(field), (int, float)) and not isinstance(v, bool) and compare(float(v), value)
    )


def _exact_topk(
    q: np.ndarray, vecs: np.ndarray, k: int, sq: np.ndarray | None = None, blocked: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Columns (b, k) of the k best scores ``q @ vecs.T`` per query, best first, ties by lower column, and
    those scores. With ``sq`` (squared norms) the score is ``2 q.x - |x|^2`` (l2); ``blocked`` rows never
    appear, and at least k rows must not be blocked.

    No full sort and no (b, n) matrix: the database is scored in tiles of (w, b), and each tile's chunk maxima
    (of 32 rows) are taken while it is in cache. The smallest of the k largest chunk maxima seen so far is a
    threshold that at least k scores reach, so only scores reaching it are kept, and only those are sorted.

    >>> _exact_topk(np.eye(2, dtype=np.float32), np.array([[1, 0], [0, 1], [2, 0]], np.float32), k=2)[0]
    array([[2, 0],
           [1, 0]])
    """
    b, n = len(q), len(vecs)
    qt = np.ascontiguousarray(q.T)
    if n <= 8 * _CHUNK * k:  # small: score all and sort stably
        s = _score_tile(q, qt, vecs, sq, blocked, 0, np.empty((n, b), dtype=np.float32))
        top = np.argsort(-s, axis=0, kind="stable")[:k]
        return top.T, np.take_along_axis(s, top, axis=0).T
    w = -(-max(_TILE_CELLS // b, 2 * _CHUNK * k) // _CHUNK) * _CHUNK  # a multiple of _CHUNK, >= 2k chunks
    tile = np.empty((min(w, -(-n // _CHUNK) * _CHUNK), b), dtype=np.float32)
    top = np.full((k, b), -np.inf, dtype=np.float32)  # the k largest chunk maxima so far, per query
    threshold = np.full(b, _LOWEST, dtype=np.float32)  # the smallest of those: blocked scores never pass
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    flat_tile, strides = tile.reshape(-1), np.arange(_CHUNK) * b  # a chunk's scores for one query, flat
    for start in range(0, n, w):
        m = min(w, n - start)
        _score_tile(q, qt, vecs, sq, blocked, start, tile[:m])
        c = -(-m // _CHUNK)
        tile[m : c * _CHUNK] = -np.inf  # pad the last chunk
        maxima = tile[: c * _CHUNK].reshape(c, _CHUNK, b).max(axis=1)  # (c, b)
        changed = np.flatnonzero((maxima >= threshold).any(axis=0))  # queries whose k largest maxima change
        top[:, changed] = np.partition(np.concatenate([top[:, changed], maxima[:, changed]]), c, axis=0)[c:]
        threshold[changed] = np.maximum(top[:, changed].min(axis=0), _LOWEST)
        chunks, queries = np.nonzero(maxima >= threshold)  # the chunks that may hold a top-k score
        values = flat_tile[(chunks * (_CHUNK * b) + queries)[:, None] + strides]  # (chunks, _CHUNK) scores
        hot, offset = np.nonzero(values >= threshold[queries, None])
        kept.append((queries[hot], start + chunks[hot] * _CHUNK + offset, values[hot, offset]))
    queries, cols, values = (np.concatenate(part) for part in zip(*kept, strict=True))
    passed = values >= threshold[queries]  # the final threshold
    queries, cols, values = queries[passed], cols[passed], values[passed]
    order = np.lexsort((cols, -values, queries))
    starts = np.zeros(b, dtype=np.int64)
    np.cumsum(np.bincount(queries, minlength=b)[:-1], out=starts[1:])
    pick = order[starts[:, None] + np.arange(k)]
    return cols[pick], values[pick]


def _score_tile(
    q: np.ndarray,
    qt: np.ndarray,
    vecs: np.ndarray,
    sq: np.ndarray | None,
    blocked: np.ndarray | None,
    start: int,
    out: np.ndarray,
) -> np.ndarray:
    """Scores (m, b) of database rows start..start+m against the queries (``qt`` is ``q.T``), into `out`."""
    stop = start + len(out)
    if len(q) == 1:
        np.matmul(vecs[start:stop], q[0], out=out[:, 0])  # matrix-vector is faster for one
    else:
        np.matmul(vecs[start:stop], qt, out=out)
    if sq is not None:  # rank by 2 q.x - |x|^2, i.e. by -|q - x|^2 + |q|^2
        out *= 2
        out -= sq[start:stop, None]
    if blocked is not None:
        out[blocked[start:stop]] = -np.inf
    return out


class VectorIndex:
    """Vectors with ids, texts and metadata; top-k search with `where` filters; save/load.

    ``backend="exact"`` scores every vector with numpy (exact, deterministic); ``backend="hnsw"`` uses an
    hnswlib graph (approximate, fast on large indexes; ``M``, ``ef_construction`` and ``ef`` can be given,
    defaults `HNSW_DEFAULTS`). Safe to use from several threads: searches run in parallel, writes alone.

    >>> index = VectorIndex(2, metric="l2")
    >>> index.add([[0, 0], [3, 4]], ids=["origin", "far"])
    ['origin', 'far']
    >>> index.search([0, 0], k=2).to_dataframe()[["id", "score"]].values.tolist()
    [['origin', 0.0], ['far', 5.0]]
    """

    def __init__(self, dim: int, metric: str = "cosine", backend: str = "exact", **hnsw_params: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        unknown = set(hnsw_params) - set(HNSW_DEFAULTS)
        if unknown or (hnsw_params and backend != "hnsw"):
            raise ValueError(
                f"unexpected parameters {sorted(hnsw_params)}: only backend='hnsw' takes {sorted(HNSW_DEFAULTS)}"
            )
        self.dim, self.metric, self.backend = int(dim), metric, backend
        self.params = {**HNSW_DEFAULTS, **hnsw_params} if backend == "hnsw" else {}
        self._lock = _RWLock()
        self._vecs = np.zeros((0, self.dim), dtype=np.float32)
        self._sq = np.zeros(0, dtype=np.float32)  # squared norms, for l2
        self._n = 0
        self._ids: list[str] = []
        self._texts: list[str | None] = []
        self._meta: list[dict] = []
        self._row: dict[str, int] = {}
        self._auto = 0
        self._matches: dict[str, tuple] = {}  # rows matching each recent `where`; cleared on writes
        self.version = 0  # goes up on every add, upsert and delete, so that views can tell the index changed
        if backend == "hnsw":
            self._init_hnsw()

    # ---- construction helpers -------------------------------------------------------------------
    def _init_hnsw(self, graph: Any = None, next_label: int = 0, labels: np.ndarray | None = None) -> None:
        import hnswlib

        if graph is None:
            graph = hnswlib.Index(space="l2" if self.metric == "l2" else "ip", dim=self.dim)
            graph.init_index(
                max_elements=1024, M=self.params["M"], ef_construction=self.params["ef_construction"]
            )
        self._graph = graph
        self._graph.set_ef(self.params["ef"])
        self._next_label = next_label
        self._labels = np.zeros(len(self._vecs), dtype=np.int64) if labels is None else labels
        self._row_of_label = np.full(graph.get_max_elements(), -1, dtype=np.int64)
        self._row_of_label[self._labels[: self._n]] = np.arange(self._n)
        self._label_is_row = np.array_equal(self._labels[: self._n], np.arange(self._n))  # saves a lookup

    @property
    def ef(self) -> int:
        """hnsw search breadth (recall vs speed); a search uses max(ef, k)."""
        return self.params["ef"]

    @ef.setter
    def ef(self, value: int) -> None:
        if self.backend != "hnsw":
            raise ValueError("ef only applies to backend='hnsw'")
        if value < 1:
            raise ValueError(f"ef must be >= 1, got {value}")
        with self._lock.write():
            self.params["ef"] = int(value)
            self._graph.set_ef(int(value))

    def __len__(self) -> int:
        return self._n

    def __contains__(self, id: object) -> bool:
        return id in self._row

    def __repr__(self) -> str:
        extra = f", {self.params}" if self.params else ""
        return f"VectorIndex(dim={self.dim}, metric={self.metric!r}, backend={self.backend!r}{extra}, n={self._n})"

    @property
    def ids(self) -> list[str]:
        """All ids, in insertion order."""
        return list(self._ids)

    # ---- input checks ---------------------------------------------------------------------------
    def _check_vectors(self, vectors: Any, what: str = "vectors") -> np.ndarray:
        try:
            x = np.array(vectors, dtype=np.float32, ndmin=2)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must be numbers of shape (n, {self.dim}): {e}") from None
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have dimension {self.dim}, got shape {np.shape(vectors)}")
        squares = float(np.vdot(x, x))  # one pass; not finite if any entry is not (or if it overflows)
        if not math.isfinite(squares):
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            if len(bad):
                raise ValueError(f"{what} contain NaN or inf (rows {bad[:5].tolist()})")
        if self.metric == "cosine" and len(x) == 1 and 0 < squares < math.inf:
            x /= math.sqrt(squares)  # one query: its norm is already known
        elif self.metric == "cosine":
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            if not norms.all():
                raise ValueError(
                    f"{what}: zero vectors have no direction (rows {np.flatnonzero(norms == 0)[:5].tolist()})"
                )
            x /= norms[:, None]
        return x

    @staticmethod
    def _check_ids(ids: Any, n: int) -> list[str]:
        if isinstance(ids, (str, int)):
            ids = [ids]
        ids = [str(i) if isinstance(i, (int, np.integer)) and not isinstance(i, bool) else i for i in ids]
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} vectors")
        if not all(isinstance(i, str) for i in ids):
            raise TypeError(
                f"ids must be strings, got {[type(i).__name__ for i in ids if not isinstance(i, str)][:3]}"
            )
        if len(set(ids)) != n:
            seen: set[str] = set()
            dups = [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(f"duplicate ids in one call: {dups[:5]}")
        return ids

    @staticmethod
    def _check_texts(texts: Any, n: int) -> list[str | None]:
        if texts is None:
            return [None] * n
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) != n or not all(t is None or isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be {n} strings (or None), got {texts!r:.200}")
        return texts

    @staticmethod
    def _check_metadata(metadata: Any, n: int) -> list[Metadata]:
        if metadata is None:
            return [Metadata() for _ in range(n)]
        metadata = [metadata] if isinstance(metadata, dict) else list(metadata)
        if len(metadata) != n:
            raise ValueError(f"got {len(metadata)} metadata dicts for {n} vectors")
        out = []
        for i, m in enumerate(metadata):
            m = {} if m is None else m
            if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
                raise ValueError(f"metadata[{i}] must be a dict with string keys, got {m!r:.200}")
            try:
                text = json.dumps(m, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata[{i}] must be JSON-serializable: {e}") from None
            out.append(Metadata(json.loads(text)))  # a deep copy, as save + load would make it
        return out

    def _check_queries(self, query_vectors: Any) -> tuple[np.ndarray, bool]:
        single = np.ndim(query_vectors) == 1
        return self._check_vectors(query_vectors, "query vectors"), single

    # ---- writes ---------------------------------------------------------------------------------
    def add(
        self,
        vectors: Any,
        ids: Sequence[str] | None = None,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[str]:
        """Add vectors (n, dim); returns their ids (default "0", "1", ...). An id already present is an error.

        Nothing is added when any input is invalid.
        """
        x = self._check_vectors(vectors)
        n = len(x)
        given = None if ids is None else self._check_ids(ids, n)
        texts = self._check_texts(texts, n)
        metas = self._check_metadata(metadata, n)
        with self._lock.write():
            if given is None:
                given, auto = [], self._auto
                while len(given) < n:
                    if str(auto) not in self._row:
                        given.append(str(auto))
                    auto += 1
                self._auto = auto
            taken = [i for i in given if i in self._row]
            if taken:
                raise ValueError(f"ids already in the index: {taken[:5]} (use upsert() to replace them)")
            self._append(x, given, texts, metas)
        return list(given)

    def upsert(
        self,
        vectors: Any,
        ids: Sequence[str],
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> None:
        """Add new ids and replace existing ones (vector, text and metadata), keeping their position."""
        x = self._check_vectors(vectors)
        n = len(x)
        ids = self._check_ids(ids, n)
        texts = self._check_texts(texts, n)
        metas = self._check_metadata(metadata, n)
        with self._lock.write():
            old = [j for j, i in enumerate(ids) if i in self._row]
            if old:
                rows = np.array([self._row[ids[j]] for j in old])
                self._vecs[rows] = x[old]
                self._sq[rows] = np.einsum("ij,ij->i", x[old], x[old])
                for j, r in zip(old, rows.tolist(), strict=True):
                    self._texts[r], self._meta[r] = texts[j], metas[j]
                self._matches.clear()
                if self.backend == "hnsw":
                    for label in self._labels[rows].tolist():
                        self._graph.mark_deleted(label)
                    self._row_of_label[self._labels[rows]] = -1
                    self._labels[rows] = self._graph_add(x[old], rows)
                self.version += 1
            new = [j for j, i in enumerate(ids) if i not in self._row]
            if new:
                self._append(x[new], [ids[j] for j in new], [texts[j] for j in new], [metas[j] for j in new])

    def delete(self, ids: str | Sequence[str]) -> None:
        """Remove these ids; unknown ids are an error and nothing is removed."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        with self._lock.write():
            missing = [i for i in ids if i not in self._row]
            if missing:
                raise KeyError(f"ids not in the index: {missing[:5]}")
            keep = np.ones(self._n, dtype=bool)
            keep[[self._row[i] for i in ids]] = False
            m = int(keep.sum())
            self._vecs[:m] = self._vecs[: self._n][keep]
            self._sq[:m] = self._sq[: self._n][keep]
            kept = np.flatnonzero(keep).tolist()
            self._ids = [self._ids[r] for r in kept]
            self._texts = [self._texts[r] for r in kept]
            self._meta = [self._meta[r] for r in kept]
            self._row = {i: r for r, i in enumerate(self._ids)}
            if self.backend == "hnsw":
                gone = self._labels[: self._n][~keep]
                for label in gone.tolist():
                    self._graph.mark_deleted(label)
                self._row_of_label[gone] = -1
                self._labels[:m] = self._labels[: self._n][keep]
                self._row_of_label[self._labels[:m]] = np.arange(m)
                self._label_is_row = np.array_equal(self._labels[:m], np.arange(m))
            self._n = m
            self._matches.clear()
            self.version += 1

    def _append(self, x: np.ndarray, ids: list[str], texts: list, metas: list[dict]) -> None:
        n0, n = self._n, len(x)
        if not n:  # nothing to add (hnswlib fails on an empty batch)
            return
        if n0 + n > len(self._vecs):
            cap = max(n0 + n, 2 * len(self._vecs), 64)
            vecs = np.zeros((cap, self.dim), dtype=np.float32)
            vecs[:n0] = self._vecs[:n0]
            sq = np.zeros(cap, dtype=np.float32)
            sq[:n0] = self._sq[:n0]
            self._vecs, self._sq = vecs, sq
            if self.backend == "hnsw":
                labels = np.zeros(cap, dtype=np.int64)
                labels[:n0] = self._labels[:n0]
                self._labels = labels
        if self.backend == "hnsw":
            self._labels[n0 : n0 + n] = self._graph_add(x, np.arange(n0, n0 + n))
        self._vecs[n0 : n0 + n] = x
        self._sq[n0 : n0 + n] = np.einsum("ij,ij->i", x, x)
        self._ids += ids
        self._texts += texts
        self._meta += metas
        self._row.update((i, n0 + j) for j, i in enumerate(ids))
        self._n = n0 + n
        self._matches.clear()
        self.version += 1

    def _graph_add(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Insert into the hnsw graph under fresh labels (growing its capacity); returns the labels."""
        labels = np.arange(self._next_label, self._next_label + len(x), dtype=np.int64)
        need = self._next_label + len(x)
        if need > self._graph.get_max_elements():
            cap = max(need, 2 * self._graph.get_max_elements())
            self._graph.resize_index(cap)
            grown = np.full(cap, -1, dtype=np.int64)
            grown[: len(self._row_of_label)] = self._row_of_label
            self._row_of_label = grown
        self._graph.add_items(x, labels)
        self._row_of_label[labels] = rows
        self._label_is_row = self._label_is_row and np.array_equal(labels, rows)
        self._next_label = need
        return labels

    # ---- reads ----------------------------------------------------------------------------------
    def get(self, ids: str | Sequence[str]) -> Record | list[Record]:
        """The stored record(s) for one id or a list of ids (vectors are copies)."""
        one = isinstance(ids, str)
        wanted = [ids] if one else list(ids)
        with self._lock.read():
            missing = [i for i in wanted if i not in self._row]
            if missing:
                raise KeyError(f"ids not in the index: {missing[:5]}")
            out = [
                Record(i, self._vecs[r].copy(), self._texts[r], dict(self._meta[r]))
                for i, r in ((i, self._row[i]) for i in wanted)
            ]
        return out[0] if one else out

    def search(
        self, query_vectors: Any, k: int = 3, where: dict | None = None
    ) -> SearchResults | list[SearchResults]:
        """The k best hits for one query vector, or a list of those for a 2-D batch of queries.

        Returns fewer than k hits when fewer items (matching `where`) exist; none on an empty index.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q, single = self._check_queries(query_vectors)
        match = None if where is None else compile_where(where)
        key = None if where is None else json.dumps(where, sort_keys=True, default=repr)
        with self._lock.read():
            rows, allowed = (None, None) if match is None else self._matching(key, match)
            count = self._n if rows is None else len(rows)
            if count == 0:
                found = scores = [[] for _ in q]
            elif self.backend == "exact" or (rows is not None and count < FILTER_EXACT_BELOW * self._n):
                found, scores = self._exact(q, min(k, count), rows)
            else:
                found, scores = self._approx(q, min(k, count), rows, allowed)
            ids, texts, meta = self._ids, self._texts, self._meta
            new = tuple.__new__  # Hit without a Python frame per hit (namedtuple's own __new__ is Python)
            results = []
            for rs, ss in zip(found, scores, strict=True):
                results.append(
                    SearchResults(
                        [new(Hit, (ids[r], s, texts[r], meta[r])) for r, s in zip(rs, ss, strict=True)]
                    )
                )
        return results[0] if single else results

    def _matching(
        self, key: str, match: Callable[[dict], bool]
    ) -> tuple[np.ndarray, Callable[[int], bool] | None]:
        """Rows whose metadata match, and (hnsw) a label filter for hnswlib; cached until the next write."""
        found = self._matches.get(key)
        if found is None:
            rows = np.flatnonzero([match(m) for m in self._meta[: self._n]])
            labels = set(self._labels[rows].tolist()) if self.backend == "hnsw" else None
            found = rows, None if labels is None else labels.__contains__
            if len(self._matches) >= 64:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[list, list]:
        """`_exact_topk` over all rows or `rows`; returns (rows, scores): k of each per query, as lists."""
        # A broad filter scores all rows and blocks the others; a narrow one copies the matching rows first. For
        # one query, copying a fifth of the rows costs as much as scoring all (at 100k x 384: 133 vs 137 queries/s);
        # a batch shares the copy.
        full = rows is None or len(rows) * (5 if len(q) == 1 else 3) > self._n
        if full:
            vecs, sq = self._vecs[: self._n], self._sq[: self._n]
        else:
            vecs, sq = self._vecs[rows], self._sq[rows]
        blocked = None
        if rows is not None and full:
            blocked = np.ones(self._n, dtype=bool)
            blocked[rows] = False
        sq = sq if self.metric == "l2" else None
        block = min(1024, max(1, _TILE_CELLS // (2 * _CHUNK * k)))  # queries per call: tiles stay ~4 MB
        found = np.empty((len(q), k), dtype=np.int64)
        best = np.empty((len(q), k), dtype=np.float32)
        for start in range(0, len(q), block):
            found[start : start + block], best[start : start + block] = _exact_topk(
                q[start : start + block], vecs, k, sq, blocked
            )
        if self.metric == "l2":
            best = np.sqrt(np.maximum(np.einsum("ij,ij->i", q, q)[:, None] - best, 0))
        return (found if full else rows[found]).tolist(), best.tolist()

    def _approx(
        self, q: np.ndarray, k: int, rows: np.ndarray | None, allowed: Callable[[int], bool] | None = None
    ) -> tuple[list, list]:
        """hnswlib search (`allowed(label)` filters), as `_exact`; exact over `rows` if hnswlib cannot find k.

        Few numpy calls: after a walk through a large graph each one costs several microseconds.
        """
        try:
            labels, dist = self._graph.knn_query(q, k=k, filter=allowed, num_threads=1 if len(q) == 1 else -1)
        except RuntimeError:  # "Cannot return the results in a contiguous 2D array": too few reachable
            return self._exact(q, k, rows)
        found = (labels if self._label_is_row else self._row_of_label[labels]).tolist()
        if self.metric == "l2":
            scores = [[math.sqrt(max(d, 0.0)) for d in ds] for ds in dist.tolist()]
        else:
            scores = [[1.0 - d for d in ds] for ds in dist.tolist()]
        sign = 1 if self.metric == "l2" else -1  # best first
        for i, ss in enumerate(scores):
            if len(set(ss)) < len(ss):  # equal scores: put them in insertion order
                pairs = sorted(zip(ss, found[i], strict=True), key=lambda p: (sign * p[0], p[1]))
                scores[i], found[i] = [p[0] for p in pairs], [p[1] for p in pairs]
        return found, scores

    def recall(self, other: VectorIndex, queries: Any, k: int = 10) -> float:
        """Fraction of `other`'s top-k ids (the reference, e.g. an exact index) that this index finds too.

        >>> # approx.recall(exact, queries, k=10) -> 0.98
        """
        q = np.array(queries, dtype=np.float32, ndmin=2)
        mine, truth = self.search(q, k=k), other.search(q, k=k)
        total = sum(len(t) for t in truth)
        if not total:
            raise ValueError("the reference index returned no hits: recall is undefined")
        return sum(len(set(m.ids) & set(t.ids)) for m, t in zip(mine, truth, strict=True)) / total

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to directory `path`, replacing a saved index there.

        Killed at any moment, it leaves the old index or the new one: the new copy is written next to `path`,
        then the old one is moved aside and the new one moved in; `load` finds the old copy if a kill came
        between the two moves. Copies that killed saves left behind are deleted by the next save.
        """
        path = Path(path)
        if (
            path.exists()
            and not (path / "manifest.json").is_file()
            and (not path.is_dir() or any(path.iterdir()))
        ):
            raise IndexFormatError(f"{path} exists and is not a saved VectorIndex: refusing to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path.parent, _copies(path, "tmp"))
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
        try:
            with self._lock.read():
                n = self._n
                manifest = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "dim": self.dim,
                    "metric": self.metric,
                    "backend": self.backend,
                    "params": self.params,
                    "count": n,
                    "next_auto_id": self._auto,
                }
                records: dict[str, Any] = {"ids": self._ids, "texts": self._texts, "metadata": self._meta}
                np.save(tmp / "vectors.npy", self._vecs[:n], allow_pickle=False)
                if self.backend == "hnsw":
                    records["labels"] = self._labels[:n].tolist()
                    manifest["hnsw_elements"] = self._next_label
                    self._graph.save_index(str(tmp / "hnsw.bin"))
                (tmp / "records.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            remove_orphans(path.parent, _copies(path, "old"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, dim: int | None = None, metric: str | None = None
    ) -> VectorIndex:
        """Read a directory written by `save`; `dim`/`metric`, when given, must match what was saved.

        If a save was killed after moving the old copy aside, that copy is loaded (with a warning).
        """
        path = Path(path)
        if not path.is_dir():
            aside = _moved_aside(path)
            if aside is None:
                raise IndexFormatError(f"no saved VectorIndex at {path}: not a directory")
            warnings.warn(
                f"{path} is missing: loading the copy that an interrupted save left in {aside.name} "
                "(save the index again to put it back in place)",
                stacklevel=2,
            )
            path = aside
        try:
            manifest = jsontext.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexFormatError(f"{path} is not a saved VectorIndex: it has no manifest.json") from None
        except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
            raise IndexFormatError(f"{path}/manifest.json is corrupted: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexFormatError(f"{path} is not a saved VectorIndex (manifest format is not {FORMAT!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path} was saved in format version {manifest.get('version')!r}; this llmlab reads version {FORMAT_VERSION}"
            )
        for key, want in (("dim", dim), ("metric", metric)):
            if want is not None and manifest.get(key) != want:
                raise IndexFormatError(f"{path} holds {key}={manifest.get(key)!r}, expected {key}={want!r}")
        n, auto = manifest.get("count"), manifest.get("next_auto_id", 0)
        if not (_whole(n) and _whole(auto)):
            raise IndexFormatError(
                f"{path}/manifest.json is corrupted: count and next_auto_id must be whole numbers"
            )
        try:
            index = cls(manifest["dim"], manifest["metric"], manifest["backend"], **manifest["params"])
            vecs = np.load(path / "vectors.npy", allow_pickle=False)
            records = jsontext.loads((path / "records.json").read_text(encoding="utf-8"))
            ids, texts, metas = records["ids"], records["texts"], records["metadata"]
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{path} is corrupted: {type(e).__name__}: {e}") from None
        if vecs.dtype != np.float32 or vecs.shape != (n, index.dim) or not np.isfinite(vecs).all():
            raise IndexFormatError(
                f"{path}/vectors.npy is corrupted: expected finite float32 ({n}, {index.dim}), got {vecs.dtype} {vecs.shape}"
            )
        if not (
            all(type(column) is list and len(column) == n for column in (ids, texts, metas))
            and all(type(i) is str for i in ids)
            and len(set(ids)) == n
            and all(t is None or type(t) is str for t in texts)
            and all(type(m) is dict for m in metas)
        ):
            raise IndexFormatError(
                f"{path}/records.json is corrupted: it does not hold {n} records with distinct string ids, "
                "string or null texts, and metadata objects"
            )
        index._vecs, index._n = np.ascontiguousarray(vecs), n
        index._sq = np.einsum("ij,ij->i", vecs, vecs).astype(np.float32)
        index._ids, index._texts, index._meta = ids, texts, [Metadata(m) for m in metas]
        index._row = {i: r for r, i in enumerate(ids)}
        index._auto = auto
        if index.backend == "hnsw":
            index._load_graph(path, manifest, records)
        return index

    def _load_graph(self, path: Path, manifest: dict, records: dict) -> None:
        import hnswlib

        elements, labels = manifest.get("hnsw_elements"), records.get("labels")
        if not (
            _whole(elements)
            and type(labels) is list
            and len(labels) == self._n
            and all(_whole(label) and label < elements for label in labels)
            and len(set(labels)) == self._n
        ):
            raise IndexFormatError(f"{path} is corrupted: hnsw labels are missing or wrong")
        labels = np.array(labels, dtype=np.int64)
        graph = hnswlib.Index(space="l2" if self.metric == "l2" else "ip", dim=self.dim)
        try:  # max_elements=0: the capacity saved in the file
            graph.load_index(str(path / "hnsw.bin"), max_elements=0)
        except (RuntimeError, MemoryError) as e:
            raise IndexFormatError(f"{path}/hnsw.bin cannot be read: {e}") from None
        # hnswlib's file stores neither dimension nor space: check the element count and one stored vector.
        ok = graph.element_count == elements
        if ok and self._n:
            ok = np.allclose(np.asarray(graph.get_items(labels[:1]), dtype=np.float32)[0], self._vecs[0])
        if not ok:
            raise IndexFormatError(f"{path}/hnsw.bin does not match vectors.npy (another index's file?)")
        self._init_hnsw(graph, elements, labels)
