"""The loss library: pure torch, no Ray / DeepSpeed / transformers (ALGORITHMS.md sections 1-3)."""

from mallows_ray.losses.dispersion import calibrate_scale, dispersion_from_entropy, prompt_mean_entropy
from mallows_ray.losses.listwise import listwise, listwise_rewards, mixed_target, plackett_luce
from mallows_ray.losses.logprobs import IGNORE_INDEX, ResponseStats, response_logprobs
from mallows_ray.losses.mallows import kendall_link, mallows_phi, mallows_theta
from mallows_ray.losses.pairwise import cdpo, dpo, ipo, plug_in_dispersion, robust, simpo
from mallows_ray.losses.registry import (
    LISTWISE_LOSSES, LOSSES, PAIRWISE_LOSSES, REFERENCE_FREE, build_loss, is_listwise, loss_parameters,
    uses_dispersion,
)
from mallows_ray.losses.types import ListwiseInputs, LossOutput, PairwiseInputs

__all__ = [
    "IGNORE_INDEX", "LISTWISE_LOSSES", "LOSSES", "PAIRWISE_LOSSES", "REFERENCE_FREE", "ListwiseInputs",
    "LossOutput", "PairwiseInputs", "ResponseStats", "build_loss", "calibrate_scale", "cdpo",
    "dispersion_from_entropy", "dpo", "ipo", "is_listwise", "kendall_link", "listwise", "listwise_rewards",
    "loss_parameters", "mallows_phi", "mallows_theta", "mixed_target", "plackett_luce", "plug_in_dispersion",
    "prompt_mean_entropy", "response_logprobs", "robust", "simpo", "uses_dispersion",
]
