"""The option table: one declaration gives validation, CLI flags and TOML keys."""

import pytest

from axcnn.config import CompressConfig
from axcnn.data import Preprocess
from axcnn.options import cli_flag, defaults, from_mapping, option_fields


def test_every_config_field_is_an_option_with_help():
    for f, o in option_fields(CompressConfig):
        assert o.help.strip(), f.name
    assert {f.name for f, _ in option_fields(CompressConfig)} == set(CompressConfig().as_dict())


def test_mode_dependent_defaults_are_resolved():
    greedy = CompressConfig()
    assert (greedy.mode, greedy.kmin, greedy.kmax, greedy.holdout, greedy.repair) == ("greedy", 40, 80, 0.0, "none")
    budget = CompressConfig(max_loss=0.5)
    assert (budget.mode, budget.kmin, budget.kmax, budget.holdout, budget.repair) == ("budget", 2, 256, 0.3, "scale")
    assert CompressConfig(max_loss=0.5, kmin=4, kmax=16).kmin == 4


def test_one_budget_only():
    with pytest.raises(ValueError, match=r"^target_cr=8\.0 is invalid"):
        CompressConfig(max_loss=0.5, target_cr=8.0)


def test_from_mapping_refuses_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"unknown option 'kmeen' in cfg\.toml"):
        from_mapping(CompressConfig, {"kmin": 4, "kmeen": 2}, "cfg.toml")


def test_from_mapping_coerces_loose_types():
    c = from_mapping(CompressConfig, {"max_loss": 1, "kmin": 4})
    assert c.max_loss == 1.0 and isinstance(c.max_loss, float)
    p = from_mapping(Preprocess, {"scale": 255, "mean": [0, 1]})
    assert p.mean == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"^kmin='4' is invalid"):
        from_mapping(CompressConfig, {"kmin": "4"})


def test_flags_and_defaults():
    flags = {cli_flag(f, o) for f, o in option_fields(CompressConfig) if o.cli}
    assert {"--kmin", "--batch-size", "--max-loss", "--fold-bn"} <= flags
    assert "--fast-scoring" not in flags  # set by --plain-scoring
    assert defaults(CompressConfig)["filter"] == 0.15
