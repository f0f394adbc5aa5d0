"""The tuned top-k kernel (`llmlab.topk.topk`) gives the plain reference's answers: same columns, same order
(ties by lower column), same scores, for inner product and L2 ranking, blocked rows, batches, k above,
at and below the number of rows, and an empty database."""

from __future__ import annotations

import numpy as np
import pytest

import llmlab.topk as topk_mod
from llmlab.topk import topk, topk_reference


def small_integers(n: int, dim: int, seed: int) -> np.ndarray:
    """Entries -1, 0 or 1: every product and sum is exact in float32, whatever order BLAS adds in, and many
    scores tie."""
    return np.random.default_rng(seed).integers(-1, 2, (n, dim)).astype(np.float32)


def both(q, x, k, l2=False, blocked=None):
    sq = np.einsum("ij,ij->i", x, x) if l2 else None
    return topk(q, x, k, sq, blocked), topk_reference(q, x, k, sq, blocked)


def assert_same(fast, reference):
    (cols, scores), (want_cols, want_scores) = fast, reference
    assert cols.shape == want_cols.shape and scores.shape == want_scores.shape
    np.testing.assert_array_equal(cols, want_cols)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("l2", [False, True], ids=["ip", "l2"])
@pytest.mark.parametrize("k", [1, 5, 9])  # odd: with every row twice, the k-th best ties with the next
@pytest.mark.parametrize("queries", [1, 7, 64])
@pytest.mark.parametrize("tile_cells", [topk_mod.TILE_CELLS, 1000])
def test_kernel_matches_the_reference_with_ties(l2, k, queries, tile_cells, monkeypatch):
    # 3,000 rows > 8 chunks x k: the tiled path; 1,000 scores per tile: many tiles, the last one short
    monkeypatch.setattr(topk_mod, "TILE_CELLS", tile_cells)
    half = small_integers(1500, 8, seed=0)
    x = np.concatenate([half, half[np.random.default_rng(1).permutation(1500)]])  # every row twice
    q = small_integers(queries, 8, seed=2)
    fast, reference = both(q, x, k, l2)
    ranked = topk_reference(q, x, k + 1, np.einsum("ij,ij->i", x, x) if l2 else None)[1]
    assert (ranked[:, k - 1] == ranked[:, k]).all()  # a tie at the cut: which row comes first matters
    assert_same(fast, reference)


@pytest.mark.parametrize("l2", [False, True], ids=["ip", "l2"])
def test_blocked_rows_never_come_back(l2, monkeypatch):
    monkeypatch.setattr(topk_mod, "TILE_CELLS", 1000)
    x, q = small_integers(3000, 16, seed=2), small_integers(9, 16, seed=3)
    blocked = np.random.default_rng(4).random(3000) < 0.9  # ~300 rows left, k=10 of them
    fast, reference = both(q, x, 10, l2, blocked)
    assert_same(fast, reference)
    assert not blocked[fast[0]].any()


@pytest.mark.parametrize("k", [6, 7, 50])  # one short of n, n, above n
def test_k_at_or_above_the_number_of_rows(k):
    x, q = small_integers(7, 4, seed=5), small_integers(3, 4, seed=6)
    fast, reference = both(q, x, k)
    assert fast[0].shape == (3, min(k, 7))
    assert_same(fast, reference)


def test_empty_database_and_no_queries():
    assert_same(*both(small_integers(2, 4, seed=7), np.zeros((0, 4), np.float32), 3))
    assert topk(np.zeros((2, 4), np.float32), np.zeros((0, 4), np.float32), 3)[0].shape == (2, 0)
    assert_same(*both(np.zeros((0, 4), np.float32), small_integers(500, 4, seed=8), 3))


@pytest.mark.parametrize("l2", [False, True], ids=["ip", "l2"])
def test_continuous_data_gives_the_same_scores(l2):
    """Gaussian data: summation order may move a near-tie by one float32 step, so compare scores, and check
    that every column returned scores what it should."""
    rng = np.random.default_rng(9)
    x, q = rng.standard_normal((5000, 48), dtype=np.float32), rng.standard_normal((33, 48), dtype=np.float32)
    (cols, scores), (want_cols, want_scores) = both(q, x, 10, l2)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
    sq = np.einsum("ij,ij->i", x, x) if l2 else 0
    exact = 2 * np.einsum("bd,bkd->bk", q, x[cols]) - sq[cols] if l2 else np.einsum("bd,bkd->bk", q, x[cols])
    np.testing.assert_allclose(exact, scores, rtol=1e-5, atol=1e-4)
    assert np.mean(cols == want_cols) > 0.95
