"""Take a `VectorIndex` to Chroma, the vector database many teams run: a real collection, queried with our scores.

>>> from llmlab.export import chroma_search, to_chroma
>>> collection = to_chroma(kb.index, "chroma-db", "handbook")  # a folder or a client  # doctest: +SKIP
>>> chroma_search(collection, vector, k=3).ids == kb.index.search(vector, k=3).ids  # doctest: +SKIP
True

The collection holds our vectors (for ``metric="cosine"``, the unit-length copies the index keeps), ids, texts
as Chroma's documents and metadata; Chroma never embeds anything: the collection has no embedding function, so
a query by text (``query_texts=``) fails instead of downloading Chroma's default model. Open it again with
`open_chroma` (Chroma's own ``get_collection(name)`` attaches its default embedding function, which downloads
a model at the first text query). Chroma is an optional dependency: ``pip install chromadb``.

**Similarity (ours) vs distance (Chroma's).** Our hits carry a score; Chroma's `query` returns distances,
always lower-is-better. The metric maps to Chroma's space of the same name:

=========  ==============================  ============  =====================  =================
our metric  our `hit.score`                 Chroma space  Chroma's distance d    our score from d
=========  ==============================  ============  =====================  =================
cosine     cos(q, x), higher is better      "cosine"      1 − cos(q, x)          1 − d
ip         q · x, higher is better          "ip"          1 − q · x              1 − d
l2         ‖q − x‖, lower is better         "l2"          ‖q − x‖² (squared)     √d
=========  ==============================  ============  =====================  =================

`chroma_search` does that conversion, so its hits compare with ours one to one. Chroma searches an HNSW graph
(approximate) even where our index is exact: on a small collection its top-k is the exact one; at 100k vectors
see bench/results/export.json.

**Metadata and filters.** Chroma stores str, int (64-bit), float, bool and non-empty lists of one of those;
not None, nested dicts, other lists, or keys that are empty or start with ``#`` or ``$``. `to_chroma` refuses
those, naming the item and the key, unless ``flatten=True``: nested dicts become dotted keys (``{"a": {"b": 1}}``
→ ``{"a.b": 1}``), other values JSON text, and None values are left out. Chroma's `where` has our operators,
with three differences: one key per dict (`chroma_where` joins several with ``$and``); ``$ne`` and ``$nin``
also match items that lack the key (ours never match a missing key); ``$gt``/``$lt``… compare numbers only.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from llmlab.index import Hit, Metadata, SearchResults, VectorIndex, compile_where

SPACES = {"cosine": "cosine", "ip": "ip", "l2": "l2"}  # our metric -> Chroma's space
SCORE_FROM_DISTANCE: dict[str, Callable[[float], float]] = {
    "cosine": lambda d: 1.0 - d,
    "ip": lambda d: 1.0 - d,
    "l2": lambda d: math.sqrt(max(d, 0.0)),
}
_INT64 = (-(2**63), 2**63 - 1)
_SCALARS = (str, int, float, bool)


def _chromadb() -> Any:
    try:
        import chromadb
    except ImportError:
        raise ImportError(
            "exporting to Chroma needs the chromadb package: pip install chromadb  (or pip install 'llmlab[chroma]')"
        ) from None
    return chromadb


def _kind(value: Any) -> type:
    return bool if isinstance(value, bool) else type(value)


def _unstorable(value: Any) -> str | None:
    """Why Chroma cannot store this metadata value, or None if it can."""
    if _kind(value) is int:
        return None if _INT64[0] <= value <= _INT64[1] else "an integer beyond 64 bits"
    if _kind(value) in _SCALARS:
        return None
    if value is None:
        return "None (null)"
    if isinstance(value, dict):
        return "a nested dict"
    if not value:
        return "an empty list"
    kinds = {_kind(v) for v in value}
    if len(kinds) == 1 and kinds <= set(_SCALARS) and not any(_unstorable(v) for v in value):
        return None
    return "a list whose items are not all str, all int, all float or all bool"


def chroma_metadata(item: str, metadata: dict, flatten: bool = False) -> dict | None:
    """`metadata` as Chroma stores it (None for no keys), or a ValueError naming `item` and the key.

    >>> chroma_metadata("a", {"source": "leave.md", "tags": ["hr", "leave"]})
    {'source': 'leave.md', 'tags': ['hr', 'leave']}
    >>> chroma_metadata("a", {"author": {"name": "Ann"}, "pages": [1, "x"], "note": None}, flatten=True)
    {'author.name': 'Ann', 'pages': '[1, "x"]'}
    >>> chroma_metadata("a", {"author": {"name": "Ann"}})
    Traceback (most recent call last):
    ValueError: item 'a', metadata key 'author': Chroma cannot store a nested dict; pass flatten=True (nested dicts become dotted keys, other values JSON text, None values are left out) or change the metadata
    """
    out: dict[str, Any] = {}

    def visit(key: str, value: Any) -> None:
        if not key or key[0] in "#$" or key == "chroma:document":
            raise ValueError(
                f"item {item!r}, metadata key {key!r}: Chroma refuses keys that are empty, start with # or $, "
                "or are 'chroma:document'; rename the key"
            )
        problem = _unstorable(value)
        if problem is None or (flatten and value is not None and not isinstance(value, dict)):
            if key in out:
                raise ValueError(
                    f"item {item!r}: flattening gives the metadata key {key!r} twice; rename one"
                )
            out[key] = value if problem is None else json.dumps(value, ensure_ascii=False)
        elif not flatten:
            raise ValueError(
                f"item {item!r}, metadata key {key!r}: Chroma cannot store {problem}; pass flatten=True (nested "
                "dicts become dotted keys, other values JSON text, None values are left out) or change the metadata"
            )
        elif isinstance(value, dict):
            for sub, v in value.items():
                visit(f"{key}.{sub}", v)

    for key, value in metadata.items():
        visit(key, value)
    return out or None


def chroma_where(where: dict) -> dict:
    """Our `where` filter in Chroma's syntax: several keys in one dict become an ``$and``.

    >>> chroma_where({"source": "leave.md", "chunk": {"$gte": 1}})
    {'$and': [{'source': 'leave.md'}, {'chunk': {'$gte': 1}}]}
    """
    compile_where(where)  # the checks and errors of a search with this filter

    def convert(w: dict) -> dict:
        parts = []
        for key, cond in w.items():
            if key in ("$and", "$or"):
                subs = [convert(c) for c in cond]
                parts.append(subs[0] if len(subs) == 1 else {key: subs})  # Chroma wants two or more
            elif isinstance(cond, dict):
                ((op, value),) = cond.items()
                parts.append({key: {op: list(value) if op in ("$in", "$nin") else value}})
            else:
                parts.append({key: cond})
        return parts[0] if len(parts) == 1 else {"$and": parts}

    return convert(where)


def _client(client_or_path: Any) -> Any:
    """A Chroma client as given, or Chroma's embedded `PersistentClient` on a folder."""
    if isinstance(client_or_path, (str, os.PathLike)):
        return _chromadb().PersistentClient(path=os.fspath(client_or_path))
    return client_or_path


def open_chroma(client_or_path: Any, name: str) -> Any:
    """The Chroma collection `name` with no embedding function: queries take vectors, and nothing is downloaded.

    >>> open_chroma("chroma-db", "handbook").count()                    # doctest: +SKIP
    33
    """
    return _client(client_or_path).get_collection(name, embedding_function=None)


def to_chroma(
    index: VectorIndex,
    client_or_path: Any,
    name: str,
    *,
    replace: bool = False,
    flatten: bool = False,
    hnsw: dict | None = None,
) -> Any:
    """Copy `index` into a new Chroma collection `name` and return it (a `chromadb` Collection).

    `client_or_path`: a Chroma client, or a folder for Chroma's embedded `PersistentClient`. The space is our
    metric's (`SPACES`); an hnsw index also passes its M, ef_construction and ef; `hnsw` adds Chroma hnsw
    settings (e.g. ``{"ef_search": 200}``). An existing collection `name` is an error unless ``replace=True``;
    then the new one is filled under a temporary name first, so a failed export leaves the old one as it was (a
    kill between deleting the old one and renaming the new one leaves the new one under its temporary name).
    An empty index, and metadata Chroma cannot store (see `chroma_metadata`), are errors before any write.
    """
    if not isinstance(index, VectorIndex):
        raise TypeError(f"expected a VectorIndex, got {type(index).__name__}")
    records = index.records()
    if not records:
        raise ValueError("the index is empty: there is nothing to export (add vectors first)")
    if "" in index:
        raise ValueError(
            "Chroma refuses an empty id, and the index has one: upsert the item under another id"
        )
    metadatas = [chroma_metadata(r.id, r.metadata, flatten) for r in records]
    config = {"space": SPACES[index.metric]}
    if index.backend == "hnsw":
        p = index.params
        config.update(max_neighbors=p["M"], ef_construction=p["ef_construction"], ef_search=p["ef"])
    config.update(hnsw or {})

    client = _client(client_or_path)
    exists = name in {c.name for c in client.list_collections()}
    if exists and not replace:
        raise ValueError(f"Chroma already has a collection {name!r}: pass replace=True to replace it")
    target = f"{name}-llmlab-new-{uuid.uuid4().hex[:8]}" if exists else name
    collection = client.create_collection(target, configuration={"hnsw": config}, embedding_function=None)
    try:
        step = client.get_max_batch_size()
        for start in range(0, len(records), step):
            part = records[start : start + step]
            collection.add(
                ids=[r.id for r in part],
                embeddings=np.stack([r.vector for r in part]),
                documents=[r.text for r in part],
                metadatas=metadatas[start : start + step],
            )
    except BaseException:
        client.delete_collection(target)
        raise
    if exists:
        client.delete_collection(name)
        collection.modify(name=name)
    return collection


def chroma_search(
    collection: Any, query_vectors: Any, k: int = 3, where: dict | None = None
) -> SearchResults | list[SearchResults]:
    """Chroma's top `k` for one query vector (or a list for a 2-D batch), as our `SearchResults`: the same ids,
    texts and metadata, and scores converted from Chroma's distances (`SCORE_FROM_DISTANCE`). `where` is in
    our syntax (`chroma_where`).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    single = np.ndim(query_vectors) == 1
    queries = np.array(query_vectors, dtype=np.float32, ndmin=2)
    config = collection.configuration or {}
    space = (config.get("hnsw") or config.get("spann") or {}).get("space", "l2")
    score = SCORE_FROM_DISTANCE[space]
    found = collection.query(
        query_embeddings=queries,
        n_results=int(k),
        where=None if where is None else chroma_where(where),
        include=["distances", "documents", "metadatas"],
    )
    results = [
        SearchResults(
            Hit(i, score(d), text, Metadata(meta or {}))
            for i, d, text, meta in zip(ids, dists, texts, metas, strict=True)
        )
        for ids, dists, texts, metas in zip(
            found["ids"], found["distances"], found["documents"], found["metadatas"], strict=True
        )
    ]
    return results[0] if single else results


__all__ = [
    "SCORE_FROM_DISTANCE",
    "SPACES",
    "chroma_metadata",
    "chroma_search",
    "chroma_where",
    "open_chroma",
    "to_chroma",
]
