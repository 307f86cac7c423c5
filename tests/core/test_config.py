"""QuantConfig: presets, options parsing, validation and layer selection (no compiling)."""

import re

import pytest

from qbackend import QuantConfig
from qbackend.core.config import PRESETS, ConfigError
from qbackend.formats import Scheme


def test_default_is_nf4_blocks_of_64_nested():
    c = QuantConfig()
    assert c == QuantConfig.preset("nf4") == QuantConfig.from_options(None)
    assert c.scheme == Scheme("nf4", 4, blocksize=64, nested=True)


@pytest.mark.parametrize(
    "name, scheme",
    [
        ("int4", Scheme("int", 4, symmetric=False, granularity="block", blocksize=128)),
        ("int4-g64", Scheme("int", 4, symmetric=False, granularity="block", blocksize=64)),
        ("int8", Scheme("int", 8, symmetric=True, granularity="channel", axis=0)),
        ("fp4", Scheme("fp4", 4, blocksize=64, nested=True)),
    ],
)
def test_presets(name, scheme):
    assert QuantConfig.preset(name).scheme == scheme
    assert QuantConfig.from_options(name).scheme == scheme


def test_from_options_dict_with_preset_and_overrides():
    c = QuantConfig.from_options({"preset": "int4", "blocksize": 64, "exclude": ["lm_head"], "min_params": 0})
    assert c.scheme.blocksize == 64 and not c.scheme.symmetric
    assert c.exclude == ("lm_head",) and c.min_params == 0
    assert QuantConfig.from_options(c) is c
    assert QuantConfig.preset("int4", blocksize=64) == QuantConfig(format="int4", blocksize=64)


def test_unknown_option_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown qbackend option\(s\) 'blocksz'.*valid: preset, format, blocksize"):
        QuantConfig.from_options({"blocksz": 64})


def test_inductor_setting_in_options_gets_a_hint():
    with pytest.raises(ConfigError, match=r"options=\{'inductor'"):
        QuantConfig.from_options({"max_autotune": True})


def test_unknown_preset_and_format():
    with pytest.raises(ConfigError, match="unknown preset 'nf5'; valid presets: " + ", ".join(PRESETS)):
        QuantConfig.from_options({"preset": "nf5"})
    with pytest.raises(ConfigError, match="unknown preset"):
        QuantConfig.from_options("int3")
    with pytest.raises(ConfigError, match="unknown format 'int2'"):
        QuantConfig(format="int2")
    with pytest.raises(ConfigError, match="must be None, a QuantConfig"):
        QuantConfig.from_options(42)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "int8", "blocksize": 64}, "per output channel"),
        ({"format": "int8", "symmetric": False}, "symmetric"),
        ({"format": "nf4", "blocksize": 48}, "block size 48 is not supported"),
        ({"format": "nf4", "symmetric": False}, "symmetric"),
        ({"min_params": -1}, "min_params"),
        ({"on_weight_change": "ignore"}, "on_weight_change must be one of requantize, error"),
        ({"exclude": ["("]}, "not a valid regex"),
        ({"inductor": 3}, "inductor must be a dict"),
        ({"mode": "fast"}, "unknown mode 'fast'; valid: default, reduce-overhead"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_frozen_hashable_and_fingerprint_covers_every_field():
    a = QuantConfig(inductor={"max_autotune": True})
    b = QuantConfig(inductor={"max_autotune": True})
    assert a == b and hash(a) == hash(b) and a.fingerprint() == b.fingerprint()
    with pytest.raises(AttributeError):
        a.format = "int8"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.inductor["x"] = 1  # type: ignore[index]
    assert QuantConfig(exclude=["x"]).fingerprint() != QuantConfig().fingerprint()
    assert QuantConfig(on_weight_change="error").fingerprint() != QuantConfig().fingerprint()


def test_selects_by_name_suffix_and_regex():
    c = QuantConfig(exclude=["lm_head", re.compile(r".*\.attention\..*")])
    assert c.selects("model.lm_head") == (False, "excluded by 'lm_head'")
    assert not c.selects("lm_head")[0]
    assert not c.selects("encoder.layer.0.attention.self.query")[0]
    assert c.selects("encoder.layer.0.output.dense") == (True, "")
    assert c.selects("my_lm_head")[0]  # a suffix match is per dotted component
    inc = QuantConfig(include=[r"encoder\.layer\.[01]\..*"], exclude=[r".*\.query"])
    assert inc.selects("encoder.layer.1.intermediate.dense")[0]
    assert inc.selects("encoder.layer.2.intermediate.dense") == (False, "not in include list")
    assert inc.selects("encoder.layer.0.attention.self.query")[0] is False  # exclude wins


def test_single_pattern_string_is_accepted():
    assert QuantConfig(exclude="lm_head").exclude == ("lm_head",)


def test_two_workflows_in_one_config_is_an_error():
    with pytest.raises(ConfigError, match=r"^smoothquant and qat cannot be combined: choose one workflow$"):
        QuantConfig(format="int8", smoothquant=True, qat=True)


def test_compute_option_defaults_to_auto_and_is_validated():
    assert QuantConfig().compute == "auto"
    assert QuantConfig.from_options({"preset": "int4", "compute": "int8"}).compute == "int8"
    assert QuantConfig.preset("nf4", compute="bf16").scheme == QuantConfig.preset("nf4").scheme
    with pytest.raises(ConfigError, match=r"^unknown compute 'fp16'; valid: auto, fp32, bf16, int8, int16$"):
        QuantConfig(compute="fp16")


def test_compute_does_not_apply_to_w8a8():
    assert QuantConfig.preset("w8a8").compute == "auto"
    with pytest.raises(ConfigError, match=r"compute='int8' does not apply to W8A8: its activations are int8"):
        QuantConfig.preset("w8a8", compute="int8")
