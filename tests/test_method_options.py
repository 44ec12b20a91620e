"""A video-token method's own options (issue 33): keyword options of ``staprune.patch`` and
``--method-option NAME=VALUE`` on the command line, at the published defaults unless given, checked
in one line before any work, carried in the saved pruning record."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

import staprune
from staprune.core.config import STAConfig, config_from_record, config_record
from staprune.core.errors import ConfigError, UnknownOptionError
from staprune.core.video_methods import (
    MethodOption,
    VideoMethod,
    method_options,
    register_video_method,
    unregister_video_method,
)
from staprune.runs.arguments import parse_method_option


@pytest.fixture(scope="module")
def toy():
    """A method with one option of each type: an integer, a number, a choice."""
    options = (MethodOption("toy_count", 2, lambda v: v >= 1, "an integer >= 1"),
               MethodOption("toy_share", 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
               MethodOption("toy_mode", "mean", lambda v: v in ("mean", "max"), "mean or max"))
    register_video_method(VideoMethod("toy", lambda video, keep, config: torch.arange(keep), options=options))
    yield "toy"
    unregister_video_method("toy")


def test_options_are_their_defaults_unless_given(toy):
    assert method_options(STAConfig(method=toy)) == {"toy_count": 2, "toy_share": 0.5, "toy_mode": "mean"}
    config = STAConfig(keep_ratio=0.5, method=toy).with_options(toy_share=1, toy_mode="max")
    assert config.method_options == (("toy_mode", "max"), ("toy_share", 1))
    assert method_options(config) == {"toy_count": 2, "toy_share": 1, "toy_mode": "max"}
    assert STAConfig(method=toy, method_options={"toy_count": 3}) == STAConfig(method=toy).with_options(toy_count=3)


@pytest.mark.parametrize(("option", "message"), [
    ({"toy_count": 0}, "toy_count=0 is not valid for method='toy': give an integer >= 1 \\(default 2\\)"),
    ({"toy_count": 1.5}, "toy_count=1.5 is not valid for method='toy': give an integer >= 1"),
    ({"toy_count": True}, "toy_count=True is not valid"),
    ({"toy_share": 2}, "toy_share=2 is not valid for method='toy': give a number in \\[0, 1\\]"),
    ({"toy_mode": "min"}, "toy_mode='min' is not valid for method='toy': give mean or max"),
])
def test_an_option_outside_its_range_is_one_clear_error(toy, option, message):
    with pytest.raises(ConfigError, match=message):
        STAConfig(keep_ratio=0.5, method=toy).with_options(**option)


def test_an_option_of_another_method_is_refused_naming_the_method_s_own(toy):
    with pytest.raises(UnknownOptionError, match=r"unknown option\(s\) \['toy_count'\]"):
        STAConfig(keep_ratio=0.5, method="evs").with_options(toy_count=3)
    with pytest.raises(UnknownOptionError, match=r"method 'toy' also takes \['toy_count', 'toy_mode', 'toy_share'\]"):
        STAConfig(keep_ratio=0.5, method=toy).with_options(fastv_layer=3)
    with pytest.raises(ConfigError, match="method='sta' has no option toy_count; it takes no options of its own"):
        STAConfig(method_options={"toy_count": 3})


def test_options_travel_in_the_saved_record():
    config = STAConfig(keep_ratio=0.25, method="fastv").with_options(fastv_layer=3)
    record = config_record(config)
    assert record["method_options"] == {"fastv_layer": 3}
    assert config_from_record(record) == config


def test_patch_takes_a_method_s_options_as_keywords():
    import test_video_llms as vl

    model = vl.qwen25()
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=1)
    assert staprune.get_config(model).method_options == (("fastv_layer", 1),)
    with pytest.raises(UnknownOptionError, match="method 'fastv' also takes \\['fastv_layer'\\]"):
        staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_k=1)


@pytest.mark.parametrize(("text", "parsed"), [("fastv_layer=3", ("fastv_layer", 3)), ("a=0.5", ("a", 0.5)),
                                              ("a=true", ("a", True)), ("a=mean", ("a", "mean"))])
def test_method_option_values_parse_as_their_type(text, parsed):
    assert parse_method_option(text) == parsed


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "fastv", "--method-option", "fastv_layer=0"],
     "fastv_layer=0 is not valid for method='fastv': give an integer >= 1"),
    (["--method", "fastv", "--method-option", "fastv_layer=40"], "fastv_layer=40 must be between 1 and 27"),
    (["--method", "evs", "--method-option", "fastv_layer=3"], "method='evs' has no option fastv_layer"),
    (["--method", "fastv", "--method-option", "fastv_layer"], "--method-option 'fastv_layer': give NAME=VALUE"),
])
def test_a_bad_method_option_on_the_command_line_is_one_line_exit_2(argv, message):
    rc, out, err = run_cli("flops", "--model", "Qwen2.5-VL-7B", "--keep", "0.25", *argv)
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_flops_shows_the_options_a_setting_was_given():
    rc, out, err = run_cli("flops", "--model", "Qwen2.5-VL-7B", "--keep", "0.25", "--method", "fastv",
                           "--method-option", "fastv_layer=3")
    assert rc == 0, err
    assert "keep 0.25 fastv fastv_layer=3" in out


def test_several_methods_are_compared_at_each_budget_each_with_its_own_options():
    rc, out, err = run_cli("flops", "--model", "Qwen2.5-VL-7B", "--keep", "0.25", "0.1", "--method", "sta", "evs",
                           "fastv", "--method-option", "fastv_layer=3", "--json")
    assert rc == 0, err
    import json

    settings = [row["setting"] for row in json.loads(out)]
    assert settings == ["dense", "keep 0.25", "keep 0.1", "keep 0.25 evs", "keep 0.1 evs",
                        "keep 0.25 fastv fastv_layer=3", "keep 0.1 fastv fastv_layer=3"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "Qwen2.5-VL-7B", "--keep", "0.25", "--method", "sta", "evs", "--method-option", "fastv_layer=3"],
     "--method-option fastv_layer: none of the methods sta, evs takes it"),
    (["--model", "Qwen2.5-VL-7B", "--keep", "0.25", "--method", "evs", "fastv", "--method-option", "fastv_layer=0"],
     "fastv_layer=0 is not valid for method='fastv'"),
    (["--model", "ViT-B", "--method", "sta", "random"], "--method sta random: several methods compare a video LLM's"),
])
def test_several_methods_refuse_what_none_of_them_takes_in_one_line(argv, message):
    rc, out, err = run_cli("flops", *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
