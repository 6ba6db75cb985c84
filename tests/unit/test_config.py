"""Config loading: defaults, YAML, dotted overrides, and errors that name the key and valid values."""

import pytest

from mallows_ray.config import Config, load_config
from mallows_ray.typed_config import ConfigError, from_dict, to_dict


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


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
        ("optim.lr=.inf", "optim.lr: inf is not a finite number"),
        ("optim.lr=-1e-5", "optim.lr: -1e-05 is out of range; expected a value in [0.0, inf)"),
        ("data.dispersion_scale=0", "data.dispersion_scale: 0.0 is out of range; expected a value in (0.0, inf)"),
        ("data.dispersion_scale=-0.5", "data.dispersion_scale: -0.5 is out of range"),
        ("optim.max_steps=0", "optim.max_steps: 0 is out of range; expected a value in [1, inf)"),
        ("optim.max_steps=-2", "optim.max_steps: -2 is out of range"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm: -1.0 is out of range"),
        ("optim.max_grad_norm=.inf", "optim.max_grad_norm: inf is not a finite number"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: -0.1 is out of range"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: -1 is out of range"),
        ("optim.betas=[0.9, 1.0]", "optim.betas: [0.9, 1.0]; expected two numbers in [0, 1)"),
        ("optim.betas=[0.9]", "optim.betas: [0.9]; expected two numbers"),
        ("optim.epochs=0", "optim.epochs: 0 is out of range"),
        ("run.seed=-1", "run.seed: -1 is out of range"),
        ("run.fail_at_step=0", "run.fail_at_step: 0 is out of range"),
        ("run.max_failures=-2", "run.max_failures: -2 is out of range"),
        ("data.score_fill=.nan", "data.score_fill"),
        ("model.lora={rank: 4, dropout: 1.0}",
         "model.lora.dropout: 1.0 is out of range; expected a value in [0.0, 1.0)"),
        ("model.lora={rank: 4, alpha: 0}", "model.lora.alpha: 0.0 is out of range; expected a value in (0.0, inf)"),
    ],
)
def test_numeric_settings_outside_their_meaningful_range_are_rejected(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_warmup_must_end_before_max_steps():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps: 8 is not below optim.max_steps=8"):
        load_config(None, ["optim.max_steps=8", "optim.warmup_steps=8"])
    assert load_config(None, ["optim.max_steps=8", "optim.warmup_steps=7"]).optim.max_steps == 8


def test_valid_edges_and_unset_optionals_pass():
    config = load_config(None, ["optim.lr=0", "data.dispersion_scale=1e-3", "optim.max_steps=1",
                                "optim.max_grad_norm=0", "data.dispersion_scale=auto", "optim.max_steps=null"])
    assert config.optim.lr == 0.0 and config.optim.max_steps is None and config.data.dispersion_scale == "auto"
    assert config.run.max_failures == 3  # a lost worker restarts by default


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", "a\\b", " x", "x "])
def test_run_name_is_one_plain_folder_name(name):
    with pytest.raises(ConfigError, match="run.name: .* is not a plain folder name"):
        from_dict(Config, {"run": {"name": name}})


def test_run_name_accepts_ordinary_names():
    for name in ("demo", "run-1", "x.y", "beta_0.1"):
        assert from_dict(Config, {"run": {"name": name}}).run.name == name


def test_missing_or_malformed_config_file_and_bad_yaml_override_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1e-5\nrun:\n  name: x\n")
    with pytest.raises(ConfigError, match=rf"config file {bad} is not valid YAML: .* at line \d+, column \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'model.lora=\{rank: 8': the value is not valid YAML"):
        load_config(None, ["model.lora={rank: 8"])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a folder


def test_evaluation_needs_the_vertex_or_the_uniform_pass():
    assert from_dict(Config, {"lambdas": {"eval_uniform": False}}).lambdas.eval_vertices
    with pytest.raises(ConfigError, match="lambdas.eval_vertices and lambdas.eval_uniform are both false"):
        from_dict(Config, {"lambdas": {"eval_vertices": False, "eval_uniform": False}})


def test_scored_data_settings_record_the_scoring_dtype_resolved():
    """model.dtype=auto enters the cache key as the dtype the scoring actors compute in: fp32 on CPU actors, bf16
    on actors that reserve a GPU (and only those see one, runtime.DEVICE_ENV); an explicit dtype as it is."""
    from mallows_ray.config import scored_data_settings

    dtype = lambda *overrides: scored_data_settings(load_config(None, list(overrides)))["model_dtype"]  # noqa: E731
    assert dtype() == "float32"
    assert dtype("data.scoring.num_gpus_per_actor=1") == "bfloat16"
    assert dtype("data.scoring.num_gpus_per_actor=0.5", "model.dtype=float32") == "float32"
    assert dtype("model.dtype=bfloat16") == "bfloat16"
