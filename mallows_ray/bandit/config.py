"""The bandit experiment's config: a typed dataclass read and checked by `mallows_ray.typed_config`, like the training
config, so a bad key or value raises `ConfigError` naming the key and what would be valid.

METHODS maps each method name to the registered loss it trains with and the dispersion s(x) that loss reads:
`dpo` (ALGORITHMS section 1, no s(x)); `mallows_theta_true` (2.1 with the true s(x)); `mallows_theta_noisy`
(2.1 with s_hat(x) = s(x) * exp(noise_sigma * eps_x), eps_x ~ N(0, 1) seeded: multiplicative log-normal noise,
median-unbiased, mean s * exp(sigma^2/2)); `mallows_phi_true` (2.2 with the true phi(x)); `mallows_phi_noisy`.
s(x) enters the losses unscaled (no `c`, section 2.3): for MallowsPO-theta a global scale of s is the same as a
different beta, and the beta grid is swept anyway; MallowsPO-phi needs the true scale, phi = exp(-s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from mallows_ray.typed_config import ConfigError, bounded, from_dict

# name -> (loss in the registry, which s(x) it reads: "none" | "true" | "noisy")
METHODS: dict[str, tuple[str, str]] = {
    "dpo": ("dpo", "none"),
    "mallows_theta_true": ("mallows_theta", "true"),
    "mallows_theta_noisy": ("mallows_theta", "noisy"),
    "mallows_phi_true": ("mallows_phi", "true"),
    "mallows_phi_noisy": ("mallows_phi", "noisy"),
}
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # one of METHODS' keys, checked by from_dict


@dataclass(frozen=True)
class BanditConfig:
    """The problem (contexts, arms, rewards, reference, data), the optimiser and the method x beta grid."""

    phis: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8, 0.95])  # dispersion phi(x) per context, (0, 1]
    num_arms: int = bounded(5, 2)
    # "linear": the arm at central rank k earns 1 - k/(A-1), arms seeded-permuted per context; "random": seeded
    # uniform(0, 1); or an explicit [C][A] list
    rewards: Union[Literal["linear", "random"], list[list[float]]] = "linear"
    reference: Union[Literal["uniform"], list[list[float]]] = "uniform"  # or [C][A] probabilities, rows sum to 1
    pairs_per_context: int = bounded(20000, 1)  # Mallows rankings sampled per context, one preference pair each
    population: bool = False  # True: exact pair probabilities instead of samples (infinite data)
    seed: int = 0  # seeds rewards (arm permutations), data and dispersion noise
    noise_sigma: float = bounded(0.5, 0.0)  # s_hat = s * exp(noise_sigma * N(0, 1)) for the *_noisy methods
    steps: int = bounded(500, 1)
    lr: float = bounded(0.1, 0.0, open_low=True)
    optimizer: Literal["adam", "sgd"] = "adam"  # sgd: full-batch gradient descent
    betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
    methods: list[MethodName] = field(
        default_factory=lambda: ["dpo", "mallows_theta_true", "mallows_theta_noisy", "mallows_phi_true"])
    etas: list[float] | None = None  # frontier trade-offs; None: problem.default_etas()

    def check(self, where: str) -> None:
        """The list fields' values (from_dict checks scalar ranges and every type)."""
        if not self.phis or any(not 0.0 < p <= 1.0 for p in self.phis):
            raise ConfigError(f"{where}.phis: {self.phis!r}; expected a non-empty list of numbers in (0, 1]")
        if not self.betas or any(b <= 0 for b in self.betas):
            raise ConfigError(f"{where}.betas: {self.betas!r}; expected a non-empty list of positive numbers")
        if not self.methods:
            raise ConfigError(f"{where}.methods: empty; expected some of {', '.join(METHODS)}")
        if self.etas is not None and any(e <= 0 for e in self.etas):
            raise ConfigError(f"{where}.etas: {self.etas!r}; expected positive numbers")


def load_bandit_config(data: dict[str, Any] | None = None) -> BanditConfig:
    """BanditConfig from a mapping (missing keys keep their defaults), checked; errors name `bandit.<key>`."""
    return from_dict(BanditConfig, dict(data or {}), "bandit")
