"""embed(): order, dedupe, batching, the disk cache (hits cost no request) and bad input, on the local server."""

from __future__ import annotations

import dataclasses
import json

import httpx
import numpy as np
import openai
import pytest
from crashes import killed_at_replace

from llmlab import embed as embed_module
from llmlab.embed import EmbeddingCache, embed, embedding_cache

TEXTS = [
    "How many days of annual leave do I get?",
    "The office is closed on Founders' Day.",
    "Laptops are replaced every four years.",
    "Who approves my travel expenses?",
    "Passwords need at least 14 characters.",
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, empty LLMLAB_HOME (so a fresh embedding cache) for one test."""
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def counted(lab):
    """A Lab on the session's server whose client records the inputs of every embeddings request."""
    requests: list[list[str]] = []

    def record(request: httpx.Request) -> None:
        if request.url.path.endswith("/embeddings"):
            requests.append(json.loads(request.content)["input"])

    http = httpx.Client(event_hooks={"request": [record]})
    client = openai.OpenAI(base_url=lab.base_url, api_key=lab.client.api_key, http_client=http)
    yield dataclasses.replace(lab, client=client), requests
    http.close()


def test_shape_dtype_and_input_order(counted, home):
    lab, _ = counted
    vectors = embed(lab, TEXTS, cache=False)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    for text, row in zip(TEXTS, vectors, strict=True):
        alone = embed(lab, [text], cache=False)[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)
    reversed_ = embed(lab, TEXTS[::-1], cache=False)
    np.testing.assert_allclose(reversed_, vectors[::-1], atol=1e-5)
    assert not (home / "embeddings").exists()


def test_repeated_texts_are_embedded_once(counted, home):
    lab, requests = counted
    vectors = embed(lab, [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]])
    assert requests == [[TEXTS[0], TEXTS[1]]]
    assert np.array_equal(vectors[0], vectors[2]) and np.array_equal(vectors[0], vectors[3])
    assert not np.allclose(vectors[0], vectors[1])


def test_batches(counted, home):
    lab, requests = counted
    vectors = embed(lab, TEXTS, batch_size=2)
    assert requests == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:5]]
    np.testing.assert_allclose(vectors, embed(lab, TEXTS, cache=False), atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        embed(lab, TEXTS, batch_size=0)


def test_requests_stay_under_the_token_limit(counted, home, monkeypatch):
    lab, requests = counted
    monkeypatch.setattr(embed_module, "MAX_REQUEST_TOKENS", 20)  # each text has 7-10 tokens
    embed(lab, TEXTS)
    assert [len(r) for r in requests] == [2, 2, 1] and sum(requests, []) == TEXTS


def test_cache_hits_cost_no_request(counted, home):
    lab, requests = counted
    first = embed(lab, TEXTS[:3])
    assert len(requests) == 1
    again = embed(lab, TEXTS[:3])
    assert len(requests) == 1
    assert np.array_equal(first, again)
    mixed = embed(lab, [TEXTS[3], TEXTS[0], TEXTS[4]])
    assert requests[1] == [TEXTS[3], TEXTS[4]]  # only the new texts were sent
    assert np.array_equal(mixed[1], first[0])
    assert list((home / "embeddings").glob("*.keys.npy"))


def test_cache_survives_a_new_process(counted, home):
    lab, requests = counted
    first = embed(lab, TEXTS)
    embed_module._caches.clear()  # what a restarted kernel sees: only the files
    assert np.array_equal(embed(lab, TEXTS), first)
    assert len(requests) == 1


def test_cache_is_keyed_by_model(counted, home):
    lab, requests = counted
    embed(lab, TEXTS[:2])
    alias = embed(lab, TEXTS[:2], model="text-embedding-3-small")  # an alias of the same local model
    assert len(requests) == 2
    np.testing.assert_allclose(alias, embed(lab, TEXTS[:2]), atol=1e-5)


def test_cache_false_always_asks(counted, home):
    lab, requests = counted
    embed(lab, TEXTS[:2], cache=False)
    embed(lab, TEXTS[:2], cache=False)
    assert len(requests) == 2


def test_bad_input_is_refused_before_any_request(counted, home):
    lab, requests = counted
    with pytest.raises(ValueError, match=r"texts\[1\] is an empty string"):
        embed(lab, ["fine", "", "also fine"])
    with pytest.raises(TypeError, match=r"texts\[0\] is a int"):
        embed(lab, [3])
    with pytest.raises(TypeError, match="list of texts"):
        embed(lab, "a single string")
    assert requests == []
    assert embed(lab, []).shape == (0, 0)


def test_progress_bar(counted, home, capsys):
    lab, _ = counted
    embed(lab, TEXTS[:2], progress=True)
    assert "embed" in capsys.readouterr().err
    embed(lab, TEXTS[2:4])  # short input: no bar by default
    assert "embed" not in capsys.readouterr().err


def test_cache_shards_merge_and_stay_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_module, "MAX_SHARDS", 4)
    cache = EmbeddingCache(tmp_path)
    keys = [EmbeddingCache.key("local/m", f"text {i}") for i in range(10)]
    vectors = np.arange(30, dtype=np.float32).reshape(10, 3)
    for i in range(10):
        cache.put(keys[i : i + 1], vectors[i : i + 1])
    assert len(list(tmp_path.glob("*.keys.npy"))) <= 4
    assert np.array_equal(np.stack(cache.get(keys)), vectors)
    other = EmbeddingCache(tmp_path)  # another process reading the same folder
    assert np.array_equal(np.stack(other.get(keys)), vectors)


def test_damaged_or_unfinished_shards_are_misses(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = EmbeddingCache.key("local/m", "hello")
    cache.put([key], np.ones((1, 3), dtype=np.float32))
    (tmp_path / "garbage.keys.npy").write_bytes(b"not a numpy file")
    (tmp_path / "orphan.npy").write_bytes(b"vectors whose keys were never written")
    fresh = EmbeddingCache(tmp_path)
    assert fresh.get([key, EmbeddingCache.key("local/m", "other")])[1] is None
    assert np.array_equal(fresh.get([key])[0], np.ones(3, dtype=np.float32))
    keys_file = next(p for p in tmp_path.glob("*.keys.npy") if p.name != "garbage.keys.npy")
    (tmp_path / keys_file.name.replace(".keys.npy", ".npy")).write_bytes(b"truncated")  # vectors damaged
    assert cache.get([key]) == [None]  # already indexed: the read fails, a miss
    assert EmbeddingCache(tmp_path).get([key]) == [None]


@pytest.mark.parametrize("nth", [1, 2])  # killed before moving in the vectors, or the keys
def test_temp_files_of_a_killed_put_are_removed_by_the_next_put(tmp_path, nth):
    code = (
        "import numpy as np; from llmlab.embed import EmbeddingCache; "
        f"EmbeddingCache({str(tmp_path)!r}).put([EmbeddingCache.key('local/m', 'lost')], np.ones((1, 3), np.float32))"
    )
    killed_at_replace(code, nth)
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()].count(True) == 1
    cache = EmbeddingCache(tmp_path)
    assert cache.get([EmbeddingCache.key("local/m", "lost")]) == [None]  # never stored: a miss, no error
    key = EmbeddingCache.key("local/m", "kept")
    cache.put([key], np.full((1, 3), 2, np.float32))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert np.array_equal(EmbeddingCache(tmp_path).get([key])[0], np.full(3, 2, np.float32))


def test_clear_cache(counted, home):
    lab, requests = counted
    embed(lab, TEXTS[:1])
    embedding_cache().clear()
    embed(lab, TEXTS[:1])
    assert len(requests) == 2
