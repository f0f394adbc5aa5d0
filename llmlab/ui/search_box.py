"""`SearchBox`: type a query, see the top-k hits (score, text, metadata); switch k and exact/hnsw search.

>>> box = SearchBox(kb)  # doctest: +SKIP
>>> box = SearchBox(index, embed=lab)  # doctest: +SKIP
>>> box.search("How many days of leave?")  # doctest: +SKIP
>>> box.hits.ids  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
import numpy as np

from llmlab.embed import embed as embed_texts
from llmlab.index import BACKENDS, SearchResults, VectorIndex
from llmlab.ui._base import TABLE_CSS, Panel, esc, styled


def copy_index(index: VectorIndex, backend: str) -> VectorIndex:
    """A copy of `index` (same vectors, ids, texts, metadata and metric) with another `backend`."""
    copy = VectorIndex(index.dim, metric=index.metric, backend=backend)
    records = index.get(index.ids)
    if records:
        copy.add(
            np.stack([r.vector for r in records]),
            ids=[r.id for r in records],
            texts=[r.text for r in records],
            metadata=[r.metadata for r in records],
        )
    return copy


def _preview(text: str | None, width: int = 400) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


class SearchBox(Panel):
    """A query box over a `KnowledgeBase` (or a `VectorIndex` with `embed=`: a `Lab` or a text -> vector function).

    Enter in the query box (or the button) searches; the k slider and the backend toggle search again.
    The other backend's copy of the index is built on first use and rebuilt when the index changes (any add,
    upsert or delete, e.g. a document replaced in the knowledge base).
    State readable from Python: `.hits` (the last `SearchResults`), `.results.value` (HTML), `.info.value`.
    """

    def __init__(self, source: Any, embed: Any = None, k: int = 3):
        if isinstance(source, VectorIndex):
            if embed is None:
                raise TypeError("SearchBox(index) needs embed=: a Lab, or a function text -> vector")
            self._index: Callable[[], VectorIndex | None] = lambda: source
            if callable(embed):
                self._embed = embed
            else:
                self._embed = lambda q: embed_texts(embed, [q], model=embed.embedding_model)[0]
        else:  # a KnowledgeBase: its index (made at its first add_documents) and its embedding model
            self._index = lambda: source.index
            self._embed = lambda q: embed_texts(source.lab, [q], model=source.embedding_model)[0]
        self.source = source
        self.hits = SearchResults()
        # backend -> (the index copied, its version then, the copy)
        self._copies: dict[str, tuple[VectorIndex, int, VectorIndex]] = {}

        index = self._index()
        self.query = styled(
            w.Text(placeholder="Ask something…", continuous_update=False, layout=w.Layout(width="420px")),
            "search-query",
        )
        self.button = styled(w.Button(description="Search", icon="search"), "search-button")
        self.k = styled(w.IntSlider(value=k, min=1, max=20, description="k"), "search-k")
        self.backend = styled(
            w.ToggleButtons(options=list(BACKENDS), value=index.backend if index is not None else "exact"),
            "search-backend",
        )
        self.info = styled(w.Label(""), "search-info")
        self.results = styled(w.HTML(""), "search-results")
        self._muted = False  # True while `search(query)` puts the query in the box itself
        search = self.guard(lambda *_: None if self._muted else self.search())
        self.query.observe(search, "value")
        self.button.on_click(search)
        self.k.observe(search, "value")
        self.backend.observe(search, "value")
        super().__init__(
            "search-box",
            [w.HBox([self.query, self.button]), w.HBox([self.k, self.backend]), self.info, self.results],
        )

    def index_for(self, backend: str) -> VectorIndex:
        """The index searched with `backend`: the source's own, or a copy with that backend."""
        index = self._index()
        if index is None:
            raise ValueError("the knowledge base is empty: call add_documents() first")
        if index.backend == backend:
            return index
        cached = self._copies.get(backend)  # stale when the index was replaced or written to since
        if cached is None or cached[0] is not index or cached[1] != index.version:
            version = index.version
            with self.working(f"building the {backend} index…"):
                cached = (index, version, copy_index(index, backend))
            self._copies[backend] = cached
        return cached[2]

    def search(self, query: str | None = None) -> SearchResults:
        """Search for `query` (default: the query box's text) and show the hits."""
        if query is not None:
            self._muted = True
            try:
                self.query.value = query
            finally:
                self._muted = False
        text = self.query.value.strip()
        if not text:
            self.hits = SearchResults()
            self.results.value, self.info.value = "", ""
            return self.hits
        with self.working("searching…"):
            index = self.index_for(self.backend.value)
            t0 = time.perf_counter()
            vector = self._embed(text)
            t1 = time.perf_counter()
            self.hits = index.search(vector, k=self.k.value)
            t2 = time.perf_counter()
        self.info.value = (
            f"{len(self.hits)} hits from {len(index)} items · {self.backend.value} search "
            f"{(t2 - t1) * 1000:.1f} ms · embedding {(t1 - t0) * 1000:.0f} ms"
        )
        self.results.value = self._results_html()
        return self.hits

    def _results_html(self) -> str:
        rows = "".join(
            f"<tr><td>{rank}</td><td>{hit.score:.3f}</td><td><code>{esc(hit.id)}</code></td>"
            f"<td>{esc(_preview(hit.text))}</td>"
            f"<td>{'<br>'.join(f'{esc(k)}: {esc(v)}' for k, v in hit.metadata.items())}</td></tr>"
            for rank, hit in enumerate(self.hits, 1)
        )
        return (
            TABLE_CSS
            + '<table class="llmlab-hits llmlab-table"><tr><th>#</th><th>score</th><th>id</th><th>text</th>'
            f"<th>metadata</th></tr>{rows}</table>"
        )
