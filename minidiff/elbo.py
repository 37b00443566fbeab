"""The reverse process and the variational bound, term by term (lesson 02).

The bound (Ho et al. 2020, eq. 5) on the negative log-likelihood of one example x_0:

    −log p_θ(x_0) ≤ E_q[ log q(x_{1:T} | x_0) − log p_θ(x_{0:T}) ]
                 = L_T + Σ_{t=2}^T L_{t−1} + L_0,

    L_T     = KL( q(x_T | x_0) ‖ N(0, I) )                         (prior term, no parameters)
    L_{t−1} = E_{x_t ~ q} KL( q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t) )   (t = 2..T)
    L_0     = −E_{x_1 ~ q} log p_θ(x_0 | x_1)                           (decoder)

An ε-model is an :data:`~minidiff.contracts.EpsModel`, ``eps_model(x_t, timesteps) -> ε̂`` with one of the
paper's timesteps per example (see :mod:`minidiff.schedules`). The reverse model is
p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I) with μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε̂) / √α_t and a fixed
σ_t² ∈ {β_t, β̃_t}. At t = 1 both choices use σ_1² = β_1, because β̃_1 = 0 would make the decoder a
point mass. All per-example quantities are sums over every non-batch dimension, in nats.
"""

from __future__ import annotations

import math

import torch

from minidiff.contracts import EpsModel
from minidiff.runtime import randn_like
from minidiff.schedules import NoiseSchedule, Timesteps

VARIANCE_KINDS = ("beta", "beta_tilde")


def sum_per_example(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (the batch): a per-example total, in nats for log-densities."""
    return values.reshape(values.shape[0], -1).sum(1) if values.ndim > 1 else values


# ---------------------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------------------


def gaussian_kl(mean_1: torch.Tensor, var_1: torch.Tensor, mean_2: torch.Tensor, var_2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_1, var_1) ‖ N(mean_2, var_2)) elementwise for diagonal Gaussians (lesson 02, eq. KL):

    ½ [ log(var_2 / var_1) + (var_1 + (mean_1 − mean_2)²) / var_2 − 1 ].  Arguments broadcast.
    """
    mean_1, var_1, mean_2, var_2 = (torch.as_tensor(v) for v in (mean_1, var_1, mean_2, var_2))
    if (var_1 <= 0).any() or (var_2 <= 0).any():
        raise ValueError("gaussian_kl needs strictly positive variances var_1 and var_2")
    return 0.5 * (torch.log(var_2 / var_1) + (var_1 + (mean_1 - mean_2) ** 2) / var_2 - 1.0)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) elementwise (arguments broadcast)."""
    var = torch.as_tensor(var)
    if (var <= 0).any():
        raise ValueError("gaussian_log_prob needs a strictly positive var")
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log P(x_0) for data on ``bins`` levels evenly spaced in [-1, 1], under N(mean, std²) (Ho et al. 2020, eq. 13).

    Each level owns the interval of width 2/(bins − 1) around it; the lowest level extends to −∞ and the
    highest to +∞, so the probabilities of all levels sum to one. Elementwise; arguments broadcast.
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if (std <= 0).any():
        raise ValueError("discretized_gaussian_log_likelihood needs a strictly positive std")
    if x0.min() < -1 - 1e-6 or x0.max() > 1 + 1e-6:
        raise ValueError("x0 must be scaled to [-1, 1] (see minidiff.data.load_mnist)")
    half_width = 1.0 / (bins - 1)
    upper = (x0 + half_width - mean) / std
    lower = (x0 - half_width - mean) / std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper), stable far in the left tail
    log_survival_lower = torch.special.log_ndtr(-lower)  # log (1 − Φ(lower)), stable far in the right tail
    # log(Φ(u) − Φ(l)) = log Φ(u) + log(1 − Φ(l)/Φ(u)); computed via the smaller tail for stability
    log_mass_middle = torch.where(
        lower > 0,
        log_survival_lower + torch.log1p(-torch.exp(torch.special.log_ndtr(-upper) - log_survival_lower)),
        log_cdf_upper + torch.log1p(-torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper)),
    )
    lowest, highest = x0 < -1 + half_width, x0 > 1 - half_width
    return torch.where(lowest, log_cdf_upper, torch.where(highest, log_survival_lower, log_mass_middle))


# ---------------------------------------------------------------------------------------
# The posterior q(x_{t−1} | x_t, x_0) and the model p_θ(x_{t−1} | x_t)
# ---------------------------------------------------------------------------------------


def posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor,
                            t: Timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """μ̃_t(x_t, x_0) and β̃_t of q(x_{t−1} | x_t, x_0) (lesson 02, eqs. 7–8), written through x_0; t in 1..T."""
    mean = schedule.posterior_mean(x0, x_t, t)
    return mean, schedule.gather(schedule.posterior_variances, t, x_t).expand_as(x_t)


def posterior_mean_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: Timesteps,
                            eps: torch.Tensor) -> torch.Tensor:
    """μ̃_t written through the noise: (x_t − β_t/√(1 − ᾱ_t) ε) / √α_t (lesson 02, eq. 11; Ho et al. eq. 10)."""
    if x_t.shape != eps.shape:
        raise ValueError(f"shape mismatch: x_t {tuple(x_t.shape)}, eps {tuple(eps.shape)} must have the same shape")
    beta = schedule.gather(schedule.betas, t, x_t)
    alpha_bar = schedule.gather(schedule.alpha_bars, t, x_t)
    return (x_t - beta / (1.0 - alpha_bar).sqrt() * eps) / (1.0 - beta).sqrt()


def model_variances(schedule: NoiseSchedule, kind: str = "beta") -> torch.Tensor:
    """σ_t² for t = 0..T (entry 0 unused, 0): β_t ("beta") or β̃_t ("beta_tilde"), with σ_1² = β_1 in both."""
    if kind not in VARIANCE_KINDS:
        raise ValueError(f"variance kind must be one of {VARIANCE_KINDS}, got {kind!r}")
    variances = schedule.betas.clone() if kind == "beta" else schedule.posterior_variances.clone()
    variances[1] = schedule.betas[1]
    return variances


def model_mean_variance(schedule: NoiseSchedule, x_t: torch.Tensor, t: Timesteps, eps_pred: torch.Tensor,
                        variance: str = "beta") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of p_θ(x_{t−1} | x_t) from an ε-prediction (lesson 02, eq. 11): the posterior mean
    with ε̂ in place of the true ε, and the fixed σ_t² of :func:`model_variances`."""
    mean = posterior_mean_from_eps(schedule, x_t, t, eps_pred)
    return mean, schedule.gather(model_variances(schedule, variance), t, x_t).expand_as(x_t)


def elbo_weights(schedule: NoiseSchedule, variance: str = "beta") -> torch.Tensor:
    """λ_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) for t = 0..T (λ_0 = 0), the weight in lesson 02, eq. 10:

    L_{t−1} = λ_t E‖ε − ε_θ‖² + a constant that does not depend on θ (zero when σ_t² = β̃_t).
    """
    variances = model_variances(schedule, variance)
    weights = torch.zeros_like(variances)
    steps = slice(1, None)
    weights[steps] = schedule.betas[steps] ** 2 / (
        2 * variances[steps] * schedule.alphas[steps] * (1 - schedule.alpha_bars[steps]))
    return weights


# ---------------------------------------------------------------------------------------
# The terms of the bound
# ---------------------------------------------------------------------------------------


def prior_term(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per example: no parameters, and tiny for a good schedule."""
    mean, var = schedule.q_mean_variance(x0, schedule.T)
    return sum_per_example(gaussian_kl(mean, var, torch.zeros_like(mean), torch.ones_like(var)))


def diffusion_term(schedule: NoiseSchedule, eps_model: EpsModel, x0: torch.Tensor, t: int,
                   generator: torch.Generator | None = None, variance: str = "beta") -> torch.Tensor:
    """One-sample estimate of L_{t−1} = E_{x_t} KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)), per example.

    t in 2..T; x_t is drawn once per example from q(x_t | x_0).
    """
    if not isinstance(t, int) or not 2 <= t <= schedule.T:
        raise ValueError(f"diffusion_term needs an int t in 2..{schedule.T} (t = 1 is the decoder L_0), got {t!r}")
    noise = randn_like(x0, generator)
    x_t = schedule.q_sample(x0, t, noise)
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    true_mean, true_var = posterior_mean_variance(schedule, x0, x_t, timesteps)
    model_mean, model_var = model_mean_variance(schedule, x_t, timesteps, eps_model(x_t, timesteps), variance)
    return sum_per_example(gaussian_kl(true_mean, true_var, model_mean, model_var))


def decoder_term(schedule: NoiseSchedule, eps_model: EpsModel, x0: torch.Tensor,
                 generator: torch.Generator | None = None, decoder: str = "discretized",
                 variance: str = "beta") -> torch.Tensor:
    """One-sample estimate of L_0 = −E_{x_1} log p_θ(x_0 | x_1), per example.

    ``decoder="discretized"`` for 8-bit data in [-1, 1] (DDPM's choice), ``"gaussian"`` for continuous data.
    """
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")
    noise = randn_like(x0, generator)
    x_1 = schedule.q_sample(x0, 1, noise)
    ones = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
    mean, var = model_mean_variance(schedule, x_1, ones, eps_model(x_1, ones), variance)
    if decoder == "gaussian":
        return -sum_per_example(gaussian_log_prob(x0, mean, var))
    return -sum_per_example(discretized_gaussian_log_likelihood(x0, mean, var.sqrt()))


@torch.no_grad()
def elbo_terms(schedule: NoiseSchedule, eps_model: EpsModel, x0: torch.Tensor,
               generator: torch.Generator | None = None, decoder: str = "discretized",
               variance: str = "beta") -> dict[str, torch.Tensor]:
    """All terms of the bound for a batch, each estimated with one x_t per example and t.

    Returns ``prior`` (L_T, [B]), ``diffusion`` (L_1..L_{T−1}, [B, T−1], column j is t = j + 2),
    ``decoder`` (L_0, [B]) and ``total`` ([B]), all in nats. Costs T calls of ``eps_model``.
    """
    diffusion = torch.stack([diffusion_term(schedule, eps_model, x0, t, generator, variance)
                             for t in range(2, schedule.T + 1)], dim=1) if schedule.T > 1 else x0.new_zeros(len(x0), 0)
    prior = prior_term(schedule, x0)
    decoder_nats = decoder_term(schedule, eps_model, x0, generator, decoder, variance)
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder_nats,
            "total": prior + diffusion.sum(1) + decoder_nats}


def bits_per_dim(nats: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Convert per-example nats to bits per dimension: nats / (D · ln 2), D = number of values in one example."""
    dims = x0[0].numel()
    return nats / (dims * math.log(2))


@torch.no_grad()
def trajectory_bound(schedule: NoiseSchedule, eps_model: EpsModel, x0: torch.Tensor,
                     generator: torch.Generator | None = None, decoder: str = "gaussian",
                     variance: str = "beta") -> torch.Tensor:
    """log q(x_{1:T} | x_0) − log p_θ(x_{0:T}) for one forward trajectory per example (lesson 02, eq. 5).

    Its average over trajectories is the same bound as :func:`elbo_terms`' total, computed without any
    of the algebra (no posterior, no KL): the independent check of the decomposition.
    """
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")
    log_ratio = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    x_prev = x0
    variances = model_variances(schedule, variance)
    for t in range(1, schedule.T + 1):
        x_t = schedule.q_step(x_prev, t, randn_like(x0, generator))
        beta = schedule.betas[t].item()
        log_ratio += sum_per_example(gaussian_log_prob(x_t, (1 - beta) ** 0.5 * x_prev, torch.tensor(beta)))
        timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        model_mean = posterior_mean_from_eps(schedule, x_t, timesteps, eps_model(x_t, timesteps))
        model_var = variances[t].to(x0.dtype)
        if t == 1 and decoder == "discretized":
            log_ratio -= sum_per_example(discretized_gaussian_log_likelihood(x_prev, model_mean, model_var.sqrt()))
        else:
            log_ratio -= sum_per_example(gaussian_log_prob(x_prev, model_mean, model_var))
        x_prev = x_t
    log_ratio -= sum_per_example(gaussian_log_prob(x_prev, torch.zeros_like(x_prev), torch.tensor(1.0)))
    return log_ratio


def l_simple(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """L_simple = mean ‖ε − ε_θ‖² over every dimension (Ho et al. 2020, eq. 14): the bound with λ_t dropped."""
    if eps.shape != eps_pred.shape:
        raise ValueError(f"shape mismatch: eps {tuple(eps.shape)}, eps_pred {tuple(eps_pred.shape)}")
    return ((eps - eps_pred) ** 2).mean()
