"""The server decodes with the library's parts: its generation_config.json reading, its sampling
check and its per-request settings are decoding/'s (the one stack)."""

import pytest

from minilora.core.errors import ConfigError
from minilora.decoding.sampling import GenerationConfig, read_generation_config
from minilora.serve.app import APIError, _sampling_setting, served_defaults
from minilora.serve.engine import SamplingParams


def test_serve_reads_generation_config_as_generate_does(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": false, "temperature": 0.7, "top_k": -1, "max_new_tokens": 9, '
        '"min_p": 0.1}')
    assert read_generation_config(tmp_path) == GenerationConfig(
        {"temperature": 0.0, "top_k": 0, "min_p": 0.1}, 9)
    # do_sample false is greedy for the server too, as for generate and transformers
    # min_p is served too (the engine samples with it)
    assert served_defaults(tmp_path) == (
        {"temperature": 0.0, "top_k": 0, "min_p": 0.1, "max_tokens": 9}, [])
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 0}')
    with pytest.raises(ConfigError, match="max_new_tokens"):
        served_defaults(tmp_path)


@pytest.mark.parametrize("key,value", [("temperature", -0.5), ("temperature", 2.5),
                                       ("temperature", float("nan")), ("top_p", 1.5),
                                       ("top_k", -2), ("top_k", 1.5), ("top_p", True),
                                       ("min_p", 1.5), ("min_p", -0.1)])
def test_a_request_setting_out_of_range_is_a_400_naming_it(key, value):
    with pytest.raises(APIError) as err:
        _sampling_setting({key: value}, key, None)
    assert err.value.status == 400 and err.value.body()["param"] == key
    assert err.value.body()["message"].startswith(f"{key}: expected")


def test_request_settings_in_range_pass_through():
    assert _sampling_setting({"temperature": 2}, "temperature", 1.0) == 2.0
    assert _sampling_setting({"top_k": -1}, "top_k", 5) == 0  # vLLM's "off"
    assert _sampling_setting({}, "top_p", 0.9) == 0.9


def test_engine_settings_are_the_library_settings_plus_the_requests():
    params = SamplingParams(max_tokens=4, temperature=0.5, min_p=0.2, stop=["x"])
    assert params.as_kwargs() == {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "min_p": 0.2,
                                  "repetition_penalty": 1.0}
    assert params.describe() == "temperature 0.5, min_p 0.2"
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingParams(max_tokens=4, repetition_penalty=1.2)
    with pytest.raises(ConfigError, match="min_p"):
        SamplingParams(max_tokens=4, min_p=2.0)
