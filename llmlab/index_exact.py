"""The exact backend of `VectorIndex`: the vectors in one numpy array, every one scored by `llmlab.topk`.

It keeps the vectors by row (0..n-1 in insertion order) for both backends: `HnswBackend` extends it with a
graph. Scores: the similarity for ``"cosine"``/``"ip"`` (the vectors of ``"cosine"`` come unit-length), the
Euclidean distance for ``"l2"``.

>>> backend = ExactBackend(dim=2, metric="l2")
>>> backend.add(np.array([[0, 0], [3, 4], [1, 0]], np.float32))
>>> backend.search(np.zeros((1, 2), np.float32), k=2)
([[0, 2]], [[0.0, 1.0]])
>>> backend.search(np.zeros((1, 2), np.float32), k=2, subset=backend.subset(np.array([1, 2])))
([[2, 1]], [[1.0, 5.0]])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmlab.topk import topk


def grown(array: np.ndarray, need: int) -> np.ndarray:
    """`array` if it has `need` rows, else a zero-filled copy with room for max(need, twice as many, 64).

    >>> grown(np.ones(2), 3)[:4]
    array([1., 1., 0., 0.])
    """
    if need <= len(array):
        return array
    bigger = np.zeros((max(need, 2 * len(array), 64), *array.shape[1:]), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


class ExactBackend:
    """Vectors by row, searched exactly. See `llmlab.index.SearchBackend` for what each method promises."""

    name = "exact"

    def __init__(self, dim: int, metric: str) -> None:
        self.dim, self.metric = dim, metric
        self.params: dict[str, int] = {}
        self.n = 0
        self._vecs = np.zeros((0, dim), dtype=np.float32)  # room for more rows than n
        self._sq = np.zeros(0, dtype=np.float32)  # squared norms, for l2

    def vectors(self) -> np.ndarray:
        """The stored vectors (n, dim), a view."""
        return self._vecs[: self.n]

    def add(self, x: np.ndarray) -> None:
        n0, n = self.n, len(x)
        self._vecs, self._sq = grown(self._vecs, n0 + n), grown(self._sq, n0 + n)
        self._vecs[n0 : n0 + n] = x
        self._sq[n0 : n0 + n] = np.einsum("ij,ij->i", x, x)
        self.n = n0 + n

    def replace(self, rows: np.ndarray, x: np.ndarray) -> None:
        self._vecs[rows] = x
        self._sq[rows] = np.einsum("ij,ij->i", x, x)

    def delete(self, keep: np.ndarray) -> None:
        m = int(keep.sum())
        self._vecs[:m] = self._vecs[: self.n][keep]
        self._sq[:m] = self._sq[: self.n][keep]
        self.n = m

    def subset(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def search(self, q: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[list, list]:
        """`topk` over all rows or the rows `subset`; returns (rows, scores): k of each per query, as lists."""
        rows, n = subset, self.n
        # A broad subset scores all rows and blocks the others; a narrow one copies its rows first. For one
        # query, copying a fifth of the rows costs as much as scoring all (at 100k x 384: 133 vs 137 queries/s);
        # a batch shares the copy.
        full = rows is None or len(rows) * (5 if len(q) == 1 else 3) > n
        if full:
            vecs, sq = self._vecs[:n], self._sq[:n]
        else:
            vecs, sq = self._vecs[rows], self._sq[rows]
        blocked = None
        if rows is not None and full:
            blocked = np.ones(n, dtype=bool)
            blocked[rows] = False
        found, best = topk(q, vecs, k, sq if self.metric == "l2" else None, blocked)
        if self.metric == "l2":
            best = np.sqrt(np.maximum(np.einsum("ij,ij->i", q, q)[:, None] - best, 0))
        return (found if full else rows[found]).tolist(), best.tolist()

    def save(self, folder: Path, manifest: dict, records: dict) -> None:
        """Nothing beyond the vectors, which `VectorIndex.save` writes."""

    def restore(self, folder: Path, manifest: dict, records: dict, vectors: np.ndarray) -> None:
        self._vecs, self.n = np.ascontiguousarray(vectors), len(vectors)
        self._sq = np.einsum("ij,ij->i", vectors, vectors).astype(np.float32)
