"""VectorIndex: exact search against a brute-force reference, hnsw recall, filters, writes, persistence, bad input."""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from crashes import killed_at_replace

import llmlab.index_hnsw as hnsw_mod
import llmlab.topk as topk_mod
from llmlab.course.data import DATA_DIR
from llmlab.index import IndexFormatError, SearchResults, VectorIndex, compile_where

METRICS = ["cosine", "ip", "l2"]


def tie_vectors(n: int, seed: int) -> np.ndarray:
    """8-d vectors with four entries of +-1: every product, norm and distance is exact, and many repeat."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 8), dtype=np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x


def clustered(n: int, dim: int, seed: int, centers: int = 40) -> np.ndarray:
    """Points around random centres: neighbourhoods like real embeddings have (i.i.d. Gaussians have none)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1234).standard_normal((centers, dim))
    return (c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)


def reference(x: np.ndarray, q: np.ndarray, metric: str, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Brute force in float64: full sort, ties by insertion order."""
    x, q = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        scores = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    else:
        scores = q @ x.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[str(i) for i in row] for row in order], np.take_along_axis(scores, order, 1)


@pytest.fixture(scope="module")
def data():
    return clustered(3000, 32, seed=1), clustered(50, 32, seed=2)


@pytest.fixture(scope="module")
def hnsw_cosine(data):
    x, _ = data
    index = VectorIndex(32, backend="hnsw")
    index.add(x[:1000], metadata=[{"group": i % 10, "name": f"n{i}"} for i in range(1000)])
    index.add(x[1000:], metadata=[{"group": i % 10, "name": f"n{i}"} for i in range(1000, 3000)])
    return index


# ---- exact search --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 7, 100])
@pytest.mark.parametrize("tile_cells", [topk_mod.TILE_CELLS, 1000])
def test_exact_matches_brute_force_with_ties(metric, k, tile_cells, monkeypatch):
    # 1,000 scores per tile: the database is read in many tiles of a few chunks (also for one query), the last short
    monkeypatch.setattr(topk_mod, "TILE_CELLS", tile_cells)
    x, q = tie_vectors(3000, seed=0), tie_vectors(40, seed=1)
    index = VectorIndex(8, metric=metric)
    index.add(x[:1234], metadata=[{"odd": i % 2} for i in range(1234)])
    index.add(x[1234:], metadata=[{"odd": i % 2} for i in range(1234, 3000)])
    want_ids, want_scores = reference(x, q, metric, k)
    batch = index.search(q, k=k)
    assert [r.ids for r in batch] == want_ids
    np.testing.assert_allclose([[h.score for h in r] for r in batch], want_scores, rtol=1e-6, atol=1e-6)
    assert [index.search(v, k=k) for v in q[:5]] == batch[:5]
    # a broad filter (all rows scored, the others blocked), then a narrow one (only the matches scored)
    for gone in ([], [i for i in index.ids if int(i) % 2 and int(i) % 5]):
        index.delete(gone)
        kept = np.array([int(i) for i in index.ids if int(i) % 2])
        want = [[str(kept[int(j)]) for j in row] for row in reference(x[kept], q, metric, k)[0]]
        assert [r.ids for r in index.search(q, k=k, where={"odd": 1})] == want


@pytest.mark.parametrize("metric", METRICS)
def test_exact_scores_match_brute_force_on_continuous_data(metric, data):
    x, q = data
    index = VectorIndex(32, metric=metric)
    index.add(x)
    _, want_scores = reference(x, q, metric, 10)
    got = index.search(q, k=10)
    np.testing.assert_allclose([[h.score for h in r] for r in got], want_scores, rtol=1e-4, atol=1e-4)


def test_single_query_returns_results_and_batch_returns_lists():
    index = VectorIndex(3)
    index.add(np.eye(3), texts=["x", "y", "z"], metadata=[{"axis": a, "id": 1} for a in "xyz"])
    one = index.search([1, 0.1, 0], k=2)
    assert isinstance(one, SearchResults) and one.ids == ["0", "1"]
    assert one[0].text == "x" and one[0].metadata == {"axis": "x", "id": 1}
    assert one[0].score == pytest.approx(1 / np.sqrt(1.01))
    frame = one.to_dataframe()
    assert list(frame.columns) == ["id", "score", "text", "axis", "metadata.id"]
    assert frame["id"].tolist() == ["0", "1"]
    many = index.search([[1, 0, 0], [0, 0, 1]], k=1)
    assert [r.ids for r in many] == [["0"], ["2"]]
    assert list(SearchResults().to_dataframe().columns) == ["id", "score", "text"]


# ---- hnsw ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS)
def test_hnsw_recall_against_exact(metric, data):
    x, q = data
    exact, approx = VectorIndex(32, metric=metric), VectorIndex(32, metric=metric, backend="hnsw")
    exact.add(x)
    for part in np.array_split(x, 4):  # grows past the initial capacity
        approx.add(part)
    assert approx.recall(exact, q, k=10) >= 0.95
    approx.ef = 10  # hnswlib searches with max(ef, k)
    assert approx.recall(exact, q, k=100) >= 0.9
    # scores are the same quantity as the exact backend's
    np.testing.assert_allclose(
        [h.score for h in approx.search(q[0], k=5)], [h.score for h in exact.search(q[0], k=5)], rtol=1e-4
    )


def test_hnsw_deletes_are_honoured_and_k_is_clamped(data):
    x, q = data
    exact, approx = VectorIndex(32), VectorIndex(32, backend="hnsw")
    exact.add(x[:500])
    approx.add(x[:500])
    gone = [str(i) for i in range(0, 500, 3)]
    exact.delete(gone)
    approx.delete(gone)
    assert len(approx) == 500 - len(gone)
    results = approx.search(q, k=1000)  # more than is left: returns what there is
    assert all(len(r) == len(approx) for r in results)
    assert not set(gone) & {i for r in results for i in r.ids}
    assert approx.recall(exact, q, k=10) >= 0.95


def test_hnsw_filters_use_both_paths(hnsw_cosine, data, monkeypatch):
    _, q = data
    exact = VectorIndex(32)
    exact.add(data[0], metadata=[{"group": i % 10, "name": f"n{i}"} for i in range(3000)])
    where = {"group": {"$in": [2, 5, 7]}}
    for threshold in (0.0, 1.01):  # 0: hnswlib's filter callback; 1.01: exact search over the matches
        monkeypatch.setattr(hnsw_mod, "FILTER_EXACT_BELOW", threshold)
        got = hnsw_cosine.search(q, k=10, where=where)
        want = exact.search(q, k=10, where=where)
        assert all(h.metadata["group"] in (2, 5, 7) for r in got for h in r)
        found = sum(len(set(g.ids) & set(w.ids)) for g, w in zip(got, want, strict=True))
        assert found / (10 * len(q)) >= 0.95
    one = hnsw_cosine.search(q[0], k=5, where={"name": "n17"})
    assert one.ids == ["17"]


# ---- filters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"team": "hr"}, ["0", "2"]),
        ({"team": {"$eq": "it"}}, ["1"]),
        ({"team": {"$ne": "hr"}}, ["1", "3"]),
        ({"year": {"$gt": 2023}}, ["2", "3"]),
        ({"year": {"$gte": 2023}}, ["1", "2", "3"]),
        ({"year": {"$lt": 2023}}, ["0"]),
        ({"year": {"$lte": 2023.0}}, ["0", "1"]),
        ({"team": {"$in": ["it", "ops"]}}, ["1", "3"]),
        ({"team": {"$nin": ["it", "ops"]}}, ["0", "2"]),
        ({"$and": [{"team": "hr"}, {"year": {"$gt": 2022}}]}, ["2"]),
        ({"$or": [{"team": "it"}, {"year": 2025}]}, ["1", "3"]),
        ({"team": "hr", "year": 2022}, ["0"]),
        ({"draft": True}, ["3"]),
        ({"draft": {"$ne": True}}, []),  # records without the field never match
        ({"team": {"$gt": "hr"}}, ["1", "3"]),
    ],
)
def test_where_operators(where, expected):
    index = VectorIndex(2, metric="l2")
    index.add(
        [[0, 0], [1, 0], [2, 0], [3, 0]],
        metadata=[
            {"team": "hr", "year": 2022},
            {"team": "it", "year": 2023},
            {"team": "hr", "year": 2024},
            {"team": "ops", "year": 2025, "draft": True},
        ],
    )
    assert index.search([0, 0], k=10, where=where).ids == expected


@pytest.mark.parametrize(
    "where",
    [
        {"a": {"$like": 1}},
        {"$not": [{"a": 1}]},
        {"a": {"$in": 3}},
        {"$and": []},
        {"a": {"$gt": [1]}},
        {},
        "a",
    ],
)
def test_bad_where_is_a_clear_error(where):
    index = VectorIndex(2)
    index.add([[1, 0]], metadata=[{"a": 1}])
    with pytest.raises(ValueError, match="operator|filter|list|compares|dict"):
        index.search([1, 0], where=where)
    assert index.search([1, 0]).ids == ["0"]


def test_compile_where_is_a_plain_predicate():
    match = compile_where({"$or": [{"year": {"$gte": 2024}}, {"team": "hr"}]})
    assert match({"year": 2023, "team": "hr"}) and match({"year": 2024}) and not match({"year": "2024"})


# ---- writes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_upsert_delete_get(backend):
    index = VectorIndex(2, metric="l2", backend=backend)
    assert index.add([[0, 0], [1, 0], [2, 0]], texts=["a", "b", "c"]) == ["0", "1", "2"]
    index.upsert([[5, 0], [9, 9]], ids=["1", "new"], texts=["B", "N"], metadata=[{"v": 2}, None])
    assert index.ids == ["0", "1", "2", "new"] and len(index) == 4
    record = index.get("1")
    assert record.text == "B" and record.metadata == {"v": 2} and record.vector.tolist() == [5, 0]
    assert index.search([5, 0], k=1)[0].id == "1"
    assert index.search([1, 0], k=2).ids == ["0", "2"]
    index.delete(["0", "new"])
    assert index.ids == ["1", "2"] and "0" not in index and len(index) == 2
    assert index.search([0, 0], k=5).ids == ["2", "1"]
    with pytest.raises(KeyError, match="new"):
        index.delete(["2", "new"])
    with pytest.raises(KeyError, match="nope"):
        index.get(["2", "nope"])
    assert index.ids == ["1", "2"]
    assert index.add([[7, 7]]) == ["3"]  # running numbers continue and skip taken ids
    index.upsert([[8, 8]], ids=["4"])
    assert index.add([[6, 6], [6, 7]]) == ["5", "6"]
    assert [r.id for r in index.get(["2", "5"])] == ["2", "5"]


def test_metadata_is_a_deep_copy_of_the_callers():
    tags = ["a"]
    index = VectorIndex(2)
    index.add([[1, 0]], ids=["x"], metadata=[{"tags": tags}])
    tags.append("b")  # the caller's list changes after the add: the index keeps what was added
    assert index.get("x").metadata == {"tags": ["a"]}
    hit = index.search([1, 0], k=1)[0]
    with pytest.raises(TypeError, match=r"read-only: change a copy, dict\(metadata\)"):
        hit.metadata["tags"] = "changed"  # hits share the index's copy, which cannot be changed
    with pytest.raises(TypeError, match="read-only"):
        hit.metadata.update(tags=[])
    changed = dict(hit.metadata) | {"tags": ["c"]}  # ... but it is a dict to read, copy, pickle and dump
    assert json.loads(json.dumps(hit.metadata)) == {"tags": ["a"]} and changed == {"tags": ["c"]}
    assert pickle.loads(pickle.dumps(hit)) == hit and copy.deepcopy(hit.metadata) == {"tags": ["a"]}
    index.upsert([[1, 0]], ids=["x"], metadata=[changed])
    assert index.search([1, 0], k=1)[0].metadata == {"tags": ["c"]} and hit.metadata == {"tags": ["a"]}


def test_cosine_stores_unit_vectors():
    index = VectorIndex(2)
    index.add([[3, 4]], ids=["a"])
    np.testing.assert_allclose(index.get("a").vector, [0.6, 0.8])


def test_concurrent_adds_and_searches_do_not_crash(data):
    x, q = data
    index = VectorIndex(32, backend="hnsw")
    index.add(x[:100])
    errors: list[BaseException] = []

    def writer(part: np.ndarray, offset: int) -> None:
        try:
            for i in range(0, len(part), 50):
                index.add(part[i : i + 50], ids=[f"w{offset + i + j}" for j in range(len(part[i : i + 50]))])
                if i % 200 == 0:
                    index.delete([f"w{offset + i}"])
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for i in range(150):
                assert (
                    len(index.search(q[i % len(q)], k=5, where={"$or": [{"a": 1}]} if i % 7 == 0 else None))
                    <= 5
                )
                index.search(q[:8], k=3)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=writer, args=(x[100 + 1400 * t : 100 + 1400 * (t + 1)], 1400 * t))
        for t in (0, 1)
    ]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 100 + 2800 - 2 * 7
    assert index.search(x[2000], k=1)[0].score == pytest.approx(1.0, abs=1e-5)


# ---- persistence ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["exact", "hnsw"])
@pytest.mark.parametrize("metric", METRICS)
def test_save_load_round_trip(tmp_path, data, backend, metric):
    x, q = data
    index = VectorIndex(32, metric=metric, backend=backend)
    index.add(
        x[:800], texts=[f"t{i}" for i in range(800)], metadata=[{"g": i % 3, "ü": "é"} for i in range(800)]
    )
    index.delete(["3", "10"])
    index.upsert(x[900:902], ids=["5", "x"])
    before = index.search(q, k=10)
    filtered = index.search(q, k=10, where={"g": 1})
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting a saved index is fine
    loaded = VectorIndex.load(tmp_path / "idx", dim=32, metric=metric)
    assert repr(loaded) == repr(index) and loaded.ids == index.ids
    assert loaded.search(q, k=10) == before
    assert loaded.search(q, k=10, where={"g": 1}) == filtered
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["count"] == 799
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dirs left behind
    assert loaded.add(x[1000:3000])[0] == "800"  # grows past the saved capacity; ids continue
    if backend == "hnsw":  # ef is re-applied after load (hnswlib resets it to 10)
        assert loaded.ef == 64 and loaded._backend.graph.ef == 64


def saved_twice(path) -> str:
    """A program that saves a 4-item index at `path` (os.replace #1), then a 5-item one (#2 moves the old copy
    aside, #3 moves the new one in)."""
    return f"""
import numpy as np
from llmlab.index import VectorIndex
index = VectorIndex(4, backend="hnsw")
index.add(np.eye(4), ids=["a", "b", "c", "d"])
index.save({str(path)!r})
index.add([[1, 1, 0, 0]], ids=["new"])
index.save({str(path)!r})
"""


@pytest.mark.parametrize("nth", [2, 3])  # killed before moving the old copy aside, or between the two moves
def test_a_save_killed_at_any_step_leaves_the_old_index_loadable(tmp_path, nth):
    path = tmp_path / "idx"
    killed_at_replace(saved_twice(path), nth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = VectorIndex.load(path, dim=4)
    assert_usable(old)  # the first save, whole
    assert len(caught) == (nth == 3)  # a warning when the old copy is found moved aside
    assert all("interrupted save" in str(w.message) for w in caught)
    leftovers = {p.name for p in tmp_path.iterdir()} - {"idx"}
    assert leftovers and all(re.fullmatch(r"\.idx\.(tmp|old)-\d+-\w+", name) for name in leftovers)
    old.add([[0, 1, 1, 0]], ids=["mine"])
    old.save(path)  # the next save removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert VectorIndex.load(path).ids == ["a", "b", "c", "d", "mine"]


# A saver process builds the same index, then saves versions first, first + 1, ... of it until the test kills
# it at a random moment. One fresh process per round: forking one from a process that has threads (numpy's
# BLAS pool) can deadlock the child, and CI hung twice on an earlier forking version of this test.
SAVER = """
import sys
import numpy as np
from llmlab.index import VectorIndex
path, first = sys.argv[1], int(sys.argv[2])
index = VectorIndex(16, backend="hnsw")
index.add(np.random.default_rng(0).normal(size=(1500, 16)))
rng = np.random.default_rng(first)
for version in range(first, first + 100_000):
    index.upsert(rng.normal(size=(1, 16)), ids=["version"], metadata=[{"version": version}])
    index.save(path)
    print("saved", version, flush=True)
"""


def test_an_index_saved_again_and_again_survives_random_kills(tmp_path):
    path, rng = tmp_path / "idx", np.random.default_rng(13)
    for kill in range(1, 16):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path), str(1000 * kill)], stdout=subprocess.PIPE, text=True
        )
        # a guard, not a timing assert: a saver that never saves is killed, and the test fails on what it read
        watchdog = threading.Timer(120, saver.kill)
        watchdog.start()
        try:
            first = saver.stdout.readline()
            assert first.startswith("saved"), f"the saver died (or hung) before its first save: {first!r}"
            time.sleep(rng.uniform(0, 0.2))  # then kill it at a random moment
            saver.kill()
            lines = [first, *saver.stdout]  # the pipe ends when the killed saver is gone
        finally:
            watchdog.cancel()
            saver.kill()
            saver.wait()
        assert saver.returncode == -signal.SIGKILL, "the saver stopped on its own"
        last = max(int(line.split()[1]) for line in lines if line.startswith("saved"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old copy, moved aside by the killed save, is fine too
            loaded = VectorIndex.load(path, dim=16)
        assert loaded.get("version").metadata["version"] in (last, last + 1)
        assert len(loaded) == 1501 and loaded.search(loaded.get("version").vector, k=1).ids == ["version"]
        leftovers = {p.name for p in tmp_path.iterdir()} - {"idx"}
        assert len(leftovers) <= 2, leftovers  # the killed save's own copies at most: earlier ones are gone
    loaded.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def small():
    index = VectorIndex(4, backend="hnsw")
    index.add(np.eye(4), ids=["a", "b", "c", "d"])
    return index


def assert_usable(index: VectorIndex, n: int = 4) -> None:
    assert len(index) == n
    assert index.search([1, 0, 0, 0], k=1).ids == ["a"]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda i: i.add(np.ones((2, 5))), ValueError, "dimension 4"),
        (lambda i: i.add(np.ones(3)), ValueError, "dimension 4"),
        (lambda i: i.add([[1, np.nan, 0, 0]]), ValueError, "NaN or inf"),
        (lambda i: i.add([[1, 0, 0, 0], [np.inf, 0, 0, 0]]), ValueError, r"NaN or inf \(rows \[1\]\)"),
        (lambda i: i.add([[0, 0, 0, 0]]), ValueError, "zero vectors"),
        (lambda i: i.add([[1, 1, 1, 1]], ids=["a"]), ValueError, "already in the index.*upsert"),
        (lambda i: i.add(np.ones((2, 4)), ids=["e", "e"]), ValueError, "duplicate ids"),
        (lambda i: i.add(np.ones((2, 4)), ids=["e"]), ValueError, "1 ids for 2"),
        (lambda i: i.add(np.ones((1, 4)), ids=[1.5]), TypeError, "strings"),
        (lambda i: i.add(np.ones((1, 4)), texts=[3]), ValueError, "texts"),
        (lambda i: i.add(np.ones((1, 4)), metadata=[{"a": object()}]), ValueError, "JSON"),
        (lambda i: i.add([["a", "b", "c", "d"]]), ValueError, "numbers"),
        (lambda i: i.search([1, 0, 0]), ValueError, "dimension 4"),
        (lambda i: i.search([np.nan, 0, 0, 0]), ValueError, "NaN"),
        (lambda i: i.search([1, 0, 0, 0], k=0), ValueError, "positive"),
        (lambda i: i.delete(["zz"]), KeyError, "zz"),
        (lambda i: setattr(i, "ef", 0), ValueError, "ef"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_index_stays_usable(small, call, error, match):
    with pytest.raises(error, match=match):
        call(small)
    assert_usable(small)


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_adding_nothing_adds_nothing(backend):
    index = VectorIndex(4, backend=backend)
    assert index.add(np.zeros((0, 4))) == []
    index.add(np.eye(4), ids=["a", "b", "c", "d"])
    assert index.add(np.zeros((0, 4)), ids=[], texts=[], metadata=[]) == []
    index.upsert(np.zeros((0, 4)), ids=[])
    assert_usable(index)


def test_k_larger_than_the_index_and_empty_index():
    for backend in ("exact", "hnsw"):
        index = VectorIndex(4, backend=backend)
        assert index.search([1, 0, 0, 0], k=3) == []
        assert index.search(np.ones((2, 4)), k=3) == [[], []]
        index.add(np.eye(4)[:2])
        assert index.search([1, 0, 0, 0], k=50).ids == ["0", "1"]
        assert index.search([1, 0, 0, 0], k=50, where={"x": 1}) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "dot"}, "unknown metric"),
        ({"backend": "faiss"}, "unknown backend"),
        ({"M": 8}, "only backend='hnsw'"),
        ({"backend": "hnsw", "m": 8}, "unexpected parameters"),
    ],
)
def test_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorIndex(4, **kwargs)
    with pytest.raises(ValueError, match="dim"):
        VectorIndex(0)


def corrupt(path, name):
    """Damage a saved index in one of several ways."""
    if name == "no manifest":
        (path / "manifest.json").unlink()
    elif name == "garbage manifest":
        (path / "manifest.json").write_bytes(b"\x00{not json")
    elif name in ("foreign", "version"):
        m = json.loads((path / "manifest.json").read_text())
        m.update({"format": "chroma"} if name == "foreign" else {"version": 99})
        (path / "manifest.json").write_text(json.dumps(m))
    elif name == "truncated vectors":
        data = (path / "vectors.npy").read_bytes()
        (path / "vectors.npy").write_bytes(data[: len(data) // 2])
    elif name == "pickled vectors":
        np.save(path / "vectors.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif name == "records":
        (path / "records.json").write_text(json.dumps({"ids": ["a"], "texts": [None], "metadata": [{}]}))
    elif name == "metadata not dicts":
        records = json.loads((path / "records.json").read_text())
        records["metadata"][0] = ["not", "a", "dict"]
        (path / "records.json").write_text(json.dumps(records))
    elif name == "missing graph":
        (path / "hnsw.bin").unlink()
    elif name in EDITS:
        file, change = EDITS[name]
        if isinstance(change, dict):
            change = json.dumps({**json.loads((path / file).read_text()), **change})
        (path / file).write_text(change)


# Damaged manifest.json / records.json: a dict updates the saved JSON, a string replaces the whole file.
EDITS = {
    "count not an int": ("manifest.json", {"count": 4.0}),
    "count a string": ("manifest.json", {"count": "4"}),
    "next id a word": ("manifest.json", {"next_auto_id": "x"}),
    "next id null": ("manifest.json", {"next_auto_id": None}),
    "params null": ("manifest.json", {"params": None}),
    "graph size too big for hnswlib": ("manifest.json", {"hnsw_elements": 10**20}),
    "graph size negative": ("manifest.json", {"hnsw_elements": -4}),
    "manifest nested too deep": ("manifest.json", "[" * 5000 + "]" * 5000),
    "ids are numbers": ("records.json", {"ids": [1, 2, 3, 4]}),
    "ids a string": ("records.json", {"ids": "abcd"}),
    "ids unhashable": ("records.json", {"ids": [["a"], "b", "c", "d"]}),
    "texts are numbers": ("records.json", {"texts": [1, 2, 3, 4]}),
    "labels are words": ("records.json", {"labels": ["a", "b", "c", "d"]}),
    "labels null": ("records.json", {"labels": None}),
    "labels overflow": ("records.json", {"labels": [2**70, 1, 2, 3]}),
    "labels repeated": ("records.json", {"labels": [0, 0, 2, 3]}),
    "records a list": ("records.json", "[]"),
    "records nested too deep": ("records.json", "[" * 5000 + "]" * 5000),
    "records number too long": ("records.json", '{"ids": ' + "1" * 5000 + "}"),
}


@pytest.mark.parametrize(
    "damage",
    [
        "no manifest",
        "garbage manifest",
        "foreign",
        "version",
        "truncated vectors",
        "pickled vectors",
        "records",
        "metadata not dicts",
        "missing graph",
        *EDITS,
    ],
)
def test_corrupted_save_dirs_are_clear_errors(tmp_path, small, damage):
    small.save(tmp_path / "idx")
    corrupt(tmp_path / "idx", damage)
    with pytest.raises(IndexFormatError, match="idx"):
        VectorIndex.load(tmp_path / "idx")
    target = tmp_path / "idx"
    if damage == "no manifest":  # might be someone else's folder now
        with pytest.raises(IndexFormatError, match="refusing to overwrite"):
            small.save(target)
        target = tmp_path / "fresh"
    small.save(target)  # a damaged save is overwritable
    assert_usable(VectorIndex.load(target))
    assert_usable(small)


def test_foreign_or_mismatched_dirs(tmp_path, small, data):
    small.save(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="dim=4, expected dim=384"):
        VectorIndex.load(tmp_path / "idx", dim=384)
    with pytest.raises(IndexFormatError, match="metric='cosine', expected metric='l2'"):
        VectorIndex.load(tmp_path / "idx", metric="l2")
    with pytest.raises(IndexFormatError, match="not a directory"):
        VectorIndex.load(tmp_path / "nothing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(IndexFormatError, match="refusing to overwrite"):
        small.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    other = VectorIndex(4, backend="hnsw")  # same shape, other vectors: its graph file does not belong here
    other.add(np.ones((4, 4)) + np.arange(4)[:, None], ids=["a", "b", "c", "d"])
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "hnsw.bin", tmp_path / "idx" / "hnsw.bin")
    with pytest.raises(IndexFormatError, match="does not match"):
        VectorIndex.load(tmp_path / "idx")
    assert_usable(small)


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_where_results_follow_writes(backend):
    index = VectorIndex(2, metric="l2", backend=backend)
    index.add([[0, 0], [1, 0]], metadata=[{"t": "a"}, {"t": "b"}])
    assert index.search([0, 0], where={"t": "a"}).ids == ["0"]
    index.upsert([[0, 0]], ids=["1"], metadata=[{"t": "a"}])
    assert index.search([0, 0], where={"t": "a"}).ids == ["0", "1"]
    index.add([[2, 0]], metadata=[{"t": "a"}])
    index.delete("0")
    assert index.search([0, 0], where={"t": "a"}).ids == ["1", "2"]


# ---- real embeddings (all-MiniLM-L6-v2 through the local server) --------------------------------------------
def handbook_texts() -> list[str]:
    """Chunk-like texts from data/handbook: every sentence, and 16-word windows every 4 words."""
    texts: list[str] = []
    for path in sorted((DATA_DIR / "handbook").glob("*.md")):
        body = path.read_text(encoding="utf-8")
        texts += [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if len(s.split()) >= 4]
        words = body.split()
        texts += [" ".join(words[i : i + 16]) for i in range(0, max(1, len(words) - 8), 4)]
    return list(dict.fromkeys(texts))


@pytest.fixture(scope="module")
def minilm(lab):
    texts = handbook_texts()
    questions = [
        json.loads(line)["question"] for line in (DATA_DIR / "eval.jsonl").read_text().splitlines() if line
    ]
    vectors = []
    for i in range(0, len(texts) + len(questions), 256):
        batch = (texts + questions)[i : i + 256]
        response = lab.client.embeddings.create(model=lab.embedding_model, input=batch)
        vectors += [d.embedding for d in response.data]
    vectors = np.array(vectors, dtype=np.float32)
    return texts, vectors[: len(texts)], vectors[len(texts) :]


def test_real_embeddings_exact_and_hnsw(minilm):
    texts, x, q = minilm
    assert len(texts) >= 1000 and x.shape[1] == 384 and len(q) >= 25
    exact = VectorIndex(384)
    exact.add(x, texts=texts)
    want_ids, want_scores = reference(x, q, "cosine", 10)
    got = exact.search(q, k=10)
    np.testing.assert_allclose([[h.score for h in r] for r in got], want_scores, atol=1e-5)
    same = np.mean(
        [a == b for r, w in zip(got, want_ids, strict=True) for a, b in zip(r.ids, w, strict=True)]
    )
    assert same >= 0.98  # only near-ties (within float32 rounding) may swap
    approx = VectorIndex(384, backend="hnsw")
    approx.add(x, texts=texts)
    probes = np.vstack([q, x[::7]])  # the held-out questions and some stored texts
    assert approx.recall(exact, probes, k=10) >= 0.95
    assert got[0][0].text in texts
