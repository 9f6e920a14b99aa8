"""The statistics models: moment propagation, analytic chain covariances, synthetic samples."""
import numpy as np
import onnx
import onnxruntime as ort

from builders import (depthwise_block, fold_all_batchnorm, plain_chain, random_input, rel_error, residual_block,
                      run)
from onnx_udfc import compress
from onnx_udfc.config import Options
from onnx_udfc.ir.graph import Graph
from onnx_udfc.ir.shapes import infer_static_shapes, resolve_input_shapes
from onnx_udfc.passes.base import PassContext
from onnx_udfc.passes.compress import StatisticsPass
from onnx_udfc.passes.fold_bn import FoldBatchNormPass
from onnx_udfc.passes.normalize import NormalizeGraphPass
from onnx_udfc.stats.sampled import batch_statistics_probe, image_prior_noise, pink_noise


def prepared(model, **options):
    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = PassContext(graph=Graph(model), options=Options(**options), input_shapes=resolve_input_shapes(model),
                      original=original)
    for p in (NormalizeGraphPass(), FoldBatchNormPass(), StatisticsPass()):
        p.run(ctx)
    return ctx


def measured_chain_stats(model, chain, x):
    probe = batch_statistics_probe(model, [chain.last_stage.output], {}, batch_norm="running")
    a = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    a = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]).astype(np.float64)
    return a.mean(0), np.cov(a, rowvar=False)


def test_analytic_chain_statistics_match_calibrated_model():
    """BN calibrated on N(0,1) inputs: the predicted means/correlations follow the measured ones."""
    for model in (plain_chain(seed=2), depthwise_block(seed=3)):
        ctx = prepared(onnx.load_from_string(model.SerializeToString()))
        x = random_input(model, batch=64, seed=4)
        for chain in ctx.chains[:2]:
            mean, cov = ctx.stats.chain_statistics(chain)
            real_mean, real_cov = measured_chain_stats(model, chain, x)
            assert np.corrcoef(mean, real_mean)[0, 1] > 0.8
            sd, real_sd = np.sqrt(np.diag(cov)), np.sqrt(np.diag(real_cov))
            assert 0.6 < np.median(sd / real_sd) < 1.6
            iu = np.triu_indices(len(mean), 1)
            corr = cov / np.outer(sd, sd)
            real_corr = real_cov / np.outer(real_sd, real_sd)
            assert np.corrcoef(corr[iu], real_corr[iu])[0, 1] > 0.5


def test_pink_noise_is_standardised_and_spatially_correlated():
    x = pink_noise((4, 3, 32, 32), seed=1)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(2, 3)), 1, atol=1e-4)
    lag1 = np.mean(x[:, :, :, 1:] * x[:, :, :, :-1])
    assert 0.5 < lag1 < 0.99
    np.testing.assert_array_equal(x, pink_noise((4, 3, 32, 32), seed=1))


def test_image_prior_noise_varies_spectrum_contrast_and_brightness_per_image():
    x = image_prior_noise((64, 3, 32, 32), seed=1, exponents=(1.0, 2.0), contrast=(0.3, 1.0), offset_sd=0.3)
    assert x.dtype == np.float32 and x.shape == (64, 3, 32, 32)
    np.testing.assert_array_equal(x, image_prior_noise((64, 3, 32, 32), seed=1))
    assert not np.array_equal(x, image_prior_noise((64, 3, 32, 32), seed=2))
    sd = x.std(axis=(2, 3))  # (B, C): one contrast per image, shared by its channels, within the prior's range
    assert sd.min() > 0.3 - 1e-3 and sd.max() < 1.0 + 1e-3 and sd.std() > 0.1
    np.testing.assert_allclose(sd, sd[:, :1].repeat(3, axis=1), rtol=1e-3)
    mean = x.mean(axis=(2, 3))  # one brightness offset per image, shared by its channels
    np.testing.assert_allclose(mean, mean[:, :1].repeat(3, axis=1), atol=1e-5)
    assert 0.15 < mean[:, 0].std() < 0.45
    # the spectral exponent varies: lag-1 correlation (smoothness) spreads over images
    z = (x - mean[:, :, None, None]) / sd[:, :, None, None]
    lag1 = np.mean(z[:, :, :, 1:] * z[:, :, :, :-1], axis=(1, 2, 3))
    assert lag1.max() - lag1.min() > 0.1
    # exponent fixed at 1, contrast 1, no offset: exactly the standardised pink noise of the same spectrum
    y = image_prior_noise((4, 3, 16, 16), seed=3, exponents=(1.0, 1.0), contrast=(1.0, 1.0), offset_sd=0.0)
    np.testing.assert_allclose(y.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(2, 3)), 1, atol=1e-4)


def _classifier_head(model: onnx.ModelProto, weight_scale: float, bias_boost: float) -> onnx.ModelProto:
    """`model` with its Gemm head's weight scaled and `bias_boost` added to class 3's bias."""
    from onnx import numpy_helper

    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    for init in model.graph.initializer:
        if init.name in (gemm.input[1], gemm.input[2]):
            value = numpy_helper.to_array(init).copy()
            if init.name == gemm.input[1]:
                value *= weight_scale
            else:
                value[3] += bias_boost
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    return model


def test_auto_synthetic_inputs_take_the_prior_where_pink_noise_saturates_the_classifier():
    """`synthetic_inputs="auto"` (default): a BN-folded classifier that gives every pink-noise image one class
    with confidence >= 0.9 is probed on image-prior samples (as `"prior"`, selection ridge included); one
    whose answers stay uncertain on image-prior samples chosen by its answers (as `"diverse"`). Explicit
    choices are kept."""
    from builders import fold_all_batchnorm

    from onnx_udfc.stats.sampled import pink_saturates

    saturated = _classifier_head(fold_all_batchnorm(plain_chain(seed=7)), 1.0, 100.0)
    uncertain = _classifier_head(fold_all_batchnorm(plain_chain(seed=7)), 1e-3, 0.0)
    assert pink_saturates(saturated, "input", (1, 3, 16, 16))
    assert not pink_saturates(uncertain, "input", (1, 3, 16, 16))
    for model, expected in ((saturated, "prior"), (uncertain, "diverse")):
        outputs = {kind: compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=6,
                                  statistics="synthetic", samples=16, validate=False,
                                  **({} if kind == "default" else {"synthetic_inputs": kind}))
                   for kind in ("default", "prior", "pink", "diverse")}
        blobs = {kind: out.SerializeToString() for kind, (out, _) in outputs.items()}
        assert len({blobs["prior"], blobs["pink"], blobs["diverse"]}) == 3
        assert blobs["default"] == blobs[expected]
        source = outputs["default"][1].statistics_source
        assert "random spectral exponent" in source
        assert ("saturates" in source) == (expected == "prior")
        assert ("chosen from 32 by the model's answers" in source) == (expected == "diverse")
        assert "saturates" not in outputs[expected][1].statistics_source  # explicit: no check


def test_pruning_probe_takes_prior_images_at_the_probe_contrast():
    """`synthetic_inputs="prior"`: the chain statistics are the moments of image-prior samples at
    `PROBE_CONTRAST` (the quantizer-input probe keeps `PRIOR_CONTRAST`, see
    `test_folded_models_quantized_at_low_bit_widths_measure_the_quantizer_inputs`), and the report says so."""
    from builders import fold_all_batchnorm

    from onnx_udfc.stats.sampled import PRIOR_CONTRAST, PROBE_CONTRAST

    assert PROBE_CONTRAST[1] < PRIOR_CONTRAST[1]
    folded = fold_all_batchnorm(plain_chain(seed=7))
    ctx = prepared(onnx.load_from_string(folded.SerializeToString()), prune=0.3, statistics="synthetic",
                   synthetic_inputs="prior", samples=16)
    assert "contrast in [%g, %g]" % PROBE_CONTRAST in ctx.stats.source
    chain = ctx.chains[0]
    mean, cov = ctx.stats.chain_statistics(chain)
    for contrast, same in ((PROBE_CONTRAST, True), (PRIOR_CONTRAST, False)):
        x = image_prior_noise((16, 3, 16, 16), seed=0, contrast=contrast)
        real_mean, real_cov = measured_chain_stats(folded, chain, x)
        scale = np.abs(real_cov).max()
        assert np.allclose(cov, real_cov, rtol=0.05, atol=0.01 * scale) == same
        assert np.allclose(mean, real_mean, rtol=1e-3, atol=1e-4 * np.abs(real_mean).max()) == same


def test_saturation_is_confidence_whatever_the_number_of_classes():
    """`saturated`: confident answers to the noise (mean top probability >= SATURATION_CONFIDENCE), in one
    class or several (a retrained small VGG answered pink noise with two classes at 0.945); uncertain
    answers in one class are not saturation; no class scores: never."""
    from onnx_udfc.stats.sampled import SATURATION_CONFIDENCE, saturated

    def answers(classes, confidence, k=10):
        p = np.full((len(classes), k), (1.0 - confidence) / (k - 1))
        p[np.arange(len(classes)), classes] = confidence
        return p

    assert saturated(answers([3] * 16, 0.99))
    assert saturated(answers([3] * 12 + [5] * 4, 0.95))
    assert not saturated(answers([3] * 16, SATURATION_CONFIDENCE - 0.05))
    assert not saturated(answers(list(range(10)) + [0] * 6, 0.45))
    assert not saturated(None)


def test_default_sample_count_doubles_for_small_inputs():
    """`samples=None` (default): 128 synthetic images for inputs of at most 128 x 128 pixels, 64 above or
    where the size is unknown; an explicit count is kept, and the report says how many were used."""
    from onnx_udfc.stats.sampled import default_samples

    assert default_samples({"x": (1, 1, 28, 28)}) == 128
    assert default_samples({"x": (1, 3, 128, 128)}) == 128
    assert default_samples({"x": (1, 3, 224, 224)}) == 64
    assert default_samples({"x": (1, 3, "h", "w")}) == 64
    assert default_samples({"x": (1, 76, 32)}) == 64
    assert default_samples({"a": (1, 3, 16, 16), "b": (1, 3, 16, 16)}) == 64
    model = plain_chain(seed=7)
    _, report = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, statistics="synthetic",
                         validate=False)
    assert "from 128 synthetic" in report.statistics_source
    _, report = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, statistics="synthetic",
                         samples=16, validate=False)
    assert "from 16 synthetic" in report.statistics_source


def _reference_diverse_choice(probabilities, count):
    """`diverse_choice` spelled out: rounds over the classes, each class's next most confident image."""
    confidence, classes = probabilities.max(axis=1), probabilities.argmax(axis=1)
    per_class = {}
    for i in sorted(range(len(classes)), key=lambda i: -confidence[i]):
        per_class.setdefault(classes[i], []).append(i)
    order = sorted(per_class, key=lambda c: -confidence[per_class[c][0]])
    taken, round_ = [], 0
    while len(taken) < count:
        for c in order:
            if round_ < len(per_class[c]) and len(taken) < count:
                taken.append(per_class[c][round_])
        round_ += 1
    return sorted(taken)


def test_diverse_choice_takes_the_classes_in_turn_most_confident_first():
    from onnx_udfc.stats.sampled import diverse_choice

    # 6 images: class 0 three times (0.9, 0.8, 0.7), class 1 twice (0.95, 0.6), class 2 once (0.5)
    p = np.zeros((6, 3))
    for row, (cls, conf) in enumerate([(0, 0.8), (1, 0.6), (0, 0.9), (2, 0.5), (1, 0.95), (0, 0.7)]):
        p[row] = (1 - conf) / 2
        p[row, cls] = conf
    assert diverse_choice(p, 1).tolist() == [4]  # the most confident answer
    assert diverse_choice(p, 3).tolist() == [2, 3, 4]  # one of each class
    assert diverse_choice(p, 5).tolist() == [0, 1, 2, 3, 4]  # second round: class 1 (0.6), class 0 (0.8)
    assert diverse_choice(p, 6).tolist() == list(range(6))
    rng = np.random.default_rng(0)
    for classes, rows, count in ((3, 40, 17), (50, 128, 64), (1000, 128, 64), (5, 128, 64)):
        logits = rng.standard_normal((rows, classes)) * 3 + np.linspace(0, 4, classes)  # a few classes dominate
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        q = e / e.sum(axis=1, keepdims=True)
        chosen = diverse_choice(q, count)
        assert chosen.tolist() == _reference_diverse_choice(q, count)
        answered = q.argmax(axis=1)
        # as many classes as the candidates answer with (up to count), never two of a class before one of each
        assert len(set(answered[chosen])) == min(count, len(set(answered)))


def test_diverse_inputs_need_class_scores():
    """A folded model whose output is a feature map (a detector, an encoder) keeps pink noise under "auto";
    asked for "diverse", it gets plain image-prior samples, and the statistics say why."""
    from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu, fold_all_batchnorm

    b = ModelBuilder((1, 3, 16, 16), seed=3)
    x = conv_bn_relu(b, conv_bn_relu(b, "input", 16), 32)
    model = fold_all_batchnorm(calibrate_batchnorm(b.build(b.conv(x, 8, k=1))))
    blobs, sources = {}, {}
    for kind in ("auto", "pink", "prior", "diverse"):
        out, report = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=32,
                               statistics="synthetic", samples=16, validate=False, synthetic_inputs=kind)
        blobs[kind], sources[kind] = out.SerializeToString(), report.statistics_source
    assert blobs["auto"] == blobs["pink"] != blobs["prior"]
    assert blobs["diverse"] == blobs["prior"]
    assert "not class scores" in sources["diverse"] and "not class scores" not in sources["prior"]


def test_auto_synthetic_inputs_stay_pink_with_bn_kept():
    model = _classifier_head(plain_chain(seed=7), 1.0, 100.0)
    outputs = [compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=6, samples=16,
                        validate=False, **kwargs)[0].SerializeToString()
               for kwargs in ({}, {"synthetic_inputs": "pink"})]
    assert outputs[0] == outputs[1]


def test_synthetic_inputs_option_is_validated():
    import pytest

    from onnx_udfc.errors import UsageError

    with pytest.raises(UsageError, match="synthetic-inputs"):
        Options(synthetic_inputs="white").validate()


def test_batch_statistics_probe_makes_bn_outputs_follow_the_prior():
    model = plain_chain(seed=5)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    g = Graph(model)
    gamma, beta = g.constant(bn.input[1]), g.constant(bn.input[2])
    shapes = infer_static_shapes(model, {"input": (1, 3, 16, 16)})
    probe = batch_statistics_probe(model, [bn.output[0]], shapes, batch_norm="batch")
    (rewritten,) = [n for n in probe.graph.node if n.output[0] == bn.output[0]]
    assert rewritten.input[3:] != bn.input[3:]  # batch statistics, not the running ones
    x = 3.0 * pink_noise((8, 3, 16, 16), seed=2) + 1.0  # far from the data the BN was calibrated on
    z = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), beta, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), np.abs(gamma), rtol=1e-3)


def test_synthetic_statistics_compress_and_are_deterministic():
    model = plain_chain(seed=6)
    a, report = compress(model, prune=0.3, bits=6, statistics="synthetic", samples=16)
    b, _ = compress(model, prune=0.3, bits=6, statistics="synthetic", samples=16)
    assert a.SerializeToString() == b.SerializeToString()
    assert "pink-noise" in report.statistics_source
    x = random_input(model)
    assert rel_error(run(model, x), run(a, x)) < 0.5


def test_moment_propagation_without_bn_tracks_real_means():
    from builders import fold_all_batchnorm

    model = fold_all_batchnorm(plain_chain(seed=7))
    ctx = prepared(onnx.load_from_string(model.SerializeToString()))
    x = random_input(model, batch=64, seed=8)
    chain = ctx.chains[0]
    mean, _ = ctx.stats.chain_statistics(chain)
    real_mean, _ = measured_chain_stats(model, chain, x)
    assert np.corrcoef(mean, real_mean)[0, 1] > 0.8


def test_combined_statistics_average_analytic_and_synthetic():
    from onnx_udfc.numerics.covariance import cov_to_corr
    from onnx_udfc.stats.model import AnalyticStatistics

    model = plain_chain(seed=9)
    ctx = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3, statistics="combined")
    chain = ctx.chains[1]
    key = chain.last_stage.output
    a_mean, a_cov = AnalyticStatistics.chain_statistics(ctx.stats, chain)
    s_mean, s_cov = ctx.stats._measured[key]
    mean, cov = ctx.stats.chain_statistics(chain)
    # the average is kept in place of its halves (memory: one N x N matrix per chain, not two)
    assert key not in ctx.stats._measured and key not in ctx.stats._cache
    assert ctx.stats.chain_statistics(chain)[1] is cov
    np.testing.assert_allclose(mean, 0.5 * (a_mean + s_mean))
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(sd, 0.5 * (np.sqrt(np.diag(a_cov)) + np.sqrt(np.diag(s_cov))), rtol=1e-10)
    corr, _ = cov_to_corr(cov)
    np.testing.assert_allclose(corr, 0.5 * (cov_to_corr(a_cov)[0] + cov_to_corr(s_cov)[0]), atol=1e-10)
    assert np.linalg.eigvalsh(cov).min() > -1e-9


def test_tensor_covariance_follows_measured_covariances():
    """Conv outputs, residual sums and activations: predicted channel covariances against N(0,1) inputs."""
    from onnx import TensorProto, helper

    seen = set()
    for model in (residual_block(seed=1), depthwise_block(seed=1)):
        ctx = prepared(onnx.load_from_string(model.SerializeToString()))
        graph = ctx.graph
        names = [n.output[0] for n in graph.topological_nodes() if n.op_type in ("Conv", "Add", "Relu", "Clip")]
        predicted = {name: ctx.stats.tensor_covariance(name) for name in names}
        probe = onnx.ModelProto()
        probe.CopyFrom(graph.model)
        for name in names:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        x = random_input(model, batch=64, seed=4)
        measured = dict(zip([o.name for o in probe.graph.output], session.run(None, {"input": x})))
        kinds = set()
        for name in names:
            cov = predicted[name]
            if cov is None:
                assert graph.producer_of(name).op_type == "Conv"  # the depthwise conv: no channel covariance
                continue
            kinds.add(graph.producer_of(name).op_type)
            a = np.moveaxis(measured[name], 1, -1).reshape(-1, cov.shape[0]).astype(np.float64)
            real = np.cov(a, rowvar=False)
            sd, real_sd = np.sqrt(np.diag(cov)), np.sqrt(np.diag(real))
            assert 0.8 < np.median(sd / real_sd) < 1.25, name
            iu = np.triu_indices(cov.shape[0], 1)
            r = np.corrcoef((cov / np.outer(sd, sd))[iu], (real / np.outer(real_sd, real_sd))[iu])[0, 1]
            assert r > 0.4, (name, r)
        seen |= kinds
    assert seen == {"Conv", "Add", "Relu", "Clip"}


def test_rounding_auto_uses_error_feedback_at_low_bit_widths():
    """`auto`: error feedback where a layer is at 5 bits or fewer and its input covariance is modelled;
    the report names the rounding of every such layer, with the reason where it fell back."""
    model = depthwise_block(seed=2)
    _, report = compress(onnx.load_from_string(model.SerializeToString()), bits=4, validate=False)
    rounding = [layer.get("rounding") for layer in report.layers if layer.get("bits") == 4]
    assert rounding == ["error-feedback"]  # the projection; expansion, depthwise and Gemm stay at 8 bits
    _, report2 = compress(onnx.load_from_string(model.SerializeToString()), bits=4, depthwise_bits=None,
                          validate=False)
    assert "balanced (grouped conv: no cross-channel covariance)" in [layer.get("rounding") for layer in report2.layers]
    _, report6 = compress(onnx.load_from_string(model.SerializeToString()), bits=6, validate=False)
    assert not any(layer.get("rounding") for layer in report6.layers)
    out_forced, report_forced = compress(onnx.load_from_string(model.SerializeToString()), bits=6,
                                         rounding="error-feedback", validate=False)
    out_balanced, _ = compress(onnx.load_from_string(model.SerializeToString()), bits=6, rounding="balanced",
                               validate=False)
    assert any(layer.get("rounding") == "error-feedback" for layer in report_forced.layers)
    assert out_forced.SerializeToString() != out_balanced.SerializeToString()


def test_probe_statistics_do_not_depend_on_threads(monkeypatch):
    import onnx_udfc.stats.sampled as sampled
    from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu

    b = ModelBuilder((1, 3, 64, 64), seed=3)
    x = conv_bn_relu(b, "input", 32)
    x = conv_bn_relu(b, x, 64)
    x = conv_bn_relu(b, x, 64, group=64)
    x = conv_bn_relu(b, x, 64)
    model = calibrate_batchnorm(b.build(b.gemm(b.gap_flatten(x), 10)))
    measured = {}
    for threads in (1, 2):
        monkeypatch.setattr(sampled, "probe_threads", lambda: threads)
        ctx = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3, statistics="synthetic",
                       samples=16)
        measured[threads] = ctx.stats._measured
    assert measured[1] and measured[1].keys() == measured[2].keys()
    for name, (mean, cov) in measured[1].items():
        assert np.array_equal(mean, measured[2][name][0]) and np.array_equal(cov, measured[2][name][1])


def test_probed_shape_falls_back_to_the_layer_before_the_activation():
    from onnx_udfc.stats.sampled import probed_shape

    checked = 0
    for model in (plain_chain(seed=1), depthwise_block(seed=1)):
        ctx = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3)
        for chain in ctx.chains:
            truth = ctx.shapes[chain.last_stage.output]
            assert probed_shape(chain, ctx.shapes) == truth
            layer = chain.depthwise if chain.depthwise is not None else chain.producer
            if chain.last_stage.pools or layer.output[0] == chain.last_stage.output:  # nothing to fall back on
                continue
            # inference stopped before the activations (as on TF-style exports): same shape from the layers
            partial = {k: v for k, v in ctx.shapes.items() if k != chain.last_stage.output}
            assert probed_shape(chain, partial) == truth
            checked += 1
    assert checked >= 3


def test_gram_sums_in_onnxruntime_equal_the_feature_maps_own():
    """`gram_outputs` (sums and Gram matrix computed inside onnxruntime, positions subsampled) gives the
    moments `_Accumulator.add` takes from the whole feature maps returned to numpy."""
    from onnx_udfc.stats.sampled import measure_channel_moments, position_step

    from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu

    b = ModelBuilder((4, 3, 64, 64), seed=7)
    x = conv_bn_relu(b, "input", 16)
    x = conv_bn_relu(b, b.maxpool(x), 24)
    model = calibrate_batchnorm(b.build(b.gemm(b.gap_flatten(x), 10)))
    shapes = infer_static_shapes(model, {"input": (4, 3, 64, 64)})
    names = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    assert names and any(position_step(int(np.prod(shapes[n][2:]))) > 1 for n in names)  # a strided map too
    batches = [pink_noise((4, 3, 64, 64), seed=s) for s in (0, 1)]
    in_ort = measure_channel_moments(model, names, shapes, shapes, iter(batches), "input")
    in_numpy = measure_channel_moments(model, names, shapes, {}, iter(batches), "input")
    for name in names:
        (m1, c1), (m2, c2) = in_ort[name], in_numpy[name]
        assert m1.shape == (shapes[name][1],) and c1.shape == (shapes[name][1],) * 2
        np.testing.assert_allclose(m1, m2, rtol=1e-4, atol=1e-5 * np.abs(m2).max())
        np.testing.assert_allclose(c1, c2, rtol=1e-4, atol=1e-5 * np.abs(c2).max())


def test_probe_sessions_do_not_keep_the_model_bytes():
    """onnxruntime's InferenceSession keeps the bytes it was made from; `inference_session` drops them
    (a second copy of the whole model during the statistics probe and the validation)."""
    from onnx_udfc.ort_session import inference_session

    model = plain_chain(seed=2)
    data = model.SerializeToString()
    session = inference_session(data, ort.SessionOptions())
    assert getattr(session, "_model_bytes", None) is None
    x = {model.graph.input[0].name: random_input(model, batch=2, seed=1)}
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(session.run(None, x)[0], expected[0])


def test_chains_through_a_global_pool_are_priced_on_the_pooled_vectors():
    """Synthetic statistics: the GAP -> Flatten -> Gemm chain is selected on the covariance of the pooled
    vectors (one row per image, what the Gemm reads) and compensated with the positions' covariance; other
    chains and BN-kept (combined) statistics price on the positions."""
    from onnx_udfc.stats.sampled import SampledStatistics

    model = plain_chain(seed=4)
    ctx = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3)
    x = random_input(model, batch=24, seed=6)
    stats = SampledStatistics(ctx.graph, ctx.shapes, ctx.priors, model, ctx.chains, ctx.input_shapes, inputs=x,
                              batch_norm="running")
    gap_chain = next(c for c in ctx.chains if c.consumer.op_type == "Gemm")
    pooled = ctx.graph.producer_of(gap_chain.consumer.input[0]).input[0]  # Flatten's input: the GAP output
    probe = batch_statistics_probe(model, [pooled], {}, batch_norm="running")
    rows = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0].reshape(len(x), -1).astype(np.float64)
    mean, cov = stats.selection_statistics(gap_chain)
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(rows, rowvar=False, bias=True), rtol=1e-3, atol=1e-6)
    positions_mean, positions_cov = stats.chain_statistics(gap_chain)
    real_mean, real_cov = measured_chain_stats(model, gap_chain, x)
    np.testing.assert_allclose(positions_cov, real_cov, rtol=0.05, atol=1e-4 * np.abs(real_cov).max())
    assert np.trace(cov) < 0.8 * np.trace(positions_cov)  # the pool averaged the within-image variation away
    other = next(c for c in ctx.chains if c is not gap_chain)
    assert stats.selection_statistics(other) is stats.chain_statistics(other)
    combined = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3, statistics="combined").stats
    chain = next(c for c in combined._by_output.values() if c.consumer.op_type == "Gemm")
    assert combined.selection_statistics(chain) is combined.chain_statistics(chain)


def test_averaged_moments_weigh_means_deviations_and_correlations():
    from onnx_udfc.numerics.covariance import cov_to_corr
    from onnx_udfc.stats.sampled import averaged_moments

    rng = np.random.default_rng(3)
    a, s = rng.standard_normal((7, 40)), 3.0 * rng.standard_normal((7, 40)) + 1.0
    analytic = (rng.standard_normal(7), np.cov(a))
    measured = (rng.standard_normal(7), np.cov(s))
    copies = [x.copy() for x in analytic + measured]
    mean, cov = averaged_moments(analytic, measured)
    for before, after in zip(copies, analytic + measured):  # the inputs are left as they were
        np.testing.assert_array_equal(before, after)
    sd = 0.5 * (np.sqrt(np.diag(analytic[1])) + np.sqrt(np.diag(measured[1])))
    corr = 0.5 * (cov_to_corr(analytic[1])[0] + cov_to_corr(measured[1])[0])
    np.testing.assert_allclose(mean, 0.5 * (analytic[0] + measured[0]))
    np.testing.assert_allclose(cov, corr * np.outer(sd, sd), rtol=1e-12, atol=1e-12)
    mean, cov = averaged_moments(analytic, measured, weight=0.75)
    sd = 0.75 * np.sqrt(np.diag(analytic[1])) + 0.25 * np.sqrt(np.diag(measured[1]))
    corr = 0.75 * cov_to_corr(analytic[1])[0] + 0.25 * cov_to_corr(measured[1])[0]
    np.testing.assert_allclose(mean, 0.75 * analytic[0] + 0.25 * measured[0])
    np.testing.assert_allclose(cov, corr * np.outer(sd, sd), rtol=1e-12, atol=1e-12)
    assert np.allclose(averaged_moments(analytic, measured, weight=1.0)[1], analytic[1])


def test_folded_depthwise_chains_are_selected_on_the_average_with_the_analytic_model():
    """Synthetic statistics (BN folded): a chain through a depthwise conv is priced on the average of the
    analytic model and the samples and compensated with the samples; a chain without one is priced on the
    samples; the analytic half is not kept per chain."""
    from onnx_udfc.stats.model import AnalyticStatistics
    from onnx_udfc.stats.sampled import DEPTHWISE_SELECTION_ANALYTIC_WEIGHT, SampledStatistics, averaged_moments

    model = fold_all_batchnorm(depthwise_block(seed=2))
    ctx = prepared(onnx.load_from_string(model.SerializeToString()), prune=0.3)
    assert isinstance(ctx.stats, SampledStatistics) and type(ctx.stats).averaged_depthwise_selection
    chain = next(c for c in ctx.chains if c.depthwise is not None)
    key = chain.last_stage.output
    measured = ctx.stats.chain_statistics(chain)
    assert measured is ctx.stats._measured[key]
    mean, cov = ctx.stats.selection_statistics(chain)
    assert key not in ctx.stats._cache
    expected = averaged_moments(AnalyticStatistics.chain_statistics(ctx.stats, chain), measured,
                                DEPTHWISE_SELECTION_ANALYTIC_WEIGHT)
    np.testing.assert_allclose(mean, expected[0])
    np.testing.assert_allclose(cov, expected[1])
    assert not np.allclose(cov, measured[1], rtol=0.05)  # the analytic half moved it
    assert ctx.stats.chain_statistics(chain) is measured  # the compensation reads the samples
    assert "1 chain(s) through a depthwise conv selected on the average with the analytic model" in ctx.stats.source
    plain = fold_all_batchnorm(plain_chain(seed=4))
    plain_ctx = prepared(onnx.load_from_string(plain.SerializeToString()), prune=0.3)
    other = next(c for c in plain_ctx.chains if c.depthwise is None and c.consumer.op_type != "Gemm")
    assert plain_ctx.stats.selection_statistics(other) is plain_ctx.stats.chain_statistics(other)


def test_folded_models_quantized_at_low_bit_widths_measure_the_quantizer_inputs(monkeypatch):
    """BN folded, 5 bits or fewer: every linear layer's input mean and covariance come from synthetic
    image-prior samples pushed through the model (the same moments onnxruntime gives on those images);
    covariances only where error feedback reads them; pruning runs keep their chain statistics and restrict
    the measured inputs to the kept channels; 6 bits, `analytic`, BN-kept and shallow models do not measure."""
    import onnx_udfc.passes.compress as compress_pass
    from onnx_udfc.stats.layer_inputs import MIN_LAYERS, MeasuredInputs
    from onnx_udfc.stats.model import AnalyticStatistics
    from onnx_udfc.stats.sampled import SampledStatistics, image_prior_batches

    from builders import fold_all_batchnorm

    folded = fold_all_batchnorm(plain_chain(seed=5))
    assert MIN_LAYERS > 4  # this model's four layers are too few by default
    assert not isinstance(prepared(onnx.load_from_string(folded.SerializeToString()), bits=4).stats, MeasuredInputs)
    monkeypatch.setattr(compress_pass, "MIN_LAYERS", 4)
    ctx = prepared(onnx.load_from_string(folded.SerializeToString()), bits=4, samples=16)
    stats = ctx.stats
    assert isinstance(stats, MeasuredInputs) and "quantizer input" in stats.source
    assert type(stats.base) is AnalyticStatistics
    convs = [n for n in ctx.graph.topological_nodes() if n.op_type in ("Conv", "Gemm")]
    assert stats.measured == len({n.input[0] for n in convs})
    x = np.concatenate(list(image_prior_batches((16, 3, 16, 16), seed=0, batch=2)))
    probe = batch_statistics_probe(folded, [n.input[0] for n in convs], {}, batch_norm="running")
    outs = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for node, a in zip(convs, outs):
        a = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]).astype(np.float64)
        mean, var = stats.input_moments(node)
        np.testing.assert_allclose(mean, a.mean(0), rtol=1e-4, atol=1e-5 * np.abs(a).max())
        np.testing.assert_allclose(var, a.var(0), rtol=1e-3, atol=1e-5 * a.var(0).max())
        grouped = int(next((at.i for at in node.attribute if at.name == "group"), 1)) > 1
        if node is not convs[0] and node is not convs[-1] and not grouped:  # first and last stay at 8 bits
            np.testing.assert_allclose(stats.input_covariance(node), np.cov(a, rowvar=False, bias=True),
                                       rtol=1e-3, atol=1e-5 * a.var(0).max())
    # covariances only where error feedback reads them: the first and last layers stay at 8 bits
    assert stats._inputs[convs[0].input[0]][1].ndim == 1 and stats._inputs[convs[1].input[0]][1].ndim == 2
    pruning = prepared(onnx.load_from_string(folded.SerializeToString()), bits=4, prune=0.3, samples=16)
    assert isinstance(pruning.stats, MeasuredInputs) and isinstance(pruning.stats.base, SampledStatistics)
    chain = pruning.chains[0]
    assert pruning.stats.chain_statistics(chain) is pruning.stats.base.chain_statistics(chain)
    consumer_input = chain.consumer.input[0]
    assert pruning.stats._inputs[consumer_input][1].ndim == 2
    full_mean, full_var = pruning.stats.input_moments(chain.consumer)
    kept = np.arange(0, chain.channels, 2)
    pruning.stats.restrict(chain.path, kept)
    mean, var = pruning.stats.tensor_moments(consumer_input)
    np.testing.assert_array_equal(mean, full_mean[kept])
    np.testing.assert_array_equal(var, full_var[kept])
    assert pruning.stats.tensor_covariance(consumer_input).shape == (kept.size, kept.size)
    for options in (dict(bits=6), dict(bits=6, prune=0.3), dict(bits=4, statistics="analytic")):
        other = prepared(onnx.load_from_string(folded.SerializeToString()), **options).stats
        assert not isinstance(other, MeasuredInputs)
    bn_kept = prepared(onnx.load_from_string(plain_chain(seed=5).SerializeToString()), bits=4).stats
    assert not isinstance(bn_kept, MeasuredInputs)  # BN kept: the BN prior


def test_gram_sums_with_unknown_positions_count_them_in_onnxruntime():
    """Where shape inference stops (TF-style pads) only the channels are known: all positions are summed and
    onnxruntime reports how many, giving the moments of the whole feature maps."""
    from onnx_udfc.stats.sampled import measure_channel_moments

    model = plain_chain(seed=8)
    shapes = infer_static_shapes(model, {"input": (1, 3, 16, 16)})
    names = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    unknown = {n: (None, shapes[n][1], None) for n in names}
    batches = [pink_noise((2, 3, 16, 16), seed=s) for s in (0, 1)]
    counted = measure_channel_moments(model, names, shapes, unknown, iter(batches), "input", batch_norm="running")
    whole = measure_channel_moments(model, names, shapes, {}, iter(batches), "input", batch_norm="running")
    variances = measure_channel_moments(model, names, shapes, unknown, iter(batches), "input", batch_norm="running",
                                        diagonal=names)
    for name in names:
        np.testing.assert_allclose(counted[name][0], whole[name][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(counted[name][1], whole[name][1], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(variances[name][1], np.diag(whole[name][1]), rtol=1e-3, atol=1e-6)


def test_quantizer_input_probe_leaves_matmul_tokens_to_the_analytic_model(monkeypatch):
    """A MatMul reading a (B, tokens, features) tensor has its features on the last axis while the probe sums
    axis 1: even where tokens == features (16 here) its input is not measured."""
    from onnx import TensorProto, helper, numpy_helper

    import onnx_udfc.passes.compress as compress_pass
    from onnx_udfc.stats.layer_inputs import MeasuredInputs

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(np.array([0, 16, 16], np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.25).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),  # (B, 16, 16)
             helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1], name="transpose"),
             helper.make_node("MatMul", ["tokens", "w2"], ["output"], name="matmul")]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    monkeypatch.setattr(compress_pass, "MIN_LAYERS", 2)
    stats = prepared(model, bits=4, samples=8).stats
    assert isinstance(stats, MeasuredInputs)
    assert "input" in stats._inputs and "tokens" not in stats._inputs
