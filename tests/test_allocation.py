"""Global allocation of the pruning budget: the hull/water-filling step is exact, the budget is kept,
and redundant channels are taken before informative ones."""
import itertools

import numpy as np
import pytest

from onnx_udfc import compress
from onnx_udfc.numerics.selection import (BackwardGreedy, aligned_removal, allocate_greedily, effective_multiple,
                                         greedy_removal_order)
from onnx_udfc.passes.allocate import AlignedSteps, removal_cap
from onnx_udfc.stats.model import StatisticsModel

from builders import (ModelBuilder, calibrate_batchnorm, conv_bn_relu, depthwise_block, plain_chain, random_input,
                      rel_error, run)


class CurveState:
    """A layer whose k-th removal costs marginal[k] (the peek/step protocol of `allocate_greedily`)."""

    def __init__(self, marginal):
        self.marginal, self.k = list(marginal), 0

    def peek(self):
        return (1, self.marginal[self.k]) if self.k < len(self.marginal) else (1, np.inf)

    def step(self):
        self.k += 1


def test_greedy_allocation_is_optimal_on_convex_curves():
    rng = np.random.default_rng(1)
    for _ in range(150):
        marginals = [np.sort(rng.random(rng.integers(1, 6))) for _ in range(3)]
        budget = int(rng.integers(0, sum(m.size for m in marginals) + 1))
        counts = allocate_greedily([CurveState(m) for m in marginals], budget)
        assert counts.sum() == budget
        cost = lambda ks: sum(m[:k].sum() for m, k in zip(marginals, ks))  # noqa: E731
        best = min(cost(ks) for ks in itertools.product(*[range(m.size + 1) for m in marginals]) if sum(ks) == budget)
        assert cost(counts) == pytest.approx(best)


def test_greedy_allocation_stops_when_every_layer_is_exhausted():
    assert list(allocate_greedily([CurveState([1.0]), CurveState([2.0, 3.0])], 5)) == [1, 2]


def test_backward_greedy_steps_match_the_batch_order():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 12))
    cov, v = a @ a.T + 0.1 * np.eye(30), rng.standard_normal((8, 30))
    order, errors = greedy_removal_order(cov, v.T @ v, 20, ridge=0.1)
    greedy = BackwardGreedy(cov, v.T @ v, 25, ridge=0.1)
    steps = [greedy.step() for _ in range(20)]
    assert steps == list(order)
    np.testing.assert_allclose(greedy.errors[:20], errors)
    # the running error equals tr(G_DD Q_DD^-1) recomputed from scratch
    q = np.linalg.inv(cov + 0.1 * np.mean(np.diag(cov)) * np.eye(30))
    d = np.asarray(steps)
    g = v.T @ v
    assert errors[-1] == pytest.approx(np.trace(g[np.ix_(d, d)] @ np.linalg.inv(q[np.ix_(d, d)])), rel=1e-8)


@pytest.mark.parametrize("make", [plain_chain, depthwise_block])
def test_global_allocation_keeps_the_channel_budget(make):
    model = make()
    _, uniform = compress(model, channel_multiple=1, prune=0.3, allocation="uniform", validate=False)
    _, glob = compress(model, channel_multiple=1, prune=0.3, allocation="global", validate=False)
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
        out, report = compress(model, channel_multiple=1, prune=0.25, allocation=allocation, ridge=0.0, validate=False)
        errors[allocation] = rel_error(run(model, x), run(out, x))
        removed[allocation] = [l["channels_before"] - l["channels_after"] for l in report.layers if "channels_before" in l]
    assert removed["uniform"] == [2, 2]
    assert removed["global"] == [4, 0]
    assert errors["global"] < 1e-4 < errors["uniform"]


@pytest.mark.parametrize("n, n_remove, multiple, expected", [
    (16, 4, 8, 0),  # keep 12: 8 and 16 are equally near, more is kept
    (16, 5, 8, 8),  # keep 11 -> 8
    (32, 9, 8, 8),  # keep 23 -> 24
    (12, 3, 8, 4),  # a width that is no multiple: 8 or all 12
    (100, 30, 8, 28),  # keep 70 -> 72
    (10, 3, 1, 3),  # off
    (64, 60, 8, 56),  # at least one block stays
])
def test_aligned_removal(n, n_remove, multiple, expected):
    assert aligned_removal(n, n_remove, multiple) == expected
    assert (n - expected) % multiple == 0 or expected == 0


def test_aligned_removal_respects_the_cap():
    assert aligned_removal(64, 40, 8, max_remove=40) == 40  # keep 24
    assert aligned_removal(64, 37, 16, max_remove=40) == 32  # keep 27 -> 32 (16 would remove 48 > cap)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_pruned_widths_are_multiples_of_the_channel_multiple(allocation):
    model = depthwise_block()  # 48 expanded channels
    _, report = compress(model, prune=0.3, allocation=allocation, channel_multiple=8, validate=False)
    pruned = [l for l in report.layers if l.get("channels_after", 0) < l.get("channels_before", 0)]
    wide = [l for l in pruned if l["channels_before"] >= 32]  # narrower chains are pruned channel by channel
    assert wide and all(l["channels_after"] % 8 == 0 for l in wide)


def test_aligned_steps_keep_multiples_and_price_per_channel():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((44, 10))
    cov, v = a @ a.T + 0.1 * np.eye(44), rng.standard_normal((5, 44))
    steps = AlignedSteps(BackwardGreedy(cov, v.T @ v, 30, ridge=0.1), multiple=8)
    size, cost = steps.peek()
    assert size == 4  # 44 -> 40 first
    assert cost == pytest.approx(steps.greedy.errors[3] / 4)
    steps.step()
    for _ in range(3):  # 40 -> 32 -> 24 -> 16
        assert steps.peek()[0] == 8 and np.isfinite(steps.peek()[1])
        steps.step()
    assert steps.peek()[1] == np.inf  # 16 -> 8 would remove 36 > 30
    assert steps.plan().n_remove == 28


def test_small_layers_are_not_forced_past_their_share():
    """16-channel layers are not cut to 8 by rounding: chains under 4 blocks go channel by channel."""
    model = plain_chain()  # 16, 32, 32 channels
    _, report = compress(model, prune=0.3, channel_multiple=8, validate=False)
    layers = [l for l in report.layers if "channels_before" in l]
    assert all(l["channels_after"] % 8 == 0 for l in layers if l["channels_before"] >= 32)
    assert effective_multiple(16, 8) == 1 and effective_multiple(32, 8) == 8
    removed = sum(l["channels_before"] - l["channels_after"] for l in layers)
    budget = sum(int(0.3 * l["channels_before"]) for l in layers)
    assert budget <= removed < budget + 8


def test_a_large_multiple_falls_back_to_8_on_narrow_chains():
    """With multiple 16, chains of 32-63 channels keep multiples of 8 (not arbitrary widths), wider ones of 16."""
    assert [effective_multiple(n, 16) for n in (16, 31, 32, 48, 63, 64, 96)] == [1, 1, 8, 8, 8, 16, 16]
    assert [effective_multiple(n, 32) for n in (32, 64, 127, 128)] == [8, 16, 16, 32]
    model = plain_chain()  # 16, 32, 32 channels
    _, report = compress(model, prune=0.3, channel_multiple=16, validate=False)
    widths = [l["channels_after"] for l in report.layers if l.get("channels_before", 0) >= 32]
    assert widths and all(w % 8 == 0 for w in widths), widths


class _Moments(StatisticsModel):
    def __init__(self, variances):
        self.variances = variances

    def tensor_moments(self, tensor):
        v = self.variances.get(tensor)
        return None if v is None else (np.zeros(len(v)), np.asarray(v, dtype=np.float64))


def _share(nodes, variances, consumer_output="y", measured=None):
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from onnx_udfc.ir.graph import Graph
    from onnx_udfc.passes.allocate import residual_share

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2])
                                           for n in ("x", "skip", "other")],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)])
    g = Graph(helper.make_model(graph))
    consumer = g.producer_of(consumer_output)
    stats = _Moments(variances)
    if measured is not None:
        from onnx_udfc.stats.layer_inputs import MeasuredInputs

        stats = MeasuredInputs(stats, measured, samples=8)
    return residual_share(SimpleNamespace(graph=g, stats=stats), consumer)


def test_residual_share_is_the_branch_share_of_the_sum_variance():
    from onnx import helper

    conv = helper.make_node("Identity", ["x"], ["y"])
    add = helper.make_node("Add", ["y", "skip"], ["s"])
    share = _share([conv, add], {"y": [1.0, 4.0, 0.0, 2.0], "s": [2.0, 5.0, 3.0, 1.0]})
    np.testing.assert_allclose(share, [0.5, 0.8, 1e-3, 1.0])  # floored at MIN_RESIDUAL_SHARE, capped at 1
    # no residual sum, or the output read twice, or moments unknown: no share
    relu = helper.make_node("Relu", ["y"], ["s"])
    assert _share([conv, relu], {"y": [1.0], "s": [1.0]}) is None
    second = helper.make_node("Add", ["y", "other"], ["t"])
    assert _share([conv, add, second], {"y": [1.0], "s": [2.0], "t": [2.0]}) is None
    assert _share([conv, add], {"y": [1.0, 1.0]}) is None


def test_residual_share_reads_both_variances_from_the_model_that_prices_the_chains():
    """Folded models at 5 bits or fewer measure the quantizer's inputs (`MeasuredInputs`): the sum feeding the
    next layer is measured, the branch is not. The share must not divide the propagated branch variance by the
    measured sum variance (another source, another scale): both come from the base model."""
    from onnx import helper

    conv = helper.make_node("Identity", ["x"], ["y"])
    add = helper.make_node("Add", ["y", "skip"], ["s"])
    variances = {"y": [1.0, 4.0], "s": [2.0, 5.0]}
    measured = {"s": (np.zeros(2), np.array([200.0, 500.0]))}
    np.testing.assert_allclose(_share([conv, add], variances, measured=measured), [0.5, 0.8])
    np.testing.assert_allclose(_share([conv, add], variances), [0.5, 0.8])


def test_residual_share_after_a_relu_on_the_sum_counts_the_error_that_passes_it():
    """Post-activation ResNet: s = y + skip is read by a ReLU. A small error in s reaches relu(s) where s > 0
    (P = 1/2 for a zero-mean s), against Var[relu(s)] = (1/2 - 1/(2 pi)) Var[s]."""
    from onnx import helper

    conv = helper.make_node("Identity", ["x"], ["y"])
    add = helper.make_node("Add", ["y", "skip"], ["s"])
    relu = helper.make_node("Relu", ["s"], ["r"])
    var_y, var_s = np.array([1.0, 4.0, 1.0]), np.array([2.0, 20.0, 1.0])
    share = _share([conv, add, relu], {"y": var_y, "s": var_s})
    expected = np.minimum(var_y * 0.5 / ((0.5 - 0.5 / np.pi) * var_s), 1.0)
    np.testing.assert_allclose(share, expected, rtol=1e-9)
    assert share[0] > 1.0 / 2.0  # more than the share of the sum's variance: the ReLU halves the error less
    # than it shrinks the variance
    # a sum read by more than the activation: the share of the sum's variance, as without one
    other = helper.make_node("Identity", ["s"], ["t"])
    np.testing.assert_allclose(_share([conv, add, relu, other], {"y": var_y, "s": var_s}), var_y / var_s)


def branch_beside_a_strong_skip_model():
    """stem -> [chain A: conv-bn-relu -> conv-bn] + skip (1x1 conv-bn, gamma x 10) -> relu -> chain B
    (conv-bn-relu -> conv) -> GAP -> Gemm (chain C): chain A's consumer output is a small part of the residual sum.
    Returns (model, name of chain A's consumer node)."""
    from onnx import numpy_helper

    b = ModelBuilder((1, 3, 12, 12), seed=3)
    stem = conv_bn_relu(b, "input", 16)
    branch_conv = b.conv(conv_bn_relu(b, stem, 16), 16, bias=False)
    skip = b.bn(b.conv(stem, 16, k=1, bias=False))
    x = b.relu(b.add(skip, b.bn(branch_conv)))
    y = b.gemm(b.gap_flatten(b.conv(conv_bn_relu(b, x, 16), 16)), 10)
    model = calibrate_batchnorm(b.build(y))
    inits = {t.name: t for t in model.graph.initializer}
    skip_bn = next(n for n in model.graph.node if n.output[0] == skip)
    gamma = inits[skip_bn.input[1]]
    gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 10.0, gamma.name))
    return model, branch_conv + "_node"


def test_residual_share_moves_removals_to_the_branch_beside_a_strong_skip():
    model, branch_consumer = branch_beside_a_strong_skip_model()
    removed = {}
    for share in (False, True):
        _, report = compress(model, channel_multiple=1, prune=0.3, residual_share=share, validate=False)
        removed[share] = {l["consumer"]: l["channels_before"] - l["channels_after"]
                          for l in report.layers if "channels_before" in l}
        shares = {l["consumer"]: l.get("residual_share") for l in report.layers if "channels_before" in l}
        # the report gives the branch's mean share (about 1 / (1 + 100) with the skip's gamma x 10), only there
        assert [c for c, v in shares.items() if v is not None] == ([branch_consumer] if share else [])
        assert not share or 0 < shares[branch_consumer] < 0.1
    assert branch_consumer in removed[True], removed
    assert sum(removed[True].values()) == sum(removed[False].values()) > 0
    # priced against the sum, whose variance is mostly the skip's, the branch takes the budget up to its cap
    assert removed[True][branch_consumer] > removed[False][branch_consumer]
    assert removed[True][branch_consumer] == int(np.floor(removal_cap(0.3) * 16))
