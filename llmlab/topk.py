"""Exact top-k by inner product: a plain reference in a few lines, and the tuned kernel that `VectorIndex` runs.

Both return, per query, the columns of the k best scores (best first, equal scores by lower column) and the
scores. ``sq`` (the rows' squared norms) ranks by ``2 q.x - |x|^2`` instead, which orders rows as the L2
distance does; ``blocked`` rows score -inf. tests/test_topk.py checks that both give the same answers.

>>> import numpy as np
>>> q, x = np.eye(2, dtype=np.float32), np.array([[1, 0], [0, 1], [2, 0]], np.float32)
>>> topk_reference(q, x, k=2)[0]
array([[2, 0],
       [1, 0]])
>>> topk(q, x, k=2)[0]
array([[2, 0],
       [1, 0]])
"""

from __future__ import annotations

import numpy as np

CHUNK = 32  # database rows per chunk whose maxima bound the k-th best score
TILE_CELLS = 1 << 20  # scores per tile (4 MB), reduced to chunk maxima while still in cache
_LOWEST = np.finfo(np.float32).min


def topk_reference(
    q: np.ndarray, vecs: np.ndarray, k: int, sq: np.ndarray | None = None, blocked: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Columns (b, min(k, n)) of the best scores of each query against `vecs` (n, d), and those scores.

    >>> topk_reference(np.ones((1, 2), np.float32), np.eye(2, dtype=np.float32), k=5)[0]  # a tie: lower first
    array([[0, 1]])
    """
    scores = q @ vecs.T
    if sq is not None:
        scores = 2 * scores - sq
    if blocked is not None:
        scores[:, blocked] = -np.inf
    cols = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return cols, np.take_along_axis(scores, cols, axis=1)


def topk(
    q: np.ndarray, vecs: np.ndarray, k: int, sq: np.ndarray | None = None, blocked: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`topk_reference`, fast, for float32 `q` and `vecs`; at least k rows must not be blocked.

    Queries go through `_topk` in groups small enough that its tiles stay ~4 MB.

    >>> topk(np.ones((1, 2), np.float32), np.eye(2, dtype=np.float32), k=5)[0]
    array([[0, 1]])
    """
    k = min(k, len(vecs))
    group = min(1024, max(1, TILE_CELLS // (2 * CHUNK * max(k, 1))))
    cols = np.empty((len(q), k), dtype=np.int64)
    best = np.empty((len(q), k), dtype=np.float32)
    for start in range(0, len(q), group):
        cols[start : start + group], best[start : start + group] = _topk(
            q[start : start + group], vecs, k, sq, blocked
        )
    return cols, best


def _topk(
    q: np.ndarray, vecs: np.ndarray, k: int, sq: np.ndarray | None, blocked: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The kernel: no full sort and no (b, n) matrix. The database is scored in tiles of (w, b), and each
    tile's chunk maxima (of 32 rows) are taken while it is in cache. The smallest of the k largest chunk maxima
    seen so far is a threshold that at least k scores reach, so only scores reaching it are kept, and only
    those are sorted."""
    b, n = len(q), len(vecs)
    qt = np.ascontiguousarray(q.T)
    if n <= 8 * CHUNK * k:  # small: score all and sort stably
        s = _score_tile(q, qt, vecs, sq, blocked, 0, np.empty((n, b), dtype=np.float32))
        top = np.argsort(-s, axis=0, kind="stable")[:k]
        return top.T, np.take_along_axis(s, top, axis=0).T
    w = -(-max(TILE_CELLS // b, 2 * CHUNK * k) // CHUNK) * CHUNK  # a multiple of CHUNK, >= 2k chunks
    tile = np.empty((min(w, -(-n // CHUNK) * CHUNK), b), dtype=np.float32)
    top = np.full((k, b), -np.inf, dtype=np.float32)  # the k largest chunk maxima so far, per query
    threshold = np.full(b, _LOWEST, dtype=np.float32)  # the smallest of those: blocked scores never pass
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    flat_tile, strides = tile.reshape(-1), np.arange(CHUNK) * b  # a chunk's scores for one query, flat
    for start in range(0, n, w):
        m = min(w, n - start)
        _score_tile(q, qt, vecs, sq, blocked, start, tile[:m])
        c = -(-m // CHUNK)
        tile[m : c * CHUNK] = -np.inf  # pad the last chunk
        maxima = tile[: c * CHUNK].reshape(c, CHUNK, b).max(axis=1)  # (c, b)
        changed = np.flatnonzero((maxima >= threshold).any(axis=0))  # queries whose k largest maxima change
        top[:, changed] = np.partition(np.concatenate([top[:, changed], maxima[:, changed]]), c, axis=0)[c:]
        threshold[changed] = np.maximum(top[:, changed].min(axis=0), _LOWEST)
        chunks, queries = np.nonzero(maxima >= threshold)  # the chunks that may hold a top-k score
        values = flat_tile[(chunks * (CHUNK * b) + queries)[:, None] + strides]  # (chunks, CHUNK) scores
        hot, offset = np.nonzero(values >= threshold[queries, None])
        kept.append((queries[hot], start + chunks[hot] * CHUNK + offset, values[hot, offset]))
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
