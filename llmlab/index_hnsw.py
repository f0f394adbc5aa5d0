"""The approximate backend of `VectorIndex`: an hnswlib graph beside the exact backend's vectors.

hnswlib's traps, handled here: search breadth ``ef`` is set again after every load (hnswlib resets it to 10);
its file stores neither space nor dimension (checked against our own vectors on load); an existing label is
silently overwritten (every insert takes a fresh label, and a replaced or deleted item's old label is marked
deleted); fewer reachable items than k is an error (the search falls back to exact); its filter callback
slows down as matches get rarer (selective filters search exactly, `FILTER_EXACT_BELOW`).

>>> backend = HnswBackend(dim=2, metric="l2")
>>> backend.add(np.array([[0, 0], [3, 4], [1, 0]], np.float32))
>>> backend.search(np.zeros((1, 2), np.float32), k=2)
([[0, 2]], [[0.0, 1.0]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmlab.index_exact import ExactBackend, grown
from llmlab.index_files import IndexFormatError, whole

HNSW_DEFAULTS = {"M": 16, "ef_construction": 200, "ef": 64}
# With a subset (a `where` filter), search the subset's rows exactly when they are fewer than this fraction of
# the index: hnswlib's Python filter callback slows down as matches get rarer, while exact search over few rows
# is fast. At 100k x 384 (bench/results/index.json): callback 12 q/s at 0.1% allowed, 222 at 10%, 512 at 20%;
# exact over the matching rows 14,000 q/s at 0.1%, 265 at 10%, 117 at 20%.
FILTER_EXACT_BELOW = 0.15


class Subset(NamedTuple):
    """Rows to search, and the same rows as a test on hnswlib labels (for its filter callback)."""

    rows: np.ndarray
    allowed: Callable[[int], bool]


class HnswBackend(ExactBackend):
    """The exact backend's vectors plus an hnswlib graph that answers searches approximately.

    Each row's vector sits in the graph under a label (`_labels[row]`); labels are never reused.
    """

    name = "hnsw"

    def __init__(self, dim: int, metric: str, **params: int) -> None:
        import hnswlib

        super().__init__(dim, metric)
        self.params = {**HNSW_DEFAULTS, **params}
        graph = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=dim)
        graph.init_index(
            max_elements=1024, M=self.params["M"], ef_construction=self.params["ef_construction"]
        )
        self._start(graph, 0, np.zeros(0, dtype=np.int64))

    def _start(self, graph: Any, next_label: int, labels: np.ndarray) -> None:
        self.graph = graph
        self.graph.set_ef(self.params["ef"])
        self._next_label = next_label
        self._labels = labels
        self._row_of_label = np.full(graph.get_max_elements(), -1, dtype=np.int64)
        self._row_of_label[self._labels[: self.n]] = np.arange(self.n)
        self._label_is_row = np.array_equal(self._labels[: self.n], np.arange(self.n))  # saves a lookup

    def set_ef(self, ef: int) -> None:
        """Search breadth (recall vs speed); a search uses max(ef, k)."""
        self.params["ef"] = ef
        self.graph.set_ef(ef)

    def add(self, x: np.ndarray) -> None:
        rows = np.arange(self.n, self.n + len(x))
        self._labels = grown(self._labels, self.n + len(x))
        self._labels[rows] = self._graph_add(x, rows)
        super().add(x)

    def replace(self, rows: np.ndarray, x: np.ndarray) -> None:
        super().replace(rows, x)
        for label in self._labels[rows].tolist():
            self.graph.mark_deleted(label)
        self._row_of_label[self._labels[rows]] = -1
        self._labels[rows] = self._graph_add(x, rows)

    def delete(self, keep: np.ndarray) -> None:
        gone = self._labels[: self.n][~keep]
        for label in gone.tolist():
            self.graph.mark_deleted(label)
        self._row_of_label[gone] = -1
        m = int(keep.sum())
        self._labels[:m] = self._labels[: self.n][keep]
        self._row_of_label[self._labels[:m]] = np.arange(m)
        self._label_is_row = np.array_equal(self._labels[:m], np.arange(m))
        super().delete(keep)

    def _graph_add(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Insert into the graph under fresh labels (growing its capacity); returns the labels."""
        labels = np.arange(self._next_label, self._next_label + len(x), dtype=np.int64)
        need = self._next_label + len(x)
        if need > self.graph.get_max_elements():
            cap = max(need, 2 * self.graph.get_max_elements())
            self.graph.resize_index(cap)
            self._row_of_label = np.concatenate(
                [self._row_of_label, np.full(cap - len(self._row_of_label), -1, dtype=np.int64)]
            )
        self.graph.add_items(x, labels)
        self._row_of_label[labels] = rows
        self._label_is_row = self._label_is_row and np.array_equal(labels, rows)
        self._next_label = need
        return labels

    def subset(self, rows: np.ndarray) -> Subset:
        return Subset(rows, set(self._labels[rows].tolist()).__contains__)

    def search(self, q: np.ndarray, k: int, subset: Subset | None = None) -> tuple[list, list]:
        if subset is not None and len(subset.rows) < FILTER_EXACT_BELOW * self.n:
            return super().search(q, k, subset.rows)
        return self.graph_search(q, k, subset)

    def graph_search(self, q: np.ndarray, k: int, subset: Subset | None = None) -> tuple[list, list]:
        """hnswlib's search, as `ExactBackend.search` returns it; exact if hnswlib cannot find k.

        Few numpy calls: after a walk through a large graph each one costs several microseconds.
        """
        allowed = None if subset is None else subset.allowed
        try:
            labels, dist = self.graph.knn_query(q, k=k, filter=allowed, num_threads=1 if len(q) == 1 else -1)
        except RuntimeError:  # "Cannot return the results in a contiguous 2D array": too few reachable
            return super().search(q, k, None if subset is None else subset.rows)
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

    def save(self, folder: Path, manifest: dict, records: dict) -> None:
        """The graph as hnsw.bin, each row's label in records and the label count in the manifest."""
        records["labels"] = self._labels[: self.n].tolist()
        manifest["hnsw_elements"] = self._next_label
        self.graph.save_index(str(folder / "hnsw.bin"))

    def restore(self, folder: Path, manifest: dict, records: dict, vectors: np.ndarray) -> None:
        """As `ExactBackend.restore`, then the graph, checked against the vectors (raises IndexFormatError)."""
        import hnswlib

        super().restore(folder, manifest, records, vectors)
        elements, labels = manifest.get("hnsw_elements"), records.get("labels")
        if not (
            whole(elements)
            and type(labels) is list
            and len(labels) == self.n
            and all(whole(label) and label < elements for label in labels)
            and len(set(labels)) == self.n
        ):
            raise IndexFormatError(f"{folder} is corrupted: hnsw labels are missing or wrong")
        labels = np.array(labels, dtype=np.int64)
        graph = hnswlib.Index(space="l2" if self.metric == "l2" else "ip", dim=self.dim)
        try:  # max_elements=0: the capacity saved in the file
            graph.load_index(str(folder / "hnsw.bin"), max_elements=0)
        except (RuntimeError, MemoryError) as e:
            raise IndexFormatError(f"{folder}/hnsw.bin cannot be read: {e}") from None
        # hnswlib's file stores neither dimension nor space: check the element count and one stored vector.
        ok = graph.element_count == elements
        if ok and self.n:
            ok = np.allclose(np.asarray(graph.get_items(labels[:1]), dtype=np.float32)[0], self._vecs[0])
        if not ok:
            raise IndexFormatError(f"{folder}/hnsw.bin does not match vectors.npy (another index's file?)")
        self._start(graph, elements, labels)
