import numpy as np
import pytest

from onnx_udfc.numerics.compensation import (MIN_EXPLAINED_SHARE, apply_compensation, blend_with_merge,
                                             compensation_error, mean_compensation, merge_partners, neuron_merging,
                                             rescale_about_mean, solve_affine_compensation, unobserved_variance,
                                             variance_restoring_scale)


def _random_stats(rng, n, rank=None):
    a = rng.standard_normal((n, rank or n + 3))
    cov = a @ a.T / a.shape[1]
    mean = rng.normal(0.5, 1.0, n)
    return mean, cov


def test_affine_matches_monte_carlo_least_squares():
    rng = np.random.default_rng(0)
    n = 8
    mean, cov = _random_stats(rng, n)
    kept = np.array([0, 2, 3, 5, 7])
    s, t = solve_affine_compensation(mean, cov, kept)
    a = rng.multivariate_normal(mean, cov, size=200_000)
    x = np.concatenate([a[:, kept], np.ones((a.shape[0], 1))], axis=1)
    coef = np.linalg.lstsq(x, a, rcond=None)[0]  # (|K|+1, N)
    np.testing.assert_allclose(s, coef[:-1].T, atol=0.02)
    np.testing.assert_allclose(t, coef[-1], atol=0.02)


def test_affine_kept_rows_are_exact_identity():
    rng = np.random.default_rng(1)
    mean, cov = _random_stats(rng, 6)
    kept = np.array([4, 1, 3])  # any column order
    s, t = solve_affine_compensation(mean, cov, kept)
    np.testing.assert_array_equal(s[kept], np.eye(3))
    np.testing.assert_array_equal(t[kept], 0.0)


def test_affine_exact_multiple_is_reconstructed():
    rng = np.random.default_rng(2)
    n = 5
    base = rng.standard_normal((n, n + 2))
    base[3] = 2.5 * base[1]  # channel 3 = 2.5 * channel 1 (activations)
    cov = base @ base.T
    mean = rng.normal(1.0, 0.5, n)
    mean[3] = 2.5 * mean[1]
    kept = np.array([0, 1, 2, 4])
    s, t = solve_affine_compensation(mean, cov, kept)
    expected = np.zeros(4)
    expected[1] = 2.5
    np.testing.assert_allclose(s[3], expected, atol=1e-10)
    assert abs(t[3]) < 1e-10
    v = rng.standard_normal((3, n, 3, 3))
    assert compensation_error(v, mean, cov, s, t, kept=kept) < 1e-16 * np.trace(cov) * np.sum(v**2) + 1e-18


def test_affine_extra_noise_shrinks_kept_rows():
    # independent channels: S[k, k] = var_k / (var_k + noise_k), UDFC's per-channel S'
    var = np.array([1.0, 2.0, 0.5])
    cov = np.diag(var)
    mean = np.array([0.3, -1.0, 2.0])
    noise = np.array([0.1, 0.0, 0.5])
    s, t = solve_affine_compensation(mean, cov, np.arange(3), extra_noise=noise)
    np.testing.assert_allclose(np.diag(s), var / (var + noise), rtol=1e-12)
    np.testing.assert_allclose(t, mean * noise / (var + noise), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ridge,noisy", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)])
def test_affine_rows_solves_only_those_rows(ridge, noisy):
    """`rows` gives the same predictors on those rows as the full solve; the other rows are no compensation."""
    rng = np.random.default_rng(5)
    n = 12
    mean, cov = _random_stats(rng, n)
    kept = np.array([0, 1, 4, 5, 6, 9, 11])
    pruned = np.setdiff1d(np.arange(n), kept)
    noise = rng.uniform(0.01, 0.2, kept.size) if noisy else None
    s_all, t_all = solve_affine_compensation(mean, cov, kept, ridge=ridge, extra_noise=noise)
    for rows in (pruned, kept, np.array([3, 0])):
        s, t = solve_affine_compensation(mean, cov, kept, ridge=ridge, extra_noise=noise, rows=rows)
        np.testing.assert_allclose(s[rows], s_all[rows], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(t[rows], t_all[rows], rtol=1e-10, atol=1e-12)
        others = np.setdiff1d(np.arange(n), rows)
        none_s, none_t = mean_compensation(mean, kept)
        np.testing.assert_array_equal(s[others], none_s[others])
        np.testing.assert_allclose(t[others], none_t[others], atol=1e-12)


def test_affine_ridge_and_singular_kept_set():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 6))
    a[2] = a[0]  # two kept channels identical: singular normal equations
    cov = a @ a.T
    mean = np.zeros(4)
    s, t = solve_affine_compensation(mean, cov, np.array([0, 1, 2]), ridge=0.0)
    assert np.all(np.isfinite(s))
    # prediction of channel 3 is still the least-squares one: residual variance as with kept {0, 1}
    s2, _ = solve_affine_compensation(mean, cov, np.array([0, 1]))
    pred = s[3] @ a[[0, 1, 2]]
    pred2 = s2[3] @ a[[0, 1]]
    np.testing.assert_allclose(pred, pred2, rtol=1e-8, atol=1e-8)
    s_r, _ = solve_affine_compensation(mean, cov, np.array([0, 1, 2]), ridge=0.1)
    assert np.all(np.abs(np.diag(s_r[[0, 1, 2]])) < 1.0)


def test_mean_compensation_structure():
    mean = np.array([1.0, 2.0, 3.0, 4.0])
    s, t = mean_compensation(mean, np.array([2, 0]))
    np.testing.assert_array_equal(s, [[0, 1], [0, 0], [1, 0], [0, 0]])
    np.testing.assert_array_equal(t, [0.0, 2.0, 0.0, 4.0])


def test_neuron_merging_exact_for_relu_multiple():
    rng = np.random.default_rng(4)
    n, c = 6, 5
    w = rng.standard_normal((n, c))
    b = rng.standard_normal(n)
    w[4], b[4] = 1.7 * w[2], 1.7 * b[2]  # pruned 4 is a positive multiple of kept 2
    kept = np.array([0, 1, 2, 3, 5])
    s, t = neuron_merging(w, b, kept)
    assert s[4, 2] == pytest.approx(1.7, rel=1e-12)
    np.testing.assert_array_equal(t, 0.0)
    np.testing.assert_array_equal(s[kept], np.eye(5))
    # consumer output identical on random inputs (ReLU is positively homogeneous)
    x = rng.standard_normal((1000, c))
    act = np.maximum(x @ w.T + b, 0.0)
    v = rng.standard_normal((3, n))
    v_new, bias = apply_compensation(v, s, t)
    np.testing.assert_allclose(act[:, kept] @ v_new.T + bias, act @ v.T, rtol=1e-10, atol=1e-10)


def test_neuron_merging_threshold_and_partner_choice():
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
    b = np.zeros(4)
    s, _ = neuron_merging(w, b, np.array([0, 1]), threshold=0.45)
    assert s[2, 0] == pytest.approx(np.linalg.norm(w[2]) / 1.0) and s[2, 1] == 0.0
    np.testing.assert_array_equal(s[3], 0.0)  # anti-parallel: cosine -1 < threshold


def test_blend_with_merge_weights_rows_by_partner_cosine():
    rng = np.random.default_rng(11)
    n, c = 7, 6
    w = rng.standard_normal((n, c))
    b = rng.standard_normal(n)
    w[5], b[5] = 2.5 * w[1], 2.5 * b[1]  # pruned 5: exact positive multiple of kept 1 (cosine 1)
    w[4], b[4] = w[2] + 0.8 * w[4], b[2] + 0.8 * b[4]  # pruned 4: near kept 2
    kept = np.array([0, 1, 2, 3])
    full = np.concatenate([w[kept], b[kept, None]], axis=1)
    orthogonal = np.linalg.svd(full)[2][-1]  # pruned 6: orthogonal to every kept filter, no partner
    w[6], b[6] = orthogonal[:c], orthogonal[c]
    pruned, partner, cosine, scale = merge_partners(w, b, kept)
    np.testing.assert_array_equal(pruned, [4, 5, 6])
    assert kept[partner[1]] == 1 and cosine[1] == pytest.approx(1.0) and scale[1] == pytest.approx(2.5)
    mean, cov = _random_stats(rng, n)
    s_ls, t_ls = solve_affine_compensation(mean, cov, kept, ridge=0.01)
    s_ls[kept], t_ls[kept] = np.eye(kept.size), 0.0
    s, t, blended = blend_with_merge(s_ls, t_ls, w, b, kept, threshold=0.45)
    np.testing.assert_array_equal(blended, [4, 5])
    s_merge, _ = neuron_merging(w, b, kept)
    np.testing.assert_allclose(s[5], s_merge[5], atol=1e-12)  # cosine 1: the merge row exactly
    assert t[5] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(s[6], s_ls[6])  # no partner: least squares unchanged
    assert t[6] == t_ls[6]
    np.testing.assert_array_equal(s[kept], np.eye(kept.size))
    c4 = cosine[0]
    assert 0.45 < c4 < 1.0  # the random channel: in between, weighted by the square root of its cosine
    a4 = np.sqrt(c4)
    np.testing.assert_allclose(s[4], (1 - a4) * s_ls[4] + a4 * s_merge[4], atol=1e-12)
    assert t[4] == pytest.approx((1 - a4) * t_ls[4])
    assert not np.shares_memory(s, s_ls)
    # default threshold 0: every partner with a positive cosine counts (6 has cosine ~0)
    s0, t0, blended0 = blend_with_merge(s_ls, t_ls, w, b, kept)
    np.testing.assert_allclose(s0[:6], s[:6], atol=1e-12)
    np.testing.assert_allclose(s0[6], s_ls[6], atol=1e-12)
    w[6], b[6] = -w[3] + 0.1 * w[6], -b[3] + 0.1 * b[6]  # now a weak positive partner among the kept
    pruned, partner, cosine, scale = merge_partners(w, b, kept)
    c6 = cosine[2]
    assert 0.0 < c6 < 0.45
    s0, t0, blended0 = blend_with_merge(s_ls, t_ls, w, b, kept)
    assert 6 in blended0.tolist()
    s_merge6, _ = neuron_merging(w, b, kept, threshold=0.0)
    a6 = np.sqrt(c6)
    np.testing.assert_allclose(s0[6], (1 - a6) * s_ls[6] + a6 * s_merge6[6], atol=1e-12)


def test_apply_compensation_brute_force():
    rng = np.random.default_rng(5)
    m, n, kept = 4, 6, np.array([0, 2, 5])
    v = rng.standard_normal((m, n, 3, 3)).astype(np.float32)
    s = rng.standard_normal((n, 3))
    t = rng.standard_normal(n)
    v_new, bias = apply_compensation(v, s, t)
    assert v_new.dtype == np.float32 and v_new.shape == (m, 3, 3, 3)
    ref = np.zeros((m, 3, 3, 3))
    ref_b = np.zeros(m)
    for o in range(m):
        for k in range(3):
            for j in range(n):
                ref[o, k] += v[o, j].astype(np.float64) * s[j, k]
        for j in range(n):
            ref_b[o] += t[j] * v[o, j].astype(np.float64).sum()
    np.testing.assert_allclose(v_new, ref, rtol=1e-6)
    np.testing.assert_allclose(bias, ref_b, rtol=1e-12)
    # identity compensation is a bitwise column selection (prune 0 / none keeps weights exact)
    s_id, t_id = mean_compensation(np.zeros(n), kept)
    v_sel, b_sel = apply_compensation(v, s_id, t_id)
    assert np.array_equal(v_sel, v[:, kept])
    np.testing.assert_array_equal(b_sel, 0.0)
    # Gemm rows (M, N)
    vg = rng.standard_normal((m, n))
    vg_new, bg = apply_compensation(vg, s, t)
    np.testing.assert_allclose(vg_new, vg @ s, rtol=1e-12)
    np.testing.assert_allclose(bg, vg @ t, rtol=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_compensation_error_matches_monte_carlo(rho):
    rng = np.random.default_rng(6)
    n, m = 5, 3
    mean, cov = _random_stats(rng, n)
    kept = np.array([0, 1, 3])
    s, t = mean_compensation(mean, kept)
    t = t + 0.3  # a biased residual, so that the mean term matters
    v = rng.standard_normal((m, n, 2, 2))
    err = compensation_error(v, mean, cov, s, t, kept=kept, spatial_rho=rho)
    # model: taps read residuals whose fluctuations are correlated rho^|d|_1, mean shared
    taps = [(0, 0), (0, 1), (1, 0), (1, 1)]
    r_sp = np.array([[rho ** (abs(a[0] - b[0]) + abs(a[1] - b[1])) for b in taps] for a in taps])
    joint = np.kron(cov, r_sp)  # (n*4, n*4), channel-major
    draws = rng.multivariate_normal(np.repeat(mean, 4), joint, size=100_000).reshape(-1, n, 4)
    b = np.eye(n)
    b[:, kept] -= s
    resid = np.einsum("ij,pjt->pit", b, draws) - t[None, :, None]
    out = np.einsum("mjt,pjt->pm", v.reshape(m, n, 4), resid)
    mc = np.mean(np.sum(out**2, axis=1))
    assert err == pytest.approx(mc, rel=0.02)


def test_compensation_ladder_never_increases_error():
    rng = np.random.default_rng(7)
    n, m = 12, 6
    mean, cov = _random_stats(rng, n, rank=8)
    mean = np.abs(mean) + 0.5
    kept = np.sort(rng.choice(n, 8, replace=False))
    v = rng.standard_normal((m, n, 3, 3))
    s_none, t_none = mean_compensation(np.zeros(n), kept)
    e_none = compensation_error(v, mean, cov, s_none, t_none, kept=kept)
    e_mean = compensation_error(v, mean, cov, *mean_compensation(mean, kept), kept=kept)
    e_udfc = compensation_error(v, mean, cov, *solve_affine_compensation(mean, cov, kept), kept=kept)
    assert e_udfc <= e_mean <= e_none
    assert e_udfc < 0.5 * e_mean and e_mean < 0.5 * e_none
    # kept may be inferred from S when the kept rows are exact unit rows
    assert compensation_error(v, mean, cov, *solve_affine_compensation(mean, cov, kept)) == pytest.approx(e_udfc)


def test_unobserved_variance_fills_the_shortfall_below_the_floor():
    v = np.array([1.0, 2.0, 0.0, 0.01, 0.99])  # mean 0.8, floor 0.1 -> target 0.08
    extra = unobserved_variance(v, 0.1)
    np.testing.assert_allclose(extra, [0.0, 0.0, 0.08, 0.07, 0.0])
    assert unobserved_variance(np.array([1.0, 1.5]), 0.1) is None
    assert unobserved_variance(np.zeros(3), 0.1) is None


def test_unobserved_variance_bounds_the_weight_on_a_nearly_constant_channel():
    """Channel 2 barely moves in the (synthetic) statistics but tracks removed channel 0 there; in the (real)
    ones it moves as much as the average channel, independently. Least squares leans on it with a coefficient
    of about 15, which the floor bounds near 1: the real error falls by two orders of magnitude, and on the
    synthetic statistics the floored predictor still beats the mean compensation."""
    rng = np.random.default_rng(4)
    n = 6
    x = rng.standard_normal((n, 400)) + 0.5 * rng.standard_normal((1, 400))
    x[2] = 0.03 * (0.9 * x[0] + 0.45 * rng.standard_normal(400))  # variance about 1e-3 of the others'
    synthetic = np.cov(x)
    x[2] = np.sqrt(np.mean(np.diag(synthetic))) * rng.standard_normal(400)
    real = np.cov(x)
    mean = np.zeros(n)
    kept = np.array([1, 2, 3, 4, 5])
    v = rng.standard_normal((3, n))
    floor = unobserved_variance(np.diag(synthetic)[kept], 0.03)
    assert floor is not None and np.flatnonzero(floor).tolist() == [1]
    plain = solve_affine_compensation(mean, synthetic, kept, ridge=0.001, rows=[0])
    floored = solve_affine_compensation(mean, synthetic, kept, ridge=0.001, extra_noise=floor, rows=[0])
    assert abs(plain[0][0, 1]) > 10 and abs(floored[0][0, 1]) < 2
    by_mean = mean_compensation(mean, kept)
    real_error = [compensation_error(v, mean, real, *st, kept=kept) for st in (plain, floored)]
    assert real_error[1] < 0.05 * real_error[0]
    synthetic_error = [compensation_error(v, mean, synthetic, *st, kept=kept) for st in (floored, by_mean)]
    assert synthetic_error[0] < synthetic_error[1]


def _sample_taps(a, taps):
    """(S, N, T) samples of the T positions a consumer's taps read, independent between positions."""
    return np.stack([a[np.random.default_rng(10 + i).permutation(a.shape[0])] for i in range(taps)], axis=2)


def test_variance_restoration_matches_monte_carlo():
    """On samples from the model the compensated, rescaled consumer output has the original output's variance
    per channel and the compensated output's mean."""
    rng = np.random.default_rng(5)
    n, m, taps = 10, 4, 3
    mean, cov = _random_stats(rng, n)
    v = rng.standard_normal((m, n, taps))
    kept = np.array([0, 1, 4, 6, 7, 9])
    s, t = solve_affine_compensation(mean, cov, kept)
    v_new, bias_delta = apply_compensation(v, s, t)
    bias = rng.standard_normal(m)
    scale = variance_restoring_scale(v, cov, v_new, kept, min_explained=0.0)
    assert np.all(scale > 1.0)
    v_out, b_out = rescale_about_mean(v_new, bias + bias_delta, mean[kept], scale)

    x = _sample_taps(rng.multivariate_normal(mean, cov, size=400_000), taps)  # (S, N, T)
    y = np.einsum("mnt,snt->sm", v, x) + bias
    compensated = np.einsum("mkt,skt->sm", v_new, x[:, kept]) + bias + bias_delta
    restored = np.einsum("mkt,skt->sm", v_out, x[:, kept]) + b_out
    np.testing.assert_allclose(restored.var(axis=0), y.var(axis=0), rtol=0.02)
    np.testing.assert_allclose(restored.mean(axis=0), compensated.mean(axis=0), atol=0.02 * y.std(axis=0).max())
    assert np.all(compensated.var(axis=0) < 0.97 * y.var(axis=0))  # what the scale makes up for


def test_variance_restoration_is_one_where_the_prediction_is_exact():
    """A removed channel that is an exact multiple of a kept one is reconstructed exactly: nothing to restore."""
    rng = np.random.default_rng(6)
    base = rng.standard_normal((6, 9))
    cov_kept = base @ base.T / 9
    mix = np.eye(7, 6)
    mix[6, 2] = 1.7  # channel 6 = 1.7 * channel 2
    cov = mix @ cov_kept @ mix.T
    mean = mix @ rng.normal(size=6)
    kept = np.arange(6)
    s, t = solve_affine_compensation(mean, cov, kept)
    v = rng.standard_normal((3, 7, 1))
    v_new, _ = apply_compensation(v, s, t)
    np.testing.assert_allclose(variance_restoring_scale(v, cov, v_new, kept), 1.0, atol=1e-6)


def test_variance_restoration_leaves_weak_predictions_and_silent_outputs_alone():
    """An output whose compensated prediction explains less than `MIN_EXPLAINED_SHARE` of its variance, reads
    no kept channel, or reads nothing keeps scale 1; one just above the share gets the full scale."""
    n = 4
    cov = np.eye(n)
    kept = np.array([0])
    v = np.zeros((4, n, 1))
    v[:, :, 0] = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]  # Var[y] = 4 for the first three
    v_new = np.zeros((4, 1, 1))
    v_new[0, 0, 0] = np.sqrt(4 * (MIN_EXPLAINED_SHARE - 0.01))  # explains a bit less than the share
    v_new[1, 0, 0] = np.sqrt(4 * (MIN_EXPLAINED_SHARE + 0.01))  # a bit more
    scale = variance_restoring_scale(v, cov, v_new, kept)
    np.testing.assert_allclose(scale, [1.0, 1 / np.sqrt(MIN_EXPLAINED_SHARE + 0.01), 1.0, 1.0])


def test_rescale_about_mean_keeps_the_mean_with_tap_coverage():
    """``y'' = E[y'] + k (y' - E[y'])``: the bias moves so that the mean (taps weighted by their coverage, as a
    ConvTranspose's bias correction counts them) stays put."""
    rng = np.random.default_rng(8)
    v_new = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    bias, mean_kept, scale = rng.standard_normal(4), rng.normal(1.0, 1.0, 3), rng.uniform(1.0, 2.0, 4)
    coverage = np.array([0.25, 0.25, 0.5, 1.0])
    out, b = rescale_about_mean(v_new, bias, mean_kept, scale, tap_weights=coverage)
    assert out.dtype == np.float32 and out.shape == v_new.shape
    mean_before = (v_new.reshape(4, 3, 4) * coverage).sum(axis=2) @ mean_kept + bias
    mean_after = (out.reshape(4, 3, 4).astype(np.float64) * coverage).sum(axis=2) @ mean_kept + b
    np.testing.assert_allclose(mean_after, mean_before, rtol=1e-5)
    np.testing.assert_allclose(out, v_new * scale[:, None, None, None].astype(np.float32), rtol=1e-6)
