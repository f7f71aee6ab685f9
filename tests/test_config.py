import pytest

from axcnn.config import CompressConfig


def test_defaults_are_the_papers_setting():
    c = CompressConfig()
    assert (c.kmin, c.kmax, c.filter, c.estimator, c.kmeans) == (40, 80, 0.15, "inertia", "exact")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("kmin", 0, "[1, 65536]"),
        ("kmax", 0, "[1, 65536]"),
        ("filter", 0.0, "(0, 1]"),
        ("filter", 1.5, "(0, 1]"),
        ("filter", float("nan"), "(0, 1]"),
        ("estimator", "foo", "inertia | kl"),
        ("metric", "top3", "top1"),
        ("kmeans", "lloyd", "exact"),
        ("device", "tpu", "auto"),
        ("limit", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("calib", 0, ">= 1"),
        ("cache_mb", -1, ">= 0"),
        ("seed", -1, ">= 0"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as info:
        CompressConfig(**{field: value})
    msg = str(info.value)
    assert msg.startswith(f"{field}=") and fragment in msg


def test_kmin_above_kmax():
    with pytest.raises(ValueError, match=r"kmin=50 is invalid: allowed at most kmax \(40\)"):
        CompressConfig(kmin=50, kmax=40)


def test_frozen():
    c = CompressConfig()
    with pytest.raises(AttributeError):
        c.kmin = 3  # type: ignore[misc]


@pytest.mark.parametrize("filter_,n,expected", [(0.15, 41, 7), (1.0, 41, 41), (0.05, 10, 1), (0.33, 3, 1),
                                                (0.5, 1, 1), (0.2, 10, 2)])
def test_candidates_to_score(filter_, n, expected):
    assert CompressConfig(filter=filter_).candidates_to_score(n) == expected


def test_sharing_options_defaults_and_values():
    c = CompressConfig()
    assert (c.granularity, c.group_size, c.vector_dim) == ("layer", 1, 1)
    c = CompressConfig(granularity="channel", group_size=4)
    assert (c.granularity, c.group_size) == ("channel", 4)
    assert CompressConfig(vector_dim=2).vector_dim == 2


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"granularity": "row"}, "granularity='row' is invalid: allowed layer | channel | kernel"),
    ({"granularity": "channel", "group_size": 0}, "group_size=0 is invalid: allowed an integer >= 1"),
    ({"vector_dim": 3}, "vector_dim=3 is invalid: allowed 1 or 2"),
    ({"vector_dim": 0}, "vector_dim=0 is invalid: allowed 1 or 2"),
    ({"group_size": 4}, "group_size=4 is invalid with granularity='layer': allowed 1"),
    ({"granularity": "kernel", "group_size": 4}, "group_size=4 is invalid with granularity='kernel'"),
    ({"granularity": "channel", "vector_dim": 2}, "vector_dim=2 is invalid with granularity='channel': allowed 1"),
    ({"granularity": "kernel", "vector_dim": 2}, "vector_dim=2 is invalid with granularity='kernel'"),
    ({"granularity": "channel", "kmeans": "sklearn"}, "kmeans='sklearn' is invalid with granularity='channel'"),
    ({"vector_dim": 2, "kmeans": "faiss"}, "kmeans='faiss' is invalid with granularity='layer', vector_dim=2"),
    ({"granularity": "auto"}, "granularity='auto' is invalid without a budget or --pareto"),
    ({"group_size": 4}, "group_size=4 is invalid with granularity='layer'"),
])
def test_contradictory_sharing_options_are_refused(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        CompressConfig(**kwargs)
    assert fragment in str(info.value)


def test_budget_and_pareto_modes_take_any_sharing_and_auto():
    assert CompressConfig(max_loss=1.0, granularity="kernel").granularity == "kernel"
    assert CompressConfig(target_cr=4.0, vector_dim=2).vector_dim == 2
    auto = CompressConfig(pareto=True, granularity="auto")
    assert (auto.granularity, auto.group_size) == ("auto", 4)
    assert CompressConfig(max_loss=1.0, granularity="auto", group_size=8).group_size == 8
