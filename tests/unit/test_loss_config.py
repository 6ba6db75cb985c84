"""`loss.terms` in configs and sweeps, parameter ranges checked at load, per-term metrics."""

import pytest
import torch
import yaml

from mallows_ray.config import Config, load_config
from mallows_ray.losses import LossOutput, PairwiseInputs, Term, build_loss
from mallows_ray.train.metrics import MetricSums, progress_line
from mallows_ray.tune.config import load_sweep_config, sample_configs
from mallows_ray.tune.trials import trial_name
from mallows_ray.typed_config import ConfigError, from_dict, set_key, to_dict

TERMS = "loss={terms: [{name: dpo, weight: 1.0, params: {beta: 0.2}}, {name: nll, weight: 0.5}]}"


def test_terms_load_round_trip_and_build(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  terms:\n    - {name: dpo, params: {beta: 0.2, dispersion: true}}\n"
                    "    - {name: nll, weight: 0.5, params: {reduction: sum}}\n")
    config = load_config(path, ["loss.terms.1.weight=0.25"])
    assert config.loss.terms == [Term("dpo", 1.0, {"beta": 0.2, "dispersion": True}),
                                 Term("nll", 0.25, {"reduction": "sum"})]
    assert config.loss.name == "dpo" and config.loss.params == {} and not config.loss.build().listwise
    assert config.loss.build().reads_dispersion
    assert from_dict(Config, to_dict(config)) == config
    assert to_dict(config)["loss"] == {"terms": [
        {"name": "dpo", "weight": 1.0, "params": {"beta": 0.2, "dispersion": True}},
        {"name": "nll", "weight": 0.25, "params": {"reduction": "sum"}}]}
    # the single-loss form is unchanged and builds the plain loss
    single = load_config(None, ["loss.name=hinge", "loss.beta=0.3"]).loss
    assert single.terms is None and to_dict(single) == {"name": "hinge", "beta": 0.3}
    x = _pairs()
    assert torch.equal(single.build()(x).losses, build_loss("hinge", beta=0.3)(x).losses)
    both = config.loss.build()(x)
    assert set(both.terms) == {"dpo", "nll"}
    torch.testing.assert_close(both.losses, both.terms["dpo"] + 0.25 * both.terms["nll"])


@pytest.mark.parametrize("override, needle", [
    ("loss.terms.0.params.beta=0", "loss.terms.0.params: loss 'dpo' parameter 'beta': 0 is out of range; expected a "
                                   "finite value in (0, inf)"),
    ("loss.terms.0.params.beta=.inf", "'beta': inf is out of range"),
    ("loss.terms.1.weight=-1", "loss.terms.1.weight: -1 is not a finite number >= 0"),
    ("loss.terms.1.weight=.nan", "loss.terms.1.weight: nan is not a finite number >= 0"),
    ("loss.terms.2.weight=1", "loss.terms.2.weight: '2' is not an index of a list of 2 items (0 to 1)"),
    ("loss.terms.0.name=dpoo", "loss.terms.0.name: unknown loss 'dpoo'; valid losses: dpo"),
    ("loss.terms.0.beta=1", "loss.terms.0: unknown key 'beta'; a term has name, weight, params"),
    ("loss.terms.1.params.dispersion=true", "loss.terms.1.params: loss 'nll' takes no 'dispersion' parameter"),
    ("loss.terms.0.name=listwise", "loss.terms: the terms mix pairwise and listwise losses"),
    ("loss.beta=0.1", "loss: give either name (with its parameters) or terms, not both; found beta"),
    ("loss.terms=[]", "loss.terms: empty"),
    ("loss.terms=dpo", "loss.terms: expected a list"),
])
def test_term_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [TERMS, override])
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    (["loss.name=dpo", "loss.beta=-0.1"], "loss 'dpo' parameter 'beta': -0.1 is out of range"),
    (["loss.name=cdpo", "loss.label_smoothing=0.5"], "'label_smoothing': 0.5 is out of range; expected a finite "
                                                      "value in [0, 0.5)"),
    (["loss.name=exo_pair", "loss.label_smoothing=0"], "'label_smoothing': 0 is out of range; expected a finite value "
                                                        "in (0, 1)"),
    (["loss.name=discopop", "loss.tau=0"], "'tau'"),
    (["loss.name=dpo", "loss.f_divergence=kl"], "'kl' is not one of reverse_kl, forward_kl"),
    (["loss.name=sppo_hard", "loss.dispersion=true"], "the dispersion plug-in has no meaning"),
])
def test_single_loss_ranges_are_checked_at_load(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_set_key_indexes_lists_only_within_range():
    data = {"loss": {"terms": [{"name": "dpo"}, {"name": "nll"}]}}
    set_key(data, "loss.terms.1.weight", 0.5)
    set_key(data, "loss.terms.0", {"name": "ipo"})
    assert data["loss"]["terms"] == [{"name": "ipo"}, {"name": "nll", "weight": 0.5}]
    with pytest.raises(ConfigError, match="loss.terms.x.weight: 'x' is not an index"):
        set_key(data, "loss.terms.x.weight", 1)


def test_term_weights_can_be_swept(tmp_path):
    base = {"data": {"train": "prefs.jsonl", "validation": "val.jsonl"},
            "loss": {"terms": [{"name": "dpo", "params": {"beta": 0.1}}, {"name": "nll", "weight": 0.1}]},
            "run": {"eval_every": 2}}
    sweep = {"name": "w", "search": "grid", "space": {"loss.terms.1.weight": {"grid": [0.0, 0.5, 1.0]},
                                                      "loss.terms.0.params.beta": {"grid": [0.1, 0.3]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": sweep, **base}, sort_keys=False))
    configs = [c for _, c in sample_configs(load_sweep_config(path))]
    assert sorted((c.loss.terms[0].params["beta"], c.loss.terms[1].weight) for c in configs) == [
        (b, w) for b in (0.1, 0.3) for w in (0.0, 0.5, 1.0)]
    trial = type("T", (), {"trial_id": "x_00001", "config": {"loss.terms.1.weight": 0.5,
                                                             "loss.terms.0.params.beta": 0.3}})
    assert trial_name(trial) == "00001_terms.0.params.beta=0.3_terms.1.weight=0.5"
    sweep["space"] = {"loss.terms.3.weight": {"grid": [0.5]}}
    path.write_text(yaml.safe_dump({"sweep": sweep, **base}, sort_keys=False))
    with pytest.raises(ConfigError, match="loss.terms.3.weight: '3' is not an index of a list of 2 items"):
        load_sweep_config(path)


def _pairs():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairwiseInputs(t(-2.0, -5.0, -1.0), t(-3.0, -4.0, -1.5), t(-2.5, -4.5, -1.0), t(-2.5, -4.5, -1.0),
                          t(2.0, 4.0, 1.0), t(3.0, 2.0, 1.0), t(0.5, 1.0, 2.0))


def test_metrics_report_each_term():
    out = load_config(None, [TERMS]).loss.build()(_pairs())
    sums = MetricSums()
    sums.add_loss_output(out, torch.ones(3), count=2)  # the first two examples (an evaluation tail)
    metrics = sums.reduce()
    assert metrics["loss/dpo"] == pytest.approx(out.terms["dpo"][:2].mean().item())
    assert metrics["loss/nll"] == pytest.approx((2.0 / 2 + 5.0 / 4) / 2)  # -lp / n of the first two chosen
    assert metrics["loss"] == pytest.approx(metrics["loss/dpo"] + 0.5 * metrics["loss/nll"])
    line = progress_line({**metrics, "step": 1, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0,
                          "samples_per_s": 1.0}, 4)
    assert f"terms dpo {metrics['loss/dpo']:.4f}, nll {metrics['loss/nll']:.4f}" in line
    plain = MetricSums()
    plain.add_loss_output(build_loss("dpo")(_pairs()), torch.ones(3))
    assert not [k for k in plain.reduce() if k.startswith("loss/")]
    assert isinstance(out, LossOutput)
