"""Tests for paperlib.metrics.matching: exactness against scipy / brute force and the certificate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from paperlib.metrics import matching
from paperlib.metrics.matching import Matching, match


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _weights(a: np.ndarray, b: np.ndarray, signed: bool) -> np.ndarray:
    w = _unit(a) @ _unit(b).T
    return w if signed else np.abs(w)


def _scipy_opt(a: np.ndarray, b: np.ndarray, signed: bool) -> float:
    w = _weights(a, b, signed)
    r, c = linear_sum_assignment(w, maximize=True)
    return float(w[r, c].sum())


def _check_valid(m: Matching, a: np.ndarray, b: np.ndarray, signed: bool) -> None:
    k = min(len(a), len(b))
    assert m.rows.dtype == np.int64 and m.cols.dtype == np.int64 and m.weights.dtype == np.float64
    assert m.rows.shape == m.cols.shape == m.weights.shape == (k,)
    assert np.all(np.diff(m.rows) > 0), "rows must be sorted and unique"
    assert np.unique(m.cols).size == k, "cols must be unique"
    assert np.allclose(m.weights, _weights(a, b, signed)[m.rows, m.cols], atol=1e-12)
    assert m.mcc == pytest.approx(m.weights.mean())


def _trained_like(rng: np.random.Generator, n_a: int, n_b: int, d: int, noise: float):
    a = _unit(rng.standard_normal((n_a, d)))
    b = rng.standard_normal((n_b, d)) / np.sqrt(d)
    k = min(n_a, n_b)
    pa, pb = rng.permutation(n_a)[:k], rng.permutation(n_b)[:k]
    b[pb] = a[pa] + noise * rng.standard_normal((k, d)) / np.sqrt(d)
    return a, _unit(b)


SHAPES = [(40, 40), (37, 81), (81, 37), (150, 150), (120, 260), (260, 120)]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_path_matches_scipy(shape, kind, signed):
    rng = np.random.default_rng(hash((shape, kind, signed)) % 2**32)
    n_a, n_b = shape
    d = 48
    if kind == "random":
        a, b = rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d))
    else:
        a, b = _trained_like(rng, n_a, n_b, d, noise=0.6)
    m = match(a, b, signed=signed, dense_limit=16)
    assert m.stats["method"] == "sparse-certified"
    assert m.certified
    _check_valid(m, a, b, signed)
    assert m.weights.sum() == pytest.approx(_scipy_opt(a, b, signed), abs=1e-9)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(30, 30), (20, 45), (45, 20)])
def test_dense_path_matches_scipy(shape, signed):
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((shape[0], 16)), rng.standard_normal((shape[1], 16))
    m = match(a, b, signed=signed)
    assert m.stats["method"] == "dense-scipy" and m.certified
    _check_valid(m, a, b, signed)
    assert m.weights.sum() == pytest.approx(_scipy_opt(a, b, signed), abs=1e-9)


def test_above_default_dense_limit_trained_like():
    rng = np.random.default_rng(3)
    a, b = _trained_like(rng, 2100, 2150, 64, noise=0.5)
    m = match(torch.from_numpy(a).float(), b)
    assert m.stats["method"] == "sparse-certified" and m.certified
    w = _unit(a.astype(np.float32).astype(np.float64)) @ _unit(b).T
    r, c = linear_sum_assignment(w, maximize=True)
    assert m.weights.sum() == pytest.approx(w[r, c].sum(), abs=1e-9)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dense_limit", [1, 2048])
def test_brute_force_tiny(signed, dense_limit):
    rng = np.random.default_rng(11)
    for n_a, n_b in [(1, 1), (1, 4), (4, 1), (3, 3), (4, 6), (6, 4), (6, 6), (5, 5)]:
        for _ in range(3):
            a, b = rng.standard_normal((n_a, 3)), rng.standard_normal((n_b, 3))
            w = _weights(a, b, signed)
            if n_a <= n_b:
                best = max(sum(w[i, p[i]] for i in range(n_a)) for p in itertools.permutations(range(n_b), n_a))
            else:
                best = max(sum(w[p[j], j] for j in range(n_b)) for p in itertools.permutations(range(n_a), n_b))
            m = match(a, b, signed=signed, dense_limit=dense_limit)
            assert m.certified
            _check_valid(m, a, b, signed)
            assert m.weights.sum() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("dense_limit", [8, 2048])
def test_permuted_rescaled_copy(dense_limit):
    rng = np.random.default_rng(5)
    n, d = 300, 40
    a = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    b = a[perm] * rng.uniform(0.1, 10.0, size=(n, 1))
    m = match(a, torch.from_numpy(b), dense_limit=dense_limit)
    assert m.certified
    assert m.mcc == pytest.approx(1.0, abs=1e-12)
    # A row perm[j] is B row j
    assert np.array_equal(perm[m.cols], m.rows)


def test_small_candidate_set_is_repaired():
    """top_c=1 on near-duplicates: the top-1 candidate graph is not optimal; the dual
    check must catch that and add edges until the result equals scipy's."""
    rng = np.random.default_rng(0)
    n, d = 120, 24
    a = _unit(rng.standard_normal((n, d)))
    centres = _unit(rng.standard_normal((6, d)))
    b = _unit(centres[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))
    w = a @ b.T
    # optimum restricted to each row's and column's top-1 edge (plus a fallback) is worse
    cand = np.full_like(w, -1e3)
    cand[np.arange(n), w.argmax(1)] = w[np.arange(n), w.argmax(1)]
    cand[w.argmax(0), np.arange(n)] = w[w.argmax(0), np.arange(n)]
    r0, c0 = linear_sum_assignment(cand, maximize=True)
    r, c = linear_sum_assignment(w, maximize=True)
    assert cand[r0, c0].sum() < w[r, c].sum() - 1e-3
    m = match(a, b, top_c=1, dense_limit=16)
    assert m.certified
    assert m.weights.sum() == pytest.approx(w[r, c].sum(), abs=1e-9)
    st = m.stats
    assert st["rounds"] > 1 or st["rows_rechecked"] > 0 or st["promoted"] > 0
    assert st["candidate_edges"] > 2 * n  # edges beyond the initial top-1 graph were added


def test_float32_scan_path(monkeypatch):
    monkeypatch.setattr(matching, "_scan_dtype", lambda dev: torch.float32)
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((200, 32)), rng.standard_normal((230, 32))
    for signed in (True, False):
        m = match(a, b, signed=signed, dense_limit=16)
        assert m.certified and m.stats["scan_dtype"] == "float32"
        assert m.weights.sum() == pytest.approx(_scipy_opt(a, b, signed), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_side_too_large_to_keep_is_normalised_as_read_with_the_same_result(monkeypatch, dtype):
    """Above ``KEEP_BYTES`` a side is kept as given (float32 not copied to float64) and normalised row by row when
    read: the same float64 unit rows, so the same certified matching and the same weights, bit for bit."""
    # the bf16 scan's wide bound, with no fp32 tier after it, forces the float64 rescans this test is about, on any
    # CPU (elsewhere the fp32 scan certifies every row of so small a problem without one)
    monkeypatch.setattr(matching, "_scan_tiers", lambda dev: (torch.bfloat16,))
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((300, 64)).astype(dtype), rng.standard_normal((700, 64)).astype(dtype)
    b[::7] *= 3.0  # rows of different norms
    kept, kept_unit = match(a, b, dense_limit=16, top_c=1), matching._unit(b, "b").all()
    monkeypatch.setattr(matching._UnitRows, "KEEP_BYTES", 1000)
    monkeypatch.setattr(matching._UnitRows, "CHUNK", 64)  # several chunks, the last one short
    lazy = match(a, b, dense_limit=16, top_c=1)  # top-1 candidates: rescans, float64 ones among them
    assert lazy.stats["rows_exact"] > 0 and lazy.stats["rows_rechecked"] > 0
    optimum = _scipy_opt(a.astype(np.float64), b.astype(np.float64), True)
    assert lazy.certified and kept.certified and lazy.weights.sum() == pytest.approx(optimum, abs=1e-9)
    assert np.array_equal(lazy.cols, kept.cols) and np.array_equal(lazy.weights, kept.weights)
    unit = matching._unit(b, "b")
    assert unit.kept is None and unit.t.dtype == (torch.float32 if dtype == np.float32 else torch.float64)
    some = np.array([5, 699, 64, 63])
    assert np.array_equal(unit[some], kept_unit[some]) and np.array_equal(unit.all(), kept_unit)
    bad = b.copy()
    bad[[3, 650]] = 0.0
    with pytest.raises(ValueError, match="b has 2 zero-norm rows"):  # counted across chunks
        match(a, bad, dense_limit=16)


@pytest.mark.parametrize("signed", [True, False])
def test_vectors_failing_a_bfloat16_rescan_go_to_fp32_before_float64(monkeypatch, signed):
    """Random dictionaries at d = 256 leave many rows uncertified by bfloat16 scans (bound 0.010 against gaps of a few
    thousandths): they are rescanned in fp32 rather than in float64, with the same optimum, on any CPU."""
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((300, 256)), rng.standard_normal((400, 256))
    runs = {}
    for tiers in [(torch.bfloat16, torch.float32), (torch.bfloat16,)]:
        monkeypatch.setattr(matching, "_scan_tiers", lambda dev, tiers=tiers: tiers)
        runs[len(tiers)] = match(a, b, signed=signed, dense_limit=16, top_c=1)
    tiered, direct = runs[2], runs[1]
    assert tiered.stats["rows_float32"] > 0 and direct.stats["rows_exact"] > 0
    assert tiered.stats.get("rows_exact", 0) < direct.stats["rows_exact"]
    assert tiered.certified and tiered.weights.sum() == pytest.approx(_scipy_opt(a, b, signed), abs=1e-9)
    assert np.array_equal(tiered.cols, direct.cols)


@pytest.mark.parametrize("signed", [True, False])
def test_a_vector_failing_its_fp32_rescan_goes_on_to_float64(monkeypatch, signed):
    """All three tiers in one solve: columns in pairs 1e-6 apart, closer than the fp32 bound (~1e-5 at d = 64), leave
    rows that only a float64 rescan certifies."""
    monkeypatch.setattr(matching, "_scan_tiers", lambda dev: (torch.bfloat16, torch.float32))
    rng = np.random.default_rng(0)
    a, base = rng.standard_normal((300, 64)), rng.standard_normal((200, 64))
    b = np.concatenate([base, base + 1e-6 * rng.standard_normal((200, 64))])
    m = match(a, b, signed=signed, dense_limit=16, top_c=1)
    assert m.stats["rows_float32"] > 0 and m.stats["rows_exact"] > 0
    assert m.certified and m.weights.sum() == pytest.approx(_scipy_opt(a, b, signed), abs=1e-9)


def test_duplicates_and_ties():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((10, 8))
    a = np.repeat(base, 8, axis=0)  # 80 rows, 8 copies each
    b = np.concatenate([base, rng.standard_normal((70, 8))])
    m = match(a, b, dense_limit=16, top_c=2)
    assert m.certified
    assert m.weights.sum() == pytest.approx(_scipy_opt(a, b, True), abs=1e-9)


@pytest.mark.parametrize(
    "a, b, msg",
    [
        (np.ones(5), np.ones((3, 5)), "a must be 2-D"),
        (np.ones((3, 5)), np.ones((2, 3, 5)), "b must be 2-D"),
        (np.ones((3, 5)), np.ones((3, 4)), "dimension mismatch"),
        (np.zeros((0, 5)), np.ones((3, 5)), "a is empty"),
        (np.ones((3, 5)), np.ones((3, 0)), "b is empty"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones((2, 2)), "a has 1 rows with NaN/Inf"),
        (np.ones((2, 2)), np.array([[np.inf, 1.0], [1.0, 2.0]]), "b has 1 rows with NaN/Inf"),
        (np.ones((3, 2)), np.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]), "b has 2 zero-norm rows"),
    ],
)
def test_bad_inputs(a, b, msg):
    with pytest.raises(ValueError, match=msg):
        match(a, b)


def test_input_types_and_layouts():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((90, 12))
    b = rng.standard_normal((12, 70)).T  # non-contiguous
    ref = _scipy_opt(a, b, True)
    for aa, bb in [
        (a[::-1][::-1], b),
        (a.tolist(), np.asfortranarray(b)),
        (torch.from_numpy(a), torch.from_numpy(b.copy())),
    ]:
        m = match(aa, bb, dense_limit=16)
        assert m.certified and m.weights.sum() == pytest.approx(ref, abs=1e-9)
    m = match(a[::-1], b, dense_limit=16)  # negative strides
    assert m.weights.sum() == pytest.approx(ref, abs=1e-9)


def test_zero_norm_message_mentions_dead_latents():
    with pytest.raises(ValueError, match="drop dead latents"):
        match(np.zeros((2, 3)), np.ones((2, 3)))
