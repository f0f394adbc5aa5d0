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

`VectorIndex` keeps the ids, texts and metadata, checks every input and guards every call with a read-write
lock (`llmlab.rwlock`); the vectors and the search belong to its backend, one object behind the small
`SearchBackend` interface: `ExactBackend` (`llmlab.index_exact`, on the kernel of `llmlab.topk`) or
`HnswBackend` (`llmlab.index_hnsw`). `llmlab.where` compiles the filters; `llmlab.index_files` writes and
reads the save folder.

Its length (~460 lines) is one class that notebook 04 teaches, read top to bottom; what is not that class
(backends, kernel, filters, files, lock) already lives in the modules named above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from llmlab.index_exact import ExactBackend
from llmlab.index_files import (
    FORMAT,
    FORMAT_VERSION,
    IndexFormatError,
    read_manifest,
    read_records,
    write_folder,
)
from llmlab.index_hnsw import HNSW_DEFAULTS, HnswBackend
from llmlab.index_inputs import Metadata, check_ids, check_metadata, check_texts, check_vectors
from llmlab.rwlock import RWLock
from llmlab.where import compile_where

__all__ = [
    "BACKENDS",
    "HNSW_DEFAULTS",
    "METRICS",
    "Hit",
    "IndexFormatError",
    "Metadata",
    "Record",
    "SearchBackend",
    "SearchResults",
    "VectorIndex",
    "compile_where",
]

METRICS = ("cosine", "ip", "l2")
_BACKENDS: dict[str, Callable[..., SearchBackend]] = {"exact": ExactBackend, "hnsw": HnswBackend}
BACKENDS = tuple(_BACKENDS)


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
        return _frame(
            ["id", "score", "text"], [(h.id, h.score, h.text) for h in self], [h.metadata for h in self]
        )


def _frame(columns: list[str], values: Sequence[tuple], metas: Sequence[dict]):
    """A DataFrame: `columns` filled from `values`, then one column per metadata key (``metadata.<key>`` when
    the key is one of `columns`); a row without a key has NaN there."""
    import pandas as pd

    rows = []
    for row_values, meta in zip(values, metas, strict=True):
        row = dict(zip(columns, row_values, strict=True))
        for key, value in meta.items():
            row[f"metadata.{key}" if key in columns else key] = value
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else columns)


class SearchBackend(Protocol):
    """What `VectorIndex` asks of a backend. The backend keeps the vectors by row (row r is the r-th item in
    insertion order, as in the index's lists of ids, texts and metadata); the index calls it under its lock."""

    name: str  # "exact" or "hnsw"
    params: dict[str, int]  # its own parameters, saved in the manifest
    n: int  # the number of rows

    def vectors(self) -> np.ndarray:
        """The stored vectors (n, dim), a view."""
        ...

    def add(self, x: np.ndarray) -> None:
        """Append `x` (checked, at least one row) as rows n, n+1, ..."""
        ...

    def replace(self, rows: np.ndarray, x: np.ndarray) -> None:
        """New vectors for existing rows."""
        ...

    def delete(self, keep: np.ndarray) -> None:
        """Keep the rows where the boolean mask `keep` is true, in their order."""
        ...

    def subset(self, rows: np.ndarray) -> Any:
        """What `search` takes to search only `rows` (built once per filter, until the next write)."""
        ...

    def search(self, q: np.ndarray, k: int, subset: Any = None) -> tuple[list, list]:
        """The k best rows per query (k no more than the rows searched) and their scores, as lists; best first,
        equal scores in row order."""
        ...

    def save(self, folder: Path, manifest: dict, records: dict) -> None:
        """Write its own files into `folder` and its own entries into the manifest and records."""
        ...

    def restore(self, folder: Path, manifest: dict, records: dict, vectors: np.ndarray) -> None:
        """Take the state `save` wrote (an `IndexFormatError` when it does not fit)."""
        ...


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
        self._backend: SearchBackend = _BACKENDS[backend](self.dim, metric, **hnsw_params)
        self._lock = RWLock()
        self._ids: list[str] = []
        self._texts: list[str | None] = []
        self._meta: list[dict] = []
        self._row: dict[str, int] = {}
        self._auto = 0
        self._matches: dict[str, tuple] = {}  # rows matching each recent `where`; cleared on writes
        self.version = 0  # goes up on every add, upsert and delete, so that views can tell the index changed

    @property
    def params(self) -> dict[str, int]:
        """The backend's parameters (hnsw: M, ef_construction, ef; exact: none)."""
        return self._backend.params

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
            self._backend.set_ef(int(value))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id: object) -> bool:
        return id in self._row

    def __repr__(self) -> str:
        extra = f", {self.params}" if self.params else ""
        return f"VectorIndex(dim={self.dim}, metric={self.metric!r}, backend={self.backend!r}{extra}, n={len(self)})"

    @property
    def ids(self) -> list[str]:
        """All ids, in insertion order."""
        return list(self._ids)

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
        x = check_vectors(vectors, self.dim, self.metric)
        n = len(x)
        given = None if ids is None else check_ids(ids, n)
        texts = check_texts(texts, n)
        metas = check_metadata(metadata, n)
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
        x = check_vectors(vectors, self.dim, self.metric)
        n = len(x)
        ids = check_ids(ids, n)
        texts = check_texts(texts, n)
        metas = check_metadata(metadata, n)
        with self._lock.write():
            old = [j for j, i in enumerate(ids) if i in self._row]
            if old:
                rows = np.array([self._row[ids[j]] for j in old])
                self._backend.replace(rows, x[old])
                for j, r in zip(old, rows.tolist(), strict=True):
                    self._texts[r], self._meta[r] = texts[j], metas[j]
                self._matches.clear()
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
            keep = np.ones(len(self._ids), dtype=bool)
            keep[[self._row[i] for i in ids]] = False
            self._backend.delete(keep)
            kept = np.flatnonzero(keep).tolist()
            self._ids = [self._ids[r] for r in kept]
            self._texts = [self._texts[r] for r in kept]
            self._meta = [self._meta[r] for r in kept]
            self._row = {i: r for r, i in enumerate(self._ids)}
            self._matches.clear()
            self.version += 1

    def _append(self, x: np.ndarray, ids: list[str], texts: list, metas: list[dict]) -> None:
        if not len(x):  # nothing to add (hnswlib fails on an empty batch)
            return
        n0 = len(self._ids)
        self._backend.add(x)
        self._ids += ids
        self._texts += texts
        self._meta += metas
        self._row.update((i, n0 + j) for j, i in enumerate(ids))
        self._matches.clear()
        self.version += 1

    # ---- reads ----------------------------------------------------------------------------------
    def get(self, ids: str | Sequence[str]) -> Record | list[Record]:
        """The stored record(s) for one id or a list of ids (vectors are copies)."""
        one = isinstance(ids, str)
        wanted = [ids] if one else list(ids)
        with self._lock.read():
            missing = [i for i in wanted if i not in self._row]
            if missing:
                raise KeyError(f"ids not in the index: {missing[:5]}")
            vecs = self._backend.vectors()
            out = [
                Record(i, vecs[r].copy(), self._texts[r], dict(self._meta[r]))
                for i, r in ((i, self._row[i]) for i in wanted)
            ]
        return out[0] if one else out

    def records(self) -> list[Record]:
        """Every item in insertion order, as `get` returns them: a snapshot taken at once (the vectors are rows
        of one copy of the index's vectors; the metadata dicts are copies).

        >>> index = VectorIndex(2)
        >>> index.add([[3, 4]], ids=["a"], texts=["A"], metadata=[{"page": 1}])
        ['a']
        >>> index.records()
        [Record(id='a', vector=array([0.6, 0.8], dtype=float32), text='A', metadata={'page': 1})]
        """
        with self._lock.read():
            vecs = self._backend.vectors().copy()
            return [
                Record(i, v, t, dict(m))
                for i, v, t, m in zip(self._ids, vecs, self._texts, self._meta, strict=True)
            ]

    def to_dataframe(self):
        """One row per item in insertion order: id, text, one column per metadata key, then the vector.

        >>> index = VectorIndex(2)
        >>> index.add([[1, 0], [0, 1]], texts=["x", "y"], metadata=[{"axis": "x"}, {}])
        ['0', '1']
        >>> index.to_dataframe()[["id", "text", "axis"]].values.tolist()
        [['0', 'x', 'x'], ['1', 'y', nan]]
        """
        records = self.records()
        values = [(r.id, r.text, r.vector) for r in records]
        frame = _frame(["id", "text", "vector"], values, [r.metadata for r in records])
        frame["vector"] = frame.pop("vector")  # last: the widest column
        return frame

    def search(
        self, query_vectors: Any, k: int = 3, where: dict | None = None
    ) -> SearchResults | list[SearchResults]:
        """The k best hits for one query vector, or a list of those for a 2-D batch of queries.

        Returns fewer than k hits when fewer items (matching `where`) exist; none on an empty index.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q, single = (
            check_vectors(query_vectors, self.dim, self.metric, "query vectors"),
            np.ndim(query_vectors) == 1,
        )
        match = None if where is None else compile_where(where)
        key = None if where is None else json.dumps(where, sort_keys=True, default=repr)
        with self._lock.read():
            rows, subset = (None, None) if match is None else self._matching(key, match)
            count = len(self._ids) if rows is None else len(rows)
            if count == 0:
                found = scores = [[] for _ in q]
            else:
                found, scores = self._backend.search(q, min(k, count), subset)
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

    def _matching(self, key: str, match: Callable[[dict], bool]) -> tuple[np.ndarray, Any]:
        """Rows whose metadata match, and the backend's subset of them; cached until the next write."""
        found = self._matches.get(key)
        if found is None:
            rows = np.flatnonzero([match(m) for m in self._meta])
            found = rows, self._backend.subset(rows)
            if len(self._matches) >= 64:
                self._matches.clear()
            self._matches[key] = found
        return found

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

        Killed at any moment, it leaves the old index or the new one (`llmlab.index_files.write_folder`).
        """

        def write(tmp: Path) -> None:
            with self._lock.read():
                manifest = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "dim": self.dim,
                    "metric": self.metric,
                    "backend": self.backend,
                    "params": self.params,
                    "count": len(self._ids),
                    "next_auto_id": self._auto,
                }
                records: dict[str, Any] = {"ids": self._ids, "texts": self._texts, "metadata": self._meta}
                np.save(tmp / "vectors.npy", self._backend.vectors(), allow_pickle=False)
                self._backend.save(tmp, manifest, records)
                (tmp / "records.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")

        return write_folder(path, write)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, dim: int | None = None, metric: str | None = None
    ) -> VectorIndex:
        """Read a directory written by `save`; `dim`/`metric`, when given, must match what was saved.

        If a save was killed after moving the old copy aside, that copy is loaded (with a warning).
        """
        path, manifest = read_manifest(path, dim, metric)
        try:
            index = cls(manifest["dim"], manifest["metric"], manifest["backend"], **manifest["params"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{path} is corrupted: {type(e).__name__}: {e}") from None
        vecs, records = read_records(path, manifest["count"], index.dim)
        index._ids, index._texts = records["ids"], records["texts"]
        index._meta = [Metadata(m) for m in records["metadata"]]
        index._row = {i: r for r, i in enumerate(index._ids)}
        index._auto = manifest.get("next_auto_id", 0)
        index._backend.restore(path, manifest, records, vecs)
        return index
