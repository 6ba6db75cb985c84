"""Config loading: defaults, YAML, dotted overrides, and errors that name the key and valid values."""

import pytest

from mallows_ray.config import ConfigError, Config, from_dict, load_config, to_dict


def test_defaults_round_trip():
    config = load_config()
    assert config.loss.name == "mallows_theta"
    assert from_dict(Config, to_dict(config)) == config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  name: simpo\n  beta: 2.5\ndata:\n  train: x.jsonl\n  scoring:\n    num_actors: 2\n")
    config = load_config(path, ["loss.gamma=0.3", "data.max_prompt_length=128", "data.dispersion_scale=0.29"])
    assert config.loss.name == "simpo" and config.loss.params == {"beta": 2.5, "gamma": 0.3}
    assert config.data.scoring.num_actors == 2 and config.data.max_prompt_length == 128
    assert config.data.dispersion_scale == 0.29


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.max_prompt_lenght=3", "unknown key data.max_prompt_lenght; valid keys of data: train"),
        ("model.dtype=float64", "'float64' is not allowed; expected one of 'auto', 'float32'"),
        ("data.max_prompt_length=abc", "data.max_prompt_length: expected int, got 'abc'"),
        ("loss.name=dpoo", "dpoo"),
        ("loss.betta=0.1", "betta"),
        ("data.dispersion_scale=often", "data.dispersion_scale"),
        ("nonsense", "not of the form section.key=value"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction: 1.5 is out of range; expected a value in [0.0, 1.0]"),
        ("data.scoring.num_actors=0", "data.scoring.num_actors: 0 is out of range"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_int_accepted_for_float_and_bool_rejected_for_int():
    assert load_config(None, ["data.max_bad_fraction=0"]).data.max_bad_fraction == 0.0
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_prompt_length=true"])



def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    # Plain PyYAML (YAML 1.1) reads `5e-4` as the string '5e-4'; configs and command lines write it that way.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-4\nloss:\n  name: cdpo\n  beta: 1e-1\n")
    config = load_config(path, ["optim.warmup_steps=2", "loss.label_smoothing=2E-2"])
    assert config.optim.lr == 5e-4 and config.loss.params == {"beta": 0.1, "label_smoothing": 0.02}
    assert load_config(None, ["optim.lr=+3e+2", "run.name=1e5x"]).run.name == "1e5x"
    with pytest.raises(ConfigError, match="optim.lr: expected float, got '5e-x'"):
        load_config(None, ["optim.lr=5e-x"])
