"""The loss library: pure torch, no Ray / DeepSpeed / transformers (ALGORITHMS.md sections 1-3)."""

from mallows_ray.losses.composite import Term, build_composite, term_labels
from mallows_ray.losses.dispersion import (
    EntropyAggregate,
    dispersion_from_entropy,
    prompt_mean_entropy,
)
from mallows_ray.losses.length import ld_weighted
from mallows_ray.losses.listwise import (
    lambda_contrast,
    listwise,
    listwise_nll,
    listwise_rewards,
    mixed_target,
    plackett_luce,
)
from mallows_ray.losses.logprobs import IGNORE_INDEX, ResponseStats, response_logprobs
from mallows_ray.losses.mallows import kendall_link, mallows_ipo, mallows_phi, mallows_simpo, mallows_theta
from mallows_ray.losses.pairwise import cdpo, dpo, ipo, plug_in_dispersion, robust, simpo
from mallows_ray.losses.registry import SPECS, LossSpec, build_loss, check_parameters, loss_parameters, loss_spec
from mallows_ray.losses.scores import F_DIVERGENCES, f_score
from mallows_ray.losses.trl_pairwise import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    nca_pair,
    nll,
    sigmoid_norm,
    sppo_hard,
)
from mallows_ray.losses.types import ListwiseInputs, Loss, LossOutput, PairwiseInputs
from mallows_ray.losses.weighting import wpo_weighted, wpo_weights

__all__ = [
    "EntropyAggregate", "F_DIVERGENCES", "IGNORE_INDEX", "ListwiseInputs", "Loss", "LossOutput", "LossSpec",
    "PairwiseInputs", "ResponseStats", "SPECS", "Term", "aot", "aot_unpaired", "apo_down", "apo_zero", "bco_pair",
    "build_composite", "build_loss", "cdpo", "check_parameters", "discopop",
    "dispersion_from_entropy", "dpo", "exo_pair", "f_score", "hinge", "ipo", "kendall_link", "lambda_contrast",
    "ld_weighted", "listwise", "listwise_nll", "listwise_rewards", "loss_parameters", "loss_spec", "mallows_ipo",
    "mallows_phi", "mallows_simpo", "mallows_theta", "mixed_target", "nca_pair", "nll", "plackett_luce",
    "plug_in_dispersion", "prompt_mean_entropy", "response_logprobs", "robust", "sigmoid_norm", "simpo", "sppo_hard",
    "term_labels", "wpo_weighted", "wpo_weights",
]
