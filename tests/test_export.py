"""From the kit to production: the handbook's knowledge base in a real Chroma collection (same top-k, same filters),
the whole-index view, and KnowledgeBase save/load; every bad input of issue 19."""

from __future__ import annotations

import json
import re
import shutil
import sys
from types import SimpleNamespace

import chromadb  # the `chroma` extra, in `dev`: `make test` installs it
import numpy as np
import pytest
from crashes import killed_at_replace

from llmlab.course.data import DATA_DIR, read_jsonl
from llmlab.embed import embed
from llmlab.export import chroma_metadata, chroma_search, chroma_where, open_chroma, to_chroma
from llmlab.index import IndexFormatError, VectorIndex
from llmlab.rag import KB_MANIFEST, KnowledgeBase

HANDBOOK = DATA_DIR / "handbook"
QUESTIONS = [q["question"] for q in read_jsonl("eval.jsonl")]
FILTERS = [
    {"source": "leave.md"},
    {"chunk": {"$gte": 1}},
    {"chunk": {"$lt": 1}},
    {"source": {"$in": ["travel.md", "expenses.md", "sick_leave.md"]}},
    {"source": {"$nin": ["travel.md", "expenses.md"]}},
    {"title": {"$ne": "Annual Leave"}},  # every chunk has a title: Chroma's $ne also matches missing keys
    {"$or": [{"source": "travel.md"}, {"chunk": {"$gt": 1}}]},
    {"$and": [{"source": {"$in": ["leave.md", "benefits.md"]}}, {"chunk": 0}]},
    {"source": "leave.md", "chunk": 0},  # two keys: an $and in Chroma
]


@pytest.fixture(scope="module")
def handbook(lab) -> KnowledgeBase:
    kb = KnowledgeBase(lab)
    kb.add_documents(HANDBOOK)
    return kb


@pytest.fixture(scope="module")
def queries(lab) -> np.ndarray:
    return embed(lab, QUESTIONS)


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chroma")


@pytest.fixture(scope="module")
def exported(handbook, chroma_dir):
    return to_chroma(handbook.index, chroma_dir, "handbook")


def small_index(metadata: list[dict]) -> VectorIndex:
    index = VectorIndex(3)
    rng = np.random.default_rng(0)
    index.add(
        rng.normal(size=(len(metadata), 3)), texts=[f"t{i}" for i in range(len(metadata))], metadata=metadata
    )
    return index


# ---- the whole index at once --------------------------------------------------------------------------
def test_records_and_dataframe_show_every_item(handbook):
    index = handbook.index
    records = index.records()
    assert [r.id for r in records] == index.ids and len(records) == len(index) > 30
    for r in records[:5]:
        stored = index.get(r.id)
        assert (
            np.array_equal(r.vector, stored.vector)
            and r.text == stored.text
            and r.metadata == stored.metadata
        )
    records[0].vector[:] = 0  # a snapshot: changing it leaves the index alone
    records[0].metadata["source"] = "changed"
    assert index.get(records[0].id).vector.any() and index.get(records[0].id).metadata["source"] != "changed"

    frame = index.to_dataframe()
    assert list(frame.columns) == ["id", "text", "source", "title", "chunk", "vector"]
    assert (
        frame["id"].tolist() == index.ids
        and frame["source"].iloc[0] == index.get(index.ids[0]).metadata["source"]
    )
    assert np.array_equal(np.stack(frame["vector"]), np.stack([index.get(i).vector for i in index.ids]))


def test_dataframe_of_odd_indexes():
    assert VectorIndex(3).records() == [] and list(VectorIndex(3).to_dataframe().columns) == [
        "id",
        "text",
        "vector",
    ]
    frame = small_index([{"id": "x", "vector": 1, "page": 2}, {}]).to_dataframe()
    assert list(frame.columns) == ["id", "text", "metadata.id", "metadata.vector", "page", "vector"]
    assert frame["metadata.id"].iloc[0] == "x" and frame["id"].tolist() == ["0", "1"]
    assert len(frame["vector"].iloc[1]) == 3


# ---- the handbook in Chroma -----------------------------------------------------------------------------
def test_chroma_holds_the_same_items(handbook, exported):
    index = handbook.index
    assert exported.count() == len(index)
    assert exported.configuration["hnsw"]["space"] == "cosine"
    got = exported.get(ids=index.ids[:10], include=["embeddings", "documents", "metadatas"])
    for i, vector, text, meta in zip(
        got["ids"], got["embeddings"], got["documents"], got["metadatas"], strict=True
    ):
        record = index.get(i)
        assert (
            np.allclose(vector, record.vector, atol=1e-6) and text == record.text and meta == record.metadata
        )


def test_chromas_top_k_for_the_evaluation_questions_equals_ours(handbook, exported, queries):
    ours = handbook.index.search(queries, k=5)
    theirs = chroma_search(exported, queries, k=5)
    assert [r.ids for r in theirs] == [r.ids for r in ours]
    for a, b in zip(ours, theirs, strict=True):
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        assert [h.text for h in a] == [h.text for h in b] and [h.metadata for h in a] == [
            h.metadata for h in b
        ]
    # the note in llmlab.export: Chroma's cosine distance is 1 - our similarity
    raw = exported.query(query_embeddings=queries[:3], n_results=3, include=["distances"])
    for dists, ours_one in zip(raw["distances"], ours[:3], strict=True):
        assert np.allclose(dists, [1 - h.score for h in ours_one[:3]], atol=1e-5)


@pytest.mark.parametrize("where", FILTERS, ids=[json.dumps(w) for w in FILTERS])
def test_our_where_filters_give_the_same_ids_in_chroma(handbook, exported, queries, where):
    index = handbook.index
    ours = set(index.search(queries[0], k=len(index), where=where).ids)
    theirs = set(exported.get(where=chroma_where(where))["ids"])
    assert ours == theirs and 0 < len(ours) < len(index)
    assert [r.ids for r in chroma_search(exported, queries[:8], k=3, where=where)] == [
        r.ids for r in index.search(queries[:8], k=3, where=where)
    ]


def test_chroma_never_embeds(exported, chroma_dir):
    assert exported.configuration.get("embedding_function") is None
    reopened = open_chroma(
        chroma_dir, "handbook"
    )  # Chroma's own get_collection() would download a model here
    for collection in (exported, reopened):
        with pytest.raises(ValueError, match="embedding function"):
            collection.query(query_texts=["How many days of leave do I get?"], n_results=1)
    assert reopened.count() == exported.count()


def test_where_in_chroma_syntax():
    assert chroma_where({"a": 1}) == {"a": 1}
    assert chroma_where({"$and": [{"a": 1}]}) == {"a": 1}  # Chroma wants two or more
    assert chroma_where({"a": {"$in": ("x", "y")}, "$or": [{"b": 1}, {"c": 2, "d": 3}]}) == {
        "$and": [{"a": {"$in": ["x", "y"]}}, {"$or": [{"b": 1}, {"$and": [{"c": 2}, {"d": 3}]}]}]
    }
    with pytest.raises(ValueError, match="unknown operator"):
        chroma_where({"a": {"$like": 1}})


@pytest.mark.parametrize(("metric", "backend"), [("ip", "exact"), ("l2", "exact"), ("l2", "hnsw")])
def test_other_metrics_map_to_chroma_spaces(tmp_path, metric, backend):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 16))
    vectors = centres[rng.integers(0, 10, 400)] + 0.3 * rng.normal(size=(400, 16))
    index = VectorIndex(16, metric=metric, backend=backend)
    index.add(vectors, metadata=[{"group": i % 4} for i in range(400)])
    collection = to_chroma(index, tmp_path, "vectors")
    config = collection.configuration["hnsw"]
    assert config["space"] == metric
    if backend == "hnsw":
        assert (config["max_neighbors"], config["ef_construction"], config["ef_search"]) == (16, 200, 64)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    exact = VectorIndex(16, metric=metric)
    exact.add(vectors)
    found, truth = chroma_search(collection, queries, k=5), exact.search(queries, k=5)
    # Chroma's HNSW graph is approximate (and built by several threads): nearly all of the exact top-5 ...
    shared = sum(len(set(f.ids) & set(t.ids)) for f, t in zip(found, truth, strict=True))
    assert shared >= 0.95 * 5 * len(queries)
    # ... and every hit's score, converted from Chroma's distance, is our score of that vector exactly
    for query, hits in zip(queries, found, strict=True):
        for hit in hits:
            x = exact.get(hit.id).vector
            ours = np.linalg.norm(query - x) if metric == "l2" else query @ x
            assert hit.score == pytest.approx(float(ours), rel=1e-4, abs=1e-4)


# ---- bad input ------------------------------------------------------------------------------------------
def test_an_empty_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        to_chroma(VectorIndex(3), tmp_path / "db", "empty-index")
    assert not (tmp_path / "db").exists()  # refused before Chroma was even opened


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"name": "Ann"}, "a nested dict"),
        ([], "an empty list"),
        ([1, "two"], "a list whose items"),
        ([[1], [2]], "a list whose items"),
        (None, "None"),
        (2**70, "an integer beyond 64 bits"),
    ],
)
def test_metadata_chroma_cannot_store_is_refused_with_the_key_named(tmp_path, value, problem):
    index = small_index([{"ok": 1}, {"ok": 2, "odd": value}])
    with pytest.raises(
        ValueError, match=rf"item '1', metadata key 'odd': Chroma cannot store {problem}.*flatten=True"
    ):
        to_chroma(index, tmp_path / "db", "odd-metadata")
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("key", ["", "$where", "#document", "chroma:document"])
def test_metadata_keys_chroma_refuses(tmp_path, key):
    with pytest.raises(ValueError, match=rf"metadata key {re.escape(repr(key))}: Chroma refuses keys"):
        to_chroma(small_index([{key: 1}]), tmp_path / "db", "odd-keys", flatten=True)


def test_flatten_stores_what_chroma_cannot(tmp_path):
    meta = [
        {
            "author": {"name": "Ann", "team": {"id": 7}},
            "tags": ["hr", "leave"],
            "pages": [1, "x"],
            "note": None,
        },
        {"author": {"name": "Bo"}, "big": 2**70, "empty": []},
    ]
    collection = to_chroma(small_index(meta), tmp_path, "flat", flatten=True)
    got = collection.get(ids=["0", "1"], include=["metadatas"])["metadatas"]
    assert got[0] == {"author.name": "Ann", "author.team.id": 7, "tags": ["hr", "leave"], "pages": '[1, "x"]'}
    assert got[1] == {"author.name": "Bo", "big": str(2**70), "empty": "[]"}
    assert collection.get(where={"author.name": "Bo"})["ids"] == ["1"]
    assert collection.get(where={"tags": {"$contains": "hr"}})["ids"] == [
        "0"
    ]  # lists Chroma takes stay lists
    with pytest.raises(ValueError, match="gives the metadata key 'a.b' twice"):
        chroma_metadata("x", {"a": {"b": 1}, "a.b": 2}, flatten=True)


def test_an_existing_collection_is_refused_unless_replace(tmp_path):
    first, second = small_index([{"n": 1}] * 3), small_index([{"n": 2}] * 5)
    to_chroma(first, tmp_path, "kept")
    with pytest.raises(ValueError, match="already has a collection 'kept': pass replace=True"):
        to_chroma(second, tmp_path, "kept")
    client = chromadb.PersistentClient(path=str(tmp_path))
    assert client.get_collection("kept").count() == 3
    replaced = to_chroma(second, client, "kept", replace=True)
    assert replaced.name == "kept" and replaced.count() == 5
    assert [c.name for c in client.list_collections()] == ["kept"]
    assert client.get_collection("kept").get(ids=["4"], include=["metadatas"])["metadatas"] == [{"n": 2}]


def test_a_replace_that_fails_half_way_keeps_the_old_collection(tmp_path, monkeypatch):
    client = chromadb.PersistentClient(path=str(tmp_path))
    to_chroma(small_index([{"n": 1}] * 3), client, "kept")
    real_add, calls = chromadb.api.models.Collection.Collection.add, []

    def add_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the learner pressed stop in the middle of the export
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(chromadb.api.models.Collection.Collection, "add", add_then_fail)
    monkeypatch.setattr(client, "get_max_batch_size", lambda: 2)
    with pytest.raises(KeyboardInterrupt):
        to_chroma(small_index([{"n": 2}] * 5), client, "kept", replace=True)
    assert len(calls) == 2
    assert [c.name for c in client.list_collections()] == ["kept"]
    kept = client.get_collection("kept")
    assert kept.count() == 3 and kept.get(ids=["0"], include=["metadatas"])["metadatas"] == [{"n": 1}]


def test_without_chromadb_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "chromadb", None)  # what `import chromadb` sees when it is not installed
    with pytest.raises(ImportError, match="pip install chromadb"):
        to_chroma(small_index([{}]), tmp_path, "none")


# ---- KnowledgeBase save / load --------------------------------------------------------------------------
def test_a_saved_knowledge_base_loads_and_answers_the_same(lab, handbook, queries, tmp_path):
    assert handbook.save(tmp_path / "kb") == tmp_path / "kb"
    loaded = KnowledgeBase.load(tmp_path / "kb", lab)
    assert (loaded.max_tokens, loaded.overlap, loaded.embedding_model) == (200, 30, handbook.embedding_model)
    assert loaded.sources == handbook.sources and loaded.index.ids == handbook.index.ids
    assert repr(loaded) == repr(handbook)
    for question in QUESTIONS[:5]:
        assert loaded.search(question, k=3) == handbook.search(question, k=3)
    # it goes on like the original: a document added again replaces its chunks
    changed = json.loads((DATA_DIR / "changed_fact.json").read_text())
    loaded.add_documents([changed["new_text"]], metadata={"source": changed["doc"]})
    assert sorted(loaded.sources) == sorted(handbook.sources) and len(loaded) <= len(handbook)
    loaded.save(tmp_path / "kb")  # a second save: into the other index folder, the first one deleted
    assert sorted(p.name for p in (tmp_path / "kb").iterdir()) == ["index-b", KB_MANIFEST]
    again = KnowledgeBase.load(tmp_path / "kb", lab)
    assert changed["new_fact"] in again.search(changed["question"], k=1)[0].text


def test_an_empty_knowledge_base_round_trips(lab, tmp_path):
    KnowledgeBase(lab, max_tokens=80, overlap=5).save(tmp_path / "kb")
    kb = KnowledgeBase.load(tmp_path / "kb", lab)
    assert len(kb) == 0 and kb.index is None and (kb.max_tokens, kb.overlap) == (80, 5)


def test_loading_with_another_embedding_model_is_refused(lab, handbook, tmp_path):
    handbook.save(tmp_path / "kb")
    other = SimpleNamespace(embedding_model="text-embedding-3-small")
    with pytest.raises(
        ValueError,
        match="embedded with 'all-MiniLM-L6-v2', and this lab embeds questions with 'text-embedding-3-small'",
    ):
        KnowledgeBase.load(tmp_path / "kb", other)
    assert len(KnowledgeBase.load(tmp_path / "kb", other, embedding_model="all-MiniLM-L6-v2")) == len(
        handbook
    )


def test_a_knowledge_base_of_another_format_version_is_refused(lab, handbook, tmp_path):
    handbook.save(tmp_path / "kb")
    manifest_path = tmp_path / "kb" / KB_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(IndexFormatError, match="format version 2; this llmlab reads version 1"):
        KnowledgeBase.load(tmp_path / "kb", lab)
    handbook.save(tmp_path / "kb")  # saving over it works, and then it loads
    assert len(KnowledgeBase.load(tmp_path / "kb", lab)) == len(handbook)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: {**m, "format": "something.else"}, "not a saved KnowledgeBase"),
        (lambda m: {**m, "index": "../../elsewhere"}, "corrupted: a field"),
        (lambda m: {**m, "chunking": None}, "corrupted: a field"),
        (lambda m: {**m, "documents": {"leave.md": ["leave.md#0"]}}, "not those of its index"),
        (lambda m: "[not a dict", "corrupted"),
    ],
)
def test_a_damaged_knowledge_base_is_refused(lab, handbook, tmp_path, damage, message):
    handbook.save(tmp_path / "kb")
    path = tmp_path / "kb" / KB_MANIFEST
    damaged = damage(json.loads(path.read_text()))
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(IndexFormatError, match=message):
        KnowledgeBase.load(tmp_path / "kb", lab)


def test_missing_and_foreign_folders(lab, handbook, tmp_path):
    with pytest.raises(IndexFormatError, match="no saved KnowledgeBase"):
        KnowledgeBase.load(tmp_path / "nowhere", lab)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(IndexFormatError, match="not a saved KnowledgeBase: refusing to overwrite"):
        handbook.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new(lab, handbook, tmp_path):
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    handbook.save(old_dir)
    small = KnowledgeBase(lab)
    small.add_documents([HANDBOOK / "leave.md", DATA_DIR / "new_policy.md"])
    small.save(new_dir)
    stub = "types.SimpleNamespace(embedding_model='all-MiniLM-L6-v2')"
    code = (
        "import types; from llmlab.rag import KnowledgeBase; "
        f"KnowledgeBase.load({str(new_dir)!r}, {stub}).save({str(tmp_path / 'kb')!r})"
    )
    for nth in (1, 2):  # killed before the index folder is moved in; before the manifest is switched
        shutil.rmtree(tmp_path / "kb", ignore_errors=True)
        shutil.copytree(old_dir, tmp_path / "kb")
        killed_at_replace(code, nth)
        assert KnowledgeBase.load(tmp_path / "kb", lab).sources == handbook.sources  # the old one, whole
        KnowledgeBase.load(new_dir, lab).save(
            tmp_path / "kb"
        )  # the next save clears what the killed one left
        names = sorted(p.name for p in (tmp_path / "kb").iterdir())
        assert len(names) == 2 and names[0] in ("index-a", "index-b") and names[1] == KB_MANIFEST
        assert KnowledgeBase.load(tmp_path / "kb", lab).sources == small.sources  # the new one, whole
