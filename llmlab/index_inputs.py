"""What callers pass to a `VectorIndex`, checked (a clear error before anything changes) and copied.

>>> check_vectors([[3, 4]], dim=2, metric="cosine")
array([[0.6, 0.8]], dtype=float32)
>>> check_metadata([{"page": 1}, None], n=2)
[{'page': 1}, {}]
>>> check_ids(["a", "a"], n=2)
Traceback (most recent call last):
ValueError: duplicate ids in one call: ['a']
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


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


def check_vectors(vectors: Any, dim: int, metric: str, what: str = "vectors") -> np.ndarray:
    """`vectors` as float32 (n, dim), finite; unit length for ``"cosine"`` (a copy in any case)."""
    try:
        x = np.array(vectors, dtype=np.float32, ndmin=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numbers of shape (n, {dim}): {e}") from None
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have dimension {dim}, got shape {np.shape(vectors)}")
    squares = float(np.vdot(x, x))  # one pass; not finite if any entry is not (or if it overflows)
    if not math.isfinite(squares):
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise ValueError(f"{what} contain NaN or inf (rows {bad[:5].tolist()})")
    if metric == "cosine" and len(x) == 1 and 0 < squares < math.inf:
        x /= math.sqrt(squares)  # one query: its norm is already known
    elif metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        if not norms.all():
            raise ValueError(
                f"{what}: zero vectors have no direction (rows {np.flatnonzero(norms == 0)[:5].tolist()})"
            )
        x /= norms[:, None]
    return x


def check_ids(ids: Any, n: int) -> list[str]:
    """`n` distinct string ids (ints become strings)."""
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


def check_texts(texts: Any, n: int) -> list[str | None]:
    """`n` texts, strings or None (all None when not given)."""
    if texts is None:
        return [None] * n
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) != n or not all(t is None or isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be {n} strings (or None), got {texts!r:.200}")
    return texts


def check_metadata(metadata: Any, n: int) -> list[Metadata]:
    """`n` read-only deep copies of JSON-serializable dicts with string keys (empty when not given)."""
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
