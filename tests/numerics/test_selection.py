import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from onnx_udfc.numerics.selection import greedy_removal_order, select_by_expected_error, select_by_norm


def test_select_by_norm_brute_force_and_ties():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 3, 3, 3))
    norms = [np.abs(w[i]).sum() for i in range(10)]
    expected = sorted(sorted(range(10), key=lambda i: norms[i])[:4])
    np.testing.assert_array_equal(select_by_norm(w, 4), expected)
    tied = np.ones((5, 2))
    tied[3] = 0.5
    np.testing.assert_array_equal(select_by_norm(tied, 3), [0, 1, 3])
    assert select_by_norm(w, 0).size == 0
    with pytest.raises(ValueError):
        select_by_norm(w, 10)


def _err(q, g, d):
    d = list(d)
    return float(np.trace(g[np.ix_(d, d)] @ np.linalg.inv(q[np.ix_(d, d)])))


def _brute_greedy(cov, gram, n_remove, ridge):
    n = cov.shape[0]
    q = np.linalg.inv(cov + ridge * np.mean(np.diag(cov)) * np.eye(n))
    removed, errors = [], []
    for _ in range(n_remove):
        cands = [c for c in range(n) if c not in removed]
        errs = [_err(q, gram, removed + [c]) for c in cands]
        best = int(np.argmin(errs))
        removed.append(cands[best])
        errors.append(errs[best])
    return np.array(removed), np.array(errors)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ridge", [0.05, 1.0])
def test_greedy_equals_brute_force(seed, ridge):
    rng = np.random.default_rng(seed)
    n = 12
    x = rng.standard_normal((n, 20))
    x[5] = 0.9 * x[2] + 0.1 * x[5]  # some structure
    cov = x @ x.T / 20
    v = rng.standard_normal((5, n, 3))
    gram = np.einsum("mit,mjt->ij", v, v)
    order, errors = greedy_removal_order(cov, gram, 9, ridge=ridge)
    ref_order, ref_errors = _brute_greedy(cov, gram, 9, ridge)
    np.testing.assert_array_equal(order, ref_order)
    np.testing.assert_allclose(errors, ref_errors, rtol=1e-8)
    np.testing.assert_array_equal(select_by_expected_error(cov, gram, 9, ridge=ridge), np.sort(ref_order))


@pytest.mark.parametrize("ridge", [0.01, 1.0])
def test_scaled_duplicate_is_removed_first(ridge):
    rng = np.random.default_rng(10)
    n = 8
    x = rng.standard_normal((n, 50))
    x[6] = 1.5 * x[2]  # channel 6 duplicates channel 2
    cov = x @ x.T / 50
    gram = np.eye(n)
    first = select_by_expected_error(cov, gram, 1, ridge=ridge)
    assert first[0] in (2, 6)
    # after removing one of the pair, the expected error is much smaller than for any other channel
    order, errors = greedy_removal_order(cov, gram, 1, ridge=ridge)
    q = np.linalg.inv(cov + ridge * np.mean(np.diag(cov)) * np.eye(n))
    others = [_err(q, gram, [c]) for c in range(n) if c not in (2, 6)]
    assert errors[0] < min(others)


def test_refuses_to_remove_everything():
    cov = np.eye(3)
    with pytest.raises(ValueError):
        select_by_expected_error(cov, cov, 3)
    assert select_by_expected_error(cov, cov, 0).size == 0


def test_large_case_is_fast():
    # timed in a subprocess with one BLAS thread: a shared, busy machine makes threaded BLAS spin
    code = textwrap.dedent(
        """
        import time, numpy as np
        from onnx_udfc.numerics.selection import select_by_expected_error
        rng = np.random.default_rng(0)
        n = 960
        x = rng.standard_normal((n, 1500))
        cov = x @ x.T / 1500
        v = rng.standard_normal((160, n))
        gram = v.T @ v
        t = time.perf_counter()
        out = select_by_expected_error(cov, gram, 288)
        print(time.perf_counter() - t, out.size)
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    seconds, size = res.stdout.split()
    assert int(size) == 288
    assert float(seconds) < 2.0


@pytest.mark.parametrize("n", [1, 2, 7, 300, 600])
def test_precision_is_the_exact_symmetric_inverse_of_the_ridged_covariance(n):
    from onnx_udfc.numerics.selection import _mirror_lower, _precision

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    np.testing.assert_array_equal(_mirror_lower(a.copy(), block=64), np.tril(a) + np.tril(a, -1).T)
    f = rng.standard_normal((n, max(1, n // 2)))
    cov = f @ f.T / max(1, n // 2)
    given = cov.copy()
    q = _precision(cov, 0.1)
    np.testing.assert_array_equal(cov, given)  # LAPACK works in place, on a copy
    np.testing.assert_array_equal(q, q.T)
    assert q.flags["C_CONTIGUOUS"]  # the greedy reads its rows
    ridged = cov + 0.1 * np.mean(np.diag(cov)) * np.eye(n)
    np.testing.assert_allclose(q @ ridged, np.eye(n), atol=1e-9)


def test_indefinite_float32_covariance_and_huge_consumer_weights_stay_finite():
    """Nearly constant channels measured in float32 can have variances of -1e-7 (a PaddleOCR classifier),
    next to consumer weights of 1e15: the selection must neither warn nor pick a NaN."""
    import warnings

    rng = np.random.default_rng(3)
    n = 12
    a = rng.standard_normal((n, 3)) * 1e-4
    cov = a @ a.T  # variances ~3e-8, rank 3
    cov[np.diag_indices(n)[0][:4], np.diag_indices(n)[1][:4]] = -2e-8  # four negative variances; mean stays > 0
    v = rng.standard_normal((5, n)) * 1e15
    gram = v.T @ v
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order, errors = greedy_removal_order(cov, gram, 8, ridge=0.1)
    assert len(set(order.tolist())) == 8 and np.all(order >= 0) and np.all(order < n)
    assert np.all(np.isfinite(errors)) and np.all(errors >= -1e-6 * abs(errors).max())
