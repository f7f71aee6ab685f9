"""The exploration: greedy rule, and fast scoring / early stopping leaving the result identical."""

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import tiny_cnn, tiny_data

from axcnn import plans, score
from axcnn.config import CompressConfig
from axcnn.explore import Explorer, calibration_indices
from axcnn.model import inventory, io_info, weight_proto
from axcnn.search.greedy import greedy


def _explore(model, x, y, **cfg):
    config = CompressConfig(**{"kmin": 2, "kmax": 12, "filter": 1.0, "min_weights": 16, "batch_size": 32, **cfg})
    explorer = Explorer(model, io_info(model), x, y, config, ["CPUExecutionProvider"])
    layers, _ = inventory(model, config.min_weights)
    return greedy(explorer, layers), explorer


@pytest.mark.parametrize("batch", ["N", 1])
@pytest.mark.parametrize("filter_", [1.0, 0.33])
@pytest.mark.parametrize("metric", ["top1", "top5", "agreement"])
def test_fast_scoring_and_early_stop_leave_choices_identical(batch, filter_, metric):
    """Suffix plans chained from layer to layer, the hardest-first sample order and the best-first race together
    choose what plain full-network scoring of every candidate on every sample chooses, with the same counts."""
    model = tiny_cnn(seed=3, batch=batch)
    x, y = tiny_data(model, n=96, noise=0.3 if metric != "top5" else 1.5)
    plain, _ = _explore(model, x, y, filter=filter_, fast_scoring=False, early_stop=False, metric=metric)
    fast, ex = _explore(model, x, y, filter=filter_, fast_scoring=True, early_stop=True, metric=metric)
    assert [d.chosen.k for d in fast.decisions] == [d.chosen.k for d in plain.decisions]
    assert [d.chosen.correct for d in fast.decisions] == [d.chosen.correct for d in plain.decisions]
    assert {d.plan for d in fast.decisions[1:]} == {"suffix"}  # later layers ran on cached activations
    assert {d.plan for d in plain.decisions} == {"full"}


def test_greedy_rule_lowest_loss_ties_to_smaller_k_and_early_stops_are_losers():
    model = tiny_cnn(seed=5)
    x, y = tiny_data(model, n=96, noise=0.3)
    plain, _ = _explore(model, x, y, kmin=1, batch_size=8, early_stop=False)
    fast, _ = _explore(model, x, y, kmin=1, batch_size=8, early_stop=True)
    for dp, df in zip(plain.decisions, fast.decisions, strict=True):
        full = {c.k: c.correct for c in dp.candidates}
        best = max(full.values())
        assert dp.chosen.k == min(k for k, c in full.items() if c == best)
        for c in df.candidates:
            if c.stopped_early:  # provably not the winner: fewer correct, or a tie lost to a smaller K
                assert full[c.k] < best or (full[c.k] == best and c.k > df.chosen.k)
                assert c.score is None and c.samples_seen < len(y)
    assert any(c.stopped_early for d in fast.decisions for c in d.candidates)


def test_filter_scores_the_best_fraction_by_inertia():
    model = tiny_cnn(seed=2)
    x, y = tiny_data(model, n=64)
    result, _ = _explore(model, x, y, filter=0.2)
    for d in result.decisions:
        scored = [c.k for c in d.candidates if c.scored]
        ks = sorted(c.k for c in d.candidates)
        assert len(scored) == max(1, int(np.ceil(0.2 * len(ks) - 1e-9)))
        # exact k-means: inertia falls with K, so the best-inertia fraction is the largest Ks
        assert sorted(scored) == ks[-len(scored):]


def test_kl_estimator_records_estimates_and_matches_plain_choice():
    model = tiny_cnn(seed=4)
    x, y = tiny_data(model, n=96)
    calib = np.arange(0, 96, 3)
    config = CompressConfig(kmin=2, kmax=12, filter=0.33, estimator="kl", min_weights=16, calib=32)
    ex = Explorer(model, io_info(model), x, y, config, ["CPUExecutionProvider"], calib)
    result = greedy(ex, inventory(model, 16)[0])
    for d in result.decisions:
        est = {c.k: c.estimate for c in d.candidates}
        assert all(v >= -1e-12 for v in est.values())  # KL is non-negative
        scored = sorted((c for c in d.candidates if c.scored), key=lambda c: (c.estimate, c.k))
        unscored = [c for c in d.candidates if not c.scored]
        assert all(s.estimate <= u.estimate for s in scored for u in unscored)


@pytest.mark.parametrize(("n", "calib"), [(96, 32), (20, 256), (1, 1)])
def test_kl_calibration_drawn_from_the_seed_when_not_given(n, calib):
    """Without explicit calibration indices the explorer draws ``min(calib, n)`` distinct samples with the seed,
    as ``compress`` does: the estimates equal those of a run given exactly those indices."""
    model = tiny_cnn(seed=4)
    x, y = tiny_data(model, n=n)
    config = CompressConfig(kmin=2, kmax=6, filter=0.5, estimator="kl", min_weights=16, calib=calib, seed=3)
    idx = calibration_indices(n, calib, 3)
    assert len(idx) == min(n, calib) == len(np.unique(idx)) and idx.min() >= 0 and idx.max() < n
    np.testing.assert_array_equal(idx, calibration_indices(n, calib, 3))  # reproducible
    runs = [greedy(Explorer(model, io_info(model), x, y, config, ["CPUExecutionProvider"], given),
                   inventory(model, 16)[0]) for given in (None, idx)]
    for a, b in zip(*(r.decisions for r in runs), strict=True):
        assert [c.estimate for c in a.candidates] == [c.estimate for c in b.candidates]
        assert a.chosen.k == b.chosen.k


def test_suffix_plan_matches_full_network_outputs():
    model = tiny_cnn(seed=1)
    x, _ = tiny_data(model, n=40)
    io = io_info(model)
    runner = score.Runner(["CPUExecutionProvider"])
    work = score.working_copy(model)
    types = plans.value_types(work)
    w2 = np.random.default_rng(0).normal(size=(8, 2, 3, 3)).astype(np.float32)

    def inputs():
        return plans.full_plan(work, "w2", x, io, 16)

    suffix = plans.suffix_plan(work, "w2", io, runner, 1 << 30, types, [inputs()])
    assert suffix is not None and suffix.kind == "suffix"
    np.testing.assert_allclose(score.outputs_of(suffix, runner, "logits", w2),
                               score.outputs_of(inputs(), runner, "logits", w2), atol=1e-5)
    # over the cache budget, no suffix plan
    assert plans.suffix_plan(work, "w2", io, runner, 0, types, [inputs()]) is None
    # the first layer gains nothing from a cut
    assert plans.suffix_plan(work, "w1", io, runner, 1 << 30, types, [inputs()]) is None


def test_chained_activations_equal_activations_from_the_input():
    """The next layer's cut computed from the previous layer's cached activations (with the previous weight fixed)
    holds the same activations as a prefix run from the graph input."""
    model = tiny_cnn(seed=3)
    x, _ = tiny_data(model, n=37)
    io = io_info(model)
    runner = score.Runner(["CPUExecutionProvider"])
    work = score.working_copy(model)
    types = plans.value_types(work)
    first = plans.suffix_plan(work, "w2", io, runner, 1 << 30, types, [plans.full_plan(work, "w2", x, io, 8)])
    weight_proto(work, "w2").CopyFrom(onnx.numpy_helper.from_array(
        np.random.default_rng(1).normal(size=(8, 2, 3, 3)).astype(np.float32), "w2"))
    chained = plans.suffix_plan(work, "w3", io, runner, 1 << 30, types, [first])
    direct = plans.suffix_plan(work, "w3", io, runner, 1 << 30, types, [plans.full_plan(work, "w3", x, io, 8)])
    assert chained is not None and direct is not None and chained.boundary == direct.boundary
    assert all(f is None for f in first.feeds)  # the source was consumed batch by batch
    assert chained.sizes == direct.sizes
    for a, b in zip(chained.feeds, direct.feeds, strict=True):
        for name in chained.boundary:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6)
    # a source the cut cannot be computed from is skipped (the next source is used), untouched
    later = plans.full_plan(work, "w3", x, io, 8)
    unreachable = plans.Plan(later.model, later.weight, [dict(f) for f in chained.feeds], chained.sizes, "suffix",
                             ("not_a_tensor",))
    plan = plans.suffix_plan(work, "w3", io, runner, 1 << 30, types, [unreachable, later])
    assert plan is not None and all(f is not None for f in unreachable.feeds)


@pytest.mark.parametrize("fixed", [None, 4])
def test_subset_plan_gathers_rows_of_the_cached_activations(fixed):
    model = tiny_cnn(seed=1)
    x, _ = tiny_data(model, n=30)
    io = io_info(model)
    if fixed:
        io = dataclasses.replace(io, fixed_batch=fixed)
    full = plans.full_plan(score.working_copy(model), "w2", x, io, 8)
    pos = np.array([0, 3, 8, 9, 17, 29])
    sub = plans.subset_plan(full, pos, io, 8)
    assert sum(sub.sizes) == len(pos)
    got = np.concatenate([f["x"][:n] for f, n in zip(sub.feeds, sub.sizes, strict=True)])
    np.testing.assert_array_equal(got, x[pos])
    if fixed:
        assert all(len(f["x"]) == fixed for f in sub.feeds)


def test_hardest_first_puts_wrong_and_low_margin_samples_first():
    out = np.array([[5, 0, 0], [0, 1, 0.9], [0, 9, 0], [2, 1, 0]], np.float32)
    y = np.array([0, 1, 0, 0])  # margins 5, 0.1, -9, 1
    assert score.hardest_first(out, y, "top1").tolist() == [2, 1, 3, 0]
    out5 = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert score.hardest_first(out5, np.array([5, 0]), "top5").tolist() == [1, 0]
    assert score.hardest_first(out5[:, :1], np.array([0, 0]), "top1").tolist() == [0, 1]  # one class


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "estimator"), [
    ("cifar10_resnet8_tiny", "inertia"), ("cifar10_squeezenet_nhwc", "inertia"), ("cifar10_squeezenet_nhwc", "kl"),
    ("cifar10_resnet20", "inertia"), ("cifar10_resnet20", "kl"),
])
def test_fast_scoring_identical_on_real_models(name, estimator):
    """On real third-party graphs (residual adds, Concat fire modules, batch fixed to 1), suffix scoring on caches
    chained from layer to layer and the best-first race choose the same K per layer with the same correct counts as
    plain scoring; with ``kl`` the estimates (taken from the cached activations) rank the same candidates."""
    from conftest import REALDATA, realdata_manifest

    from axcnn.data import Preprocess, load_npz, prepare, stratified_subset
    from axcnn.model import load_model

    man = realdata_manifest()
    entry = man["models"][name]
    model = load_model(REALDATA / entry["file"])
    io = io_info(model)
    x, y = load_npz(REALDATA / man["datasets"][entry["dataset"]]["file"])
    idx = stratified_subset(y, 120, seed=0)
    pre = Preprocess(scale=entry["scale"], mean=tuple(entry["mean"]), std=tuple(entry["std"]), layout=entry["layout"])
    data = prepare(x[idx], y[idx], pre, io.input_shape, io.input_dtype)
    runs = {}
    for fast in (False, True):
        config = CompressConfig(kmin=3, kmax=8, filter=0.5, fast_scoring=fast, early_stop=fast, batch_size=64,
                                estimator=estimator, calib=40)
        explorer = Explorer(model, io, data.x, data.y, config, ["CPUExecutionProvider"])
        runs[fast] = greedy(explorer, inventory(model, config.min_weights)[0])
    plain, fast = runs[False], runs[True]
    assert [(d.spec.name, d.chosen.k, d.chosen.correct) for d in fast.decisions] == \
        [(d.spec.name, d.chosen.k, d.chosen.correct) for d in plain.decisions]
    assert sum(d.plan == "suffix" for d in fast.decisions) >= len(fast.decisions) - 1
    if estimator == "kl":  # the same candidates were scored: the estimate ranks them alike
        for a, b in zip(plain.decisions, fast.decisions, strict=True):
            assert [c.k for c in a.candidates if c.scored] == [c.k for c in b.candidates if c.scored]
            np.testing.assert_allclose([c.estimate for c in a.candidates], [c.estimate for c in b.candidates],
                                       rtol=1e-3, atol=1e-6)
