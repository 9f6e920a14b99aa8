"""Global allocation of the pruning budget: the hull/water-filling step is exact, the budget is kept,
and redundant channels are taken before informative ones."""
import itertools

import numpy as np
import onnx
import pytest

from onnx_udfc import compress
from onnx_udfc.numerics.selection import allocate_removals, lower_convex_hull
from onnx_udfc.passes.allocate import removal_cap

from builders import ModelBuilder, depthwise_block, plain_chain, random_input, rel_error, run


def test_lower_convex_hull_is_below_the_curve_and_convex():
    rng = np.random.default_rng(0)
    for _ in range(50):
        e = np.cumsum(rng.random(rng.integers(1, 12)) * rng.choice([0.1, 1, 10], size=1))
        e = e + rng.normal(0, 0.2, e.size)  # not monotone, not convex
        slopes = lower_convex_hull(e)
        hull = np.cumsum(slopes)
        assert np.all(np.diff(slopes) >= -1e-12)
        assert np.all(hull <= e + 1e-9)
        assert hull[-1] == pytest.approx(e[-1])  # the last point is always a vertex


def test_allocation_is_optimal_on_convex_curves():
    rng = np.random.default_rng(1)
    for _ in range(150):
        curves = [np.cumsum(np.sort(rng.random(rng.integers(1, 6)))) for _ in range(3)]
        budget = int(rng.integers(0, sum(c.size for c in curves) + 1))
        counts = allocate_removals(curves, budget)
        assert counts.sum() == budget
        cost = lambda ks: sum(([0.0] + list(c))[k] for c, k in zip(curves, ks))  # noqa: E731
        best = min(cost(ks) for ks in itertools.product(*[range(c.size + 1) for c in curves]) if sum(ks) == budget)
        assert cost(counts) == pytest.approx(best)


def test_allocation_rejects_an_impossible_budget():
    with pytest.raises(ValueError):
        allocate_removals([np.ones(2)], 3)


@pytest.mark.parametrize("make", [plain_chain, depthwise_block])
def test_global_allocation_keeps_the_channel_budget(make):
    model = make()
    _, uniform = compress(model, prune=0.3, allocation="uniform", validate=False)
    _, glob = compress(model, prune=0.3, allocation="global", validate=False)
    removed = lambda r: sum(l["channels_before"] - l["channels_after"] for l in r.layers if "channels_before" in l)  # noqa: E731
    assert removed(glob) == removed(uniform) > 0
    for layer in glob.layers:
        if "channels_before" in layer:
            assert layer["channels_before"] - layer["channels_after"] <= removal_cap(0.3) * layer["channels_before"]
            assert layer.get("allocation", "global") == "global"


def redundant_then_informative_model():
    """conv(3->8) -> relu -> conv(8->8) -> relu -> conv(8->6); channels 4..7 of the first conv are positive
    multiples of channels 0..3 (weights and bias), the second conv's channels are independent."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w[4:] = w[:4] * np.array([2.0, 0.5, 1.5, 3.0], np.float32)[:, None, None, None]
    b = ModelBuilder((1, 3, 10, 10), seed=8)
    x = b.conv("input", 8, weight=w, bias=False)
    x = b.conv(b.relu(x), 8)
    return b.build(b.conv(b.relu(x), 6))


def test_global_allocation_takes_the_redundant_channels_first():
    model = redundant_then_informative_model()
    x = random_input(model)
    errors, removed = {}, {}
    for allocation in ("uniform", "global"):
        out, report = compress(model, prune=0.25, allocation=allocation, ridge=0.0, validate=False)
        errors[allocation] = rel_error(run(model, x), run(out, x))
        removed[allocation] = [l["channels_before"] - l["channels_after"] for l in report.layers if "channels_before" in l]
    assert removed["uniform"] == [2, 2]
    assert removed["global"] == [4, 0]
    assert errors["global"] < 1e-4 < errors["uniform"]
