"""The planner's run passes and the fast run builders against brute force (plan-speed rewrite).

- The run builders (neighbourhoods as a broadcast grid, documents by repetition, windows with dilation 1,
  the elementwise intersection) against each key's membership, computed per row from the definition.
- ``plan_longest_runs`` / ``plan_leftovers`` against plain-Python versions of their rules.
- Whole plans of run patterns (neighbourhoods with shared border columns and residuals, documents with
  causal windows and globals, wide kernels with extra spans) cover the pattern's dense mask exactly once.
"""

import numpy as np
import pytest
from test_plan import assert_plan_covers

import sparseattn as sa
from sparseattn.engine import plan as plan_mod
from sparseattn.engine.plan import build_plan
from sparseattn.kernels import planning
from sparseattn.patterns import runsets


def _natten_window(x, L, k, d, causal):
    """Axis positions seen from position ``x`` (NATTEN's rule, written out per query)."""
    r, pos = x % d, x // d
    length = (L - r + d - 1) // d
    if causal:
        first = max(pos - (k - 1), 0)
        return [r + p * d for p in range(first, pos + 1)]
    first = min(max(pos - k // 2, 0), length - k)
    return [r + p * d for p in range(first, first + k)]


def _dense_neighbourhood(shape, k, d, c):
    n = int(np.prod(shape))
    coords = np.array(np.unravel_index(np.arange(n), shape)).T
    dense = np.zeros((n, n), dtype=bool)
    for i in range(n):
        ok = np.ones(n, dtype=bool)
        for a in range(len(shape)):
            ok &= np.isin(coords[:, a], _natten_window(coords[i, a], shape[a], k[a], d[a], c[a]))
        dense[i] = ok
    return dense


def _dense_of_runs(runs, n_rows, n_k):
    ptr, lo, hi = runs
    dense = np.zeros((n_rows, n_k), dtype=bool)
    for r in range(n_rows):
        for k in range(ptr[r], ptr[r + 1]):
            dense[r, lo[k] : hi[k]] = True
    return dense


def _assert_canonical(runs, n_rows):
    ptr, lo, hi = runs
    assert len(ptr) == n_rows + 1 and ptr[0] == 0 and ptr[-1] == len(lo) == len(hi)
    assert np.all(hi > lo)
    for r in range(n_rows):
        a, b = ptr[r], ptr[r + 1]
        assert np.all(lo[a + 1 : b] > hi[a : b - 1]), "runs overlap or touch"


def _grid_cases(seed, count):
    rng = np.random.default_rng(seed)
    cases = [((6, 7), (3, 7), (1, 1), (False, False)),  # the window spans the whole last axis: lines touch
             ((5, 6), (2, 6), (2, 1), (True, False)),
             ((3, 4, 5), (2, 3, 5), (1, 1, 1), (False, True, False))]  # fmt: skip
    while len(cases) < count:
        axes = int(rng.integers(1, 4))
        shape = tuple(int(x) for x in rng.integers(1, 8, axes))
        k = tuple(int(rng.integers(1, L + 1)) for L in shape)
        d = tuple(int(rng.integers(1, L // kk + 1)) for L, kk in zip(shape, k))[:-1] + (1,)
        c = tuple(bool(x) for x in rng.integers(0, 2, axes))
        cases.append((shape, k, d, c))
    return cases


@pytest.mark.parametrize("shape,k,d,c", _grid_cases(7, 40))
def test_neighbourhood_runs_equal_the_natten_rule(shape, k, d, c):
    p = sa.neighborhood(shape, k, dilation=d, causal=c)
    n = p.shape[0]
    want = _dense_neighbourhood(shape, k, d, c)
    for start, stop in [(0, n), (n // 3, n - n // 4), (n // 2, n // 2)]:
        runs = p.row_runs(start, stop)
        _assert_canonical(runs, stop - start)
        np.testing.assert_array_equal(_dense_of_runs(runs, stop - start, n), want[start:stop])


@pytest.mark.parametrize("seed", range(20))
def test_documents_windows_and_their_intersection_runs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 90))
    cuts = np.sort(rng.choice(np.arange(1, n), int(rng.integers(0, n)), replace=False)) if n > 1 else []
    lengths = np.diff(np.r_[0, cuts, n]).astype(np.int64)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    left, right = int(rng.integers(0, n + 2)), int(rng.integers(0, 4))
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    dense_doc = doc[:, None] == doc[None, :]
    dense_win = (j - i <= right) & (i - j <= left)
    p_doc, p_win = sa.documents(lengths), sa.sliding_window(n, left=left, right=right)
    for start in (0, int(rng.integers(0, n + 1))):
        stop = int(rng.integers(start, n + 1))
        for p, want in ((p_doc, dense_doc), (p_win, dense_win), (p_doc & p_win, dense_doc & dense_win),
                        (p_doc & sa.causal(n), dense_doc & (j <= i))):  # fmt: skip
            runs = p.row_runs(start, stop)
            _assert_canonical(runs, stop - start)
            np.testing.assert_array_equal(_dense_of_runs(runs, stop - start, n), want[start:stop])


def _random_runs(rng, m, n_k):
    ptr, lo, hi = [0], [], []
    for _ in range(m):
        cols = np.flatnonzero(rng.random(n_k) < rng.choice([0.05, 0.3, 0.8]))
        r = runsets.from_csr(np.array([0, len(cols)]), cols)
        lo.extend(r[1].tolist())
        hi.extend(r[2].tolist())
        ptr.append(len(lo))
    i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return i64(ptr), i64(lo), i64(hi)


@pytest.mark.parametrize("seed", range(10))
def test_longest_runs_kernel(seed):
    rng = np.random.default_rng(seed)
    m, n_k, min_run = int(rng.integers(0, 40)), int(rng.integers(1, 60)), int(rng.integers(1, 6))
    ptr, lo, hi = _random_runs(rng, m, n_k)
    is_long = rng.random(m) < 0.2
    got_lo, got_hi = planning.plan_longest_runs(ptr, lo, hi, is_long, min_run)
    for r in range(m):
        w = [hi[k] - lo[k] for k in range(ptr[r], ptr[r + 1])]
        if is_long[r] or not w or max(w) < min_run:
            assert got_lo[r] == got_hi[r] == 0
        else:
            k = ptr[r] + int(np.argmax(w))  # the first of the longest
            assert (got_lo[r], got_hi[r]) == (lo[k], hi[k])


@pytest.mark.parametrize("seed", range(10))
def test_leftovers_kernel_splits_shared_and_residual_by_the_rule(seed):
    rng = np.random.default_rng(seed)
    m, n_k, T = int(rng.integers(1, 50)), int(rng.integers(1, 40)), int(rng.choice([1, 3, 8, 16]))
    ptr, lo, hi = _random_runs(rng, m, n_k)
    is_long = rng.random(m) < 0.1
    in_span = (rng.random(len(lo)) < 0.3).astype(np.uint8)
    out = planning.plan_leftovers(ptr, lo, hi, is_long, in_span, T, n_k)
    sh_ptr, sh_cols, sh_mask, rs_ptr, rs_lo, rs_hi, rs_tile = out
    assert len(rs_ptr) == m + 1 and rs_ptr[-1] == len(rs_lo) == len(rs_hi) and len(sh_mask) == len(sh_cols) * T
    assert (rs_hi > rs_lo).all()  # no empty run
    for t in range(-(-m // T)):
        rows = [r for r in range(t * T, min(m, (t + 1) * T)) if not is_long[r]]
        keys = {r: [j for k in range(ptr[r], ptr[r + 1]) if not in_span[k] for j in range(lo[k], hi[k])]
                for r in rows}  # fmt: skip
        thr = max(2, (len(rows) + 3) // 4)
        count = {}
        order = []
        for r in rows:
            for j in keys[r]:
                count[j] = count.get(j, 0) + 1
                if j not in order:
                    order.append(j)
        shared = [j for j in order if count[j] >= thr]  # in order of first appearance
        assert sh_cols[sh_ptr[t] : sh_ptr[t + 1]].tolist() == shared
        for c, j in enumerate(shared):
            mask = sh_mask[(sh_ptr[t] + c) * T : (sh_ptr[t] + c + 1) * T]
            assert [t * T + x for x in np.flatnonzero(mask)] == [r for r in rows if j in keys[r]]
        for r in range(t * T, min(m, (t + 1) * T)):
            want = [] if is_long[r] else [j for j in keys[r] if j not in shared]
            runs = list(zip(rs_lo[rs_ptr[r] : rs_ptr[r + 1]].tolist(), rs_hi[rs_ptr[r] : rs_ptr[r + 1]].tolist()))
            assert [j for a, b in runs for j in range(a, b)] == want
            # each residual run ends at a gap, a shared column or the end of a leftover run of the row
            ends = {hi[k] for k in range(ptr[r], ptr[r + 1]) if not in_span[k]}
            assert all(b in ends or b in shared or b not in keys[r] for a, b in runs)
        got = sum(int(rs_hi[e] - rs_lo[e]) for e in range(rs_ptr[t * T], rs_ptr[min(m, (t + 1) * T)]))
        assert rs_tile[t] == got


@pytest.mark.parametrize(
    "make",
    [
        lambda: sa.neighborhood((24, 40), 7),  # residuals, shared columns at the borders
        lambda: sa.neighborhood((12, 64), (3, 17)),  # wide kernel rows: extra spans
        lambda: sa.neighborhood((8, 9, 10), (3, 5, 5), causal=(True, False, False)),
        lambda: sa.neighborhood((10, 12), (3, 12)),  # touching lines merged into longer runs
        lambda: (sa.documents([300, 5, 1, 200, 94]) & sa.causal(600)) | sa.global_tokens(600, [0, 301, 599]),
        lambda: sa.documents([70, 130, 40, 160]) & sa.sliding_window(400, 50),
    ],
)
def test_run_plans_cover_the_pattern_once(make):
    p = make()
    for tile_rows in (None, 5, 32):
        # the runs planner itself (build_plan plans a plain neighbourhood from its grid where it can)
        fields = plan_mod._runs_plan(p, p.row_runs(0, p.shape[0]), tile_rows, plan_mod.CHUNK, plan_mod.LONG_MIN, "runs")
        assert_plan_covers(plan_mod.TilePlan(shape=p.shape, chunk=plan_mod.CHUNK, **fields), p)
        plan = build_plan(p, tile_rows=tile_rows)
        assert plan.kind in ("runs", "structured")
        assert_plan_covers(plan, p)
