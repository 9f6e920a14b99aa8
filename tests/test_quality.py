"""The method ladder on models built here (BN calibrated, so the BN prior holds):
udfc < mean < none at prune 0.3 bits 6; expected-error selection < norm selection; the default
quantization recipe < round-to-nearest max-abs at 4 bits."""
import onnx
import pytest

from builders import depthwise_block, plain_chain, random_input, rel_error, run
from onnx_udfc import compress


def output_error(model, x, **kw):
    out, _ = compress(model, validate=False, **kw)
    return rel_error(run(model, x), run(out, x))


@pytest.fixture(scope="module", params=["plain", "depthwise"])
def case(request):
    model = plain_chain(seed=11) if request.param == "plain" else depthwise_block(seed=12)
    return model, random_input(model, batch=64, seed=9)


def test_method_ladder_at_prune_03_bits_6(case):
    model, x = case
    errors = {m: output_error(model, x, prune=0.3, bits=6, method=m) for m in ("none", "mean", "udfc")}
    assert errors["udfc"] < errors["mean"] < errors["none"], errors


def test_expected_error_selection_beats_norm(case):
    model, x = case
    same = dict(prune=0.3, bits=32, allocation="uniform", channel_multiple=1)  # selection alone
    e_sel = output_error(model, x, select="expected-error", **same)
    n_sel = output_error(model, x, select="norm", **same)
    assert e_sel < n_sel, (e_sel, n_sel)


def test_default_quantization_beats_naive_at_4_bits(case):
    model, x = case
    default = output_error(model, x, bits=4, first_last_bits=None)
    naive = output_error(model, x, bits=4, first_last_bits=None, grid="symmetric", clip="max", rounding="nearest",
                         bias_correction=False)
    assert default < naive, (default, naive)


def test_ridge_shrinks_only_the_pruned_channels(case):
    """A huge ridge turns udfc (as solved, before its variance restoration) into mean compensation; it must not
    shrink the kept channels too."""
    model, x = case
    heavy = output_error(model, x, prune=0.3, bits=32, ridge=1e6, restore_variance=False)
    mean = output_error(model, x, prune=0.3, bits=32, method="mean")
    assert heavy == pytest.approx(mean, rel=1e-3)


def test_merge_blend_only_on_chains_without_bn_prior_or_depthwise():
    """The blend toward Neuron Merging changes folded plain chains, and nothing where a BN prior anchors the
    statistics or where the chain runs through a depthwise conv."""
    from builders import fold_all_batchnorm

    def compressed(model, blend):
        # on pink noise the folded depthwise block's allocation prunes only its depthwise chain (on the
        # default's image-prior samples it also cuts the head chain, where the blend applies)
        out, _ = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=32, validate=False,
                          merge_blend=blend, synthetic_inputs="pink")
        return out.SerializeToString()

    folded = fold_all_batchnorm(plain_chain(seed=3))
    assert compressed(folded, True) != compressed(folded, False)
    for model in (plain_chain(seed=3), fold_all_batchnorm(depthwise_block(seed=3))):
        assert compressed(model, True) == compressed(model, False)


def test_unobserved_variance_floor_only_on_chains_without_bn_prior(monkeypatch):
    """The compensation's variance floor (kept channels nearly constant on synthetic inputs) changes folded
    chains and says so in the report; with a BN prior it changes nothing. The floor is raised to 1 here so
    that it binds on these small random models."""
    import onnx_udfc.passes.prune as prune_pass
    from builders import fold_all_batchnorm

    def compressed(model, floor):
        monkeypatch.setattr(prune_pass, "UNOBSERVED_VARIANCE_FLOOR", floor)
        out, report = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=32, validate=False)
        notes = [n for layer in report.layers for n in layer.get("notes", []) if "trusted less" in n]
        return out.SerializeToString(), notes

    for model in (fold_all_batchnorm(plain_chain(seed=3)), fold_all_batchnorm(depthwise_block(seed=3))):
        (plain, no_notes), (floored, notes) = compressed(model, 0.0), compressed(model, 1.0)
        assert plain != floored and notes and not no_notes
    bn_kept = plain_chain(seed=3)
    assert compressed(bn_kept, 0.0) == compressed(bn_kept, 1.0)


def test_report_warns_when_pruned_chains_have_no_bn_statistics():
    """Pruning a model whose BN was folded at export leaves a note (the validation's synthetic inputs cannot
    show what real data loses there); BN kept, or quantization alone, leaves none."""
    from builders import fold_all_batchnorm

    def notes(model, **kw):
        _, report = compress(onnx.load_from_string(model.SerializeToString()), validate=False, **kw)
        return [n for n in report.notes if "no BN statistics" in n]

    folded = fold_all_batchnorm(plain_chain(seed=3))
    warned = notes(folded, prune=0.3, bits=32)
    assert len(warned) == 1 and warned[0].startswith("2 of 2 pruned chain(s)"), warned
    assert notes(plain_chain(seed=3), prune=0.3, bits=32) == []
    assert notes(folded, bits=6) == []
