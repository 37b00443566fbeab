"""Exact oracles: models that are right by construction, to tell a sampler's error from a network's.

The course's signature tool (lessons 02–09). For data whose noised marginals are known in closed form, the
best possible ε-predictor, score and noisy classifier can be written down, and every sampler, loss and
guidance rule can be checked against them with no network in the way. Data flows one way through the
library: toy → schedule → model (an oracle is just another model) → sampler → metric.

* :func:`noised_mixture` — q_t of a :class:`~minidiff.toys.GaussianMixture` under a discrete schedule.
* :func:`mixture_eps_model` — the exact ε-model of mixture data (an :data:`~minidiff.contracts.EpsModel`).
* :func:`mixture_time_score` — the exact continuous-time score under a VP or VE SDE (a ``TimeScore``).
* :func:`class_conditional_mixture`, :func:`mixture_noisy_classifier`, :func:`mixture_guidance_oracles` —
  exact p(x | y), p(y | x_t) and the pair of ε-models that guidance combines (lesson 09).
* :class:`GaussianData` — Gaussian data, whose optimal ε is affine and whose model likelihood is exact (lesson 02).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minidiff.contracts import EpsModel, NoisyClassifier, TimeScore, per_timestep
from minidiff.elbo import gaussian_log_prob, model_variances, posterior_mean_from_eps, sum_per_example
from minidiff.schedules import NoiseSchedule, Timesteps
from minidiff.sde import SDE
from minidiff.toys import GaussianMixture


def noised_mixture(mixture: GaussianMixture, schedule: NoiseSchedule, t: Timesteps) -> GaussianMixture:
    """The exact marginal q_t(x_t) of ``mixture`` data under ``schedule`` at one timestep t (0..T).

    Σ_k π_k N(√ᾱ_t μ_k, ᾱ_t Σ_k + (1 − ᾱ_t) I) (lesson 01, "the marginal is a Gaussian convolution").
    """
    t = schedule.check_timesteps(t, lowest=0)
    if t.ndim != 0:
        raise ValueError("noised_mixture takes a single timestep t; call it once per t")
    return mixture.diffused(schedule.alpha_bars[t].item())


def mixture_eps_model(mixture: GaussianMixture, schedule: NoiseSchedule) -> EpsModel:
    """(x_t, t) ↦ −√(1 − ᾱ_t) ∇ log q_t(x_t): the best possible ε-predictor for mixture data (lesson 04, eq. 6)."""
    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return per_timestep(x, timesteps, lambda t, rows: -(1 - schedule.alpha_bars[t].item()) ** 0.5
                            * noised_mixture(mixture, schedule, t).score(rows))
    return eps


def mixture_time_score(sde: SDE, mixture: GaussianMixture) -> TimeScore:
    """The exact score ∇ log p_s of mixture data under ``sde`` at continuous time s (lesson 05)."""
    def score(x: torch.Tensor, s: float) -> torch.Tensor:
        return sde.mixture_marginal(mixture, s).score(x)
    return score


# ---------------------------------------------------------------------------------------
# Exact guidance for a labelled Gaussian mixture (lesson 09, §4)
# ---------------------------------------------------------------------------------------


def _check_component_labels(mixture: GaussianMixture, component_labels: torch.Tensor) -> torch.Tensor:
    component_labels = torch.as_tensor(component_labels).long()
    if component_labels.shape != mixture.weights.shape:
        raise ValueError(f"component_labels needs one class per component ({tuple(mixture.weights.shape)}), "
                         f"got shape {tuple(component_labels.shape)}")
    return component_labels


def class_conditional_mixture(mixture: GaussianMixture, component_labels: torch.Tensor, label: int) -> GaussianMixture:
    """p(x | y): the components whose class is ``label``, with their weights renormalised."""
    chosen = _check_component_labels(mixture, component_labels) == label
    if not chosen.any():
        raise ValueError(f"no component has class {label}")
    return GaussianMixture(mixture.weights[chosen], mixture.means[chosen], mixture.covariances[chosen])


def mixture_noisy_classifier(mixture: GaussianMixture, component_labels: torch.Tensor,
                             schedule: NoiseSchedule) -> NoisyClassifier:
    """The exact noisy classifier: (x_t, t) ↦ log p(y | x_t) = log Σ_{k: class k = y} p(k | x_t) under q_t.

    Differentiable in x_t, so :func:`~minidiff.guidance.classifier_guidance` can use it in place of a
    trained classifier.
    """
    component_labels = _check_component_labels(mixture, component_labels)
    num_classes = int(component_labels.max()) + 1
    membership = torch.nn.functional.one_hot(component_labels, num_classes).double()  # [K, classes]

    def log_posterior(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        def at(t: int, rows: torch.Tensor) -> torch.Tensor:
            responsibilities = noised_mixture(mixture, schedule, t).responsibilities(rows).double()
            return (responsibilities @ membership.to(x.device)).clamp_min(1e-300).log()
        return per_timestep(x, timesteps, at)

    return log_posterior


def mixture_guidance_oracles(mixture: GaussianMixture, component_labels: torch.Tensor,
                             schedule: NoiseSchedule) -> tuple[EpsModel, Callable[[int], EpsModel]]:
    """The exact ε of p(x), and a function ``label ↦`` the exact ε of p(x | label), both under ``schedule``."""
    return (mixture_eps_model(mixture, schedule),
            lambda label: mixture_eps_model(class_conditional_mixture(mixture, component_labels, label), schedule))


# ---------------------------------------------------------------------------------------
# An exactly solvable case: Gaussian data (lesson 02, "checking the bound")
# ---------------------------------------------------------------------------------------


class GaussianData:
    """Data x_0 ~ N(mean, var · I), for which the best ε-predictor and the model's likelihood are exact.

    With Gaussian data, E[x_0 | x_t] = mean + k_t (x_t − √ᾱ_t mean), k_t = √ᾱ_t var / (ᾱ_t var + 1 − ᾱ_t),
    so the optimal ε_θ(x_t, t) = E[ε | x_t] = (x_t − √ᾱ_t E[x_0 | x_t]) / √(1 − ᾱ_t) is affine in x_t. The
    reverse chain is then linear-Gaussian, and p_θ(x_0) is a Gaussian found by pushing the mean and
    variance of x_T ~ N(0, 1) back through every step.
    """

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.0, var: float = 1.0) -> None:
        if var <= 0:
            raise ValueError(f"var must be > 0, got {var}")
        self.schedule, self.mean, self.var = schedule, float(mean), float(var)

    def sample(self, n: int, dim: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of shape [n, dim] in float64."""
        return self.mean + self.var**0.5 * torch.randn(n, dim, generator=generator, dtype=torch.float64)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log q(x_0) per example (the data's own density)."""
        return sum_per_example(gaussian_log_prob(x0, torch.tensor(self.mean), torch.tensor(self.var)))

    def optimal_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[ε | x_t]: the ε-predictor that minimises L_simple (and every L_{t−1}) for this data."""
        alpha_bar = self.schedule.gather(self.schedule.alpha_bars, t, x_t)
        gain = alpha_bar.sqrt() * self.var / (alpha_bar * self.var + 1 - alpha_bar)
        x0_mean = self.mean + gain * (x_t - alpha_bar.sqrt() * self.mean)
        return (x_t - alpha_bar.sqrt() * x0_mean) / (1 - alpha_bar).sqrt()

    def model_log_prob(self, x0: torch.Tensor, variance: str = "beta") -> torch.Tensor:
        """log p_θ(x_0) exactly, for the reverse chain driven by :meth:`optimal_eps` (continuous decoder)."""
        schedule = self.schedule
        variances = model_variances(schedule, variance)
        mean, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        probe = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        for t in range(schedule.T, 0, -1):
            timesteps = torch.full((2,), t, dtype=torch.long)
            # μ_θ(x_t, t) is affine in x_t: read its slope and intercept off two points.
            step_mean = posterior_mean_from_eps(schedule, probe, timesteps, self.optimal_eps(probe, timesteps))[:, 0]
            slope, intercept = step_mean[1] - step_mean[0], step_mean[0]
            mean, var = slope * mean + intercept, slope**2 * var + variances[t]
        return sum_per_example(gaussian_log_prob(x0, mean, var))
