"""Lesson 02: every step of the ELBO derivation, checked against an independent computation."""

import math

import pytest
import torch
from scipy import integrate, stats

from minidiff.elbo import (
    bits_per_dim,
    decoder_term,
    discretized_gaussian_log_likelihood,
    elbo_terms,
    elbo_weights,
    gaussian_kl,
    gaussian_log_prob,
    model_mean_variance,
    model_variances,
    posterior_mean_from_eps,
    posterior_mean_variance,
    prior_term,
    trajectory_bound,
)
from minidiff.oracles import GaussianData
from minidiff.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1000)


# --- the posterior q(x_{t−1} | x_t, x_0) by Bayes' rule on a grid -----------------------


def grid_posterior(schedule: NoiseSchedule, x0: float, x_t: float, t: int) -> tuple[float, float]:
    """Mean and variance of q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0), normalised on a 1D grid.

    Uses only the one-step density and the closed form at t − 1: none of the posterior algebra.
    """
    a_bar_prev, beta = schedule.alpha_bars[t - 1].item(), schedule.betas[t].item()
    # cover both the prior centre √ᾱ_{t−1} x_0 and the likelihood centre x_t / √α_t, with room to spare
    centres = (math.sqrt(a_bar_prev) * x0, x_t / math.sqrt(1 - beta))
    spread = 10 * math.sqrt(max(1 - a_bar_prev, beta))
    grid = torch.linspace(min(centres) - spread, max(centres) + spread, 400_001, dtype=torch.float64)
    log_joint = (stats.norm.logpdf(x_t, math.sqrt(1 - beta) * grid.numpy(), math.sqrt(beta))
                 + stats.norm.logpdf(grid.numpy(), math.sqrt(a_bar_prev) * x0, math.sqrt(1 - a_bar_prev)))
    weights = torch.from_numpy(log_joint).softmax(0)
    mean = (weights * grid).sum().item()
    return mean, (weights * (grid - mean) ** 2).sum().item()


@pytest.mark.parametrize(("t", "x0", "x_t"), [(2, 0.8, 0.75), (50, -1.0, 0.3), (400, 0.5, -1.2), (1000, 0.2, 0.9)])
def test_posterior_matches_bayes_on_a_grid(schedule: NoiseSchedule, t: int, x0: float, x_t: float) -> None:
    grid_mean, grid_var = grid_posterior(schedule, x0, x_t, t)
    mean, var = posterior_mean_variance(schedule, torch.tensor([[x0]], dtype=torch.float64),
                                        torch.tensor([[x_t]], dtype=torch.float64), t)
    assert mean.item() == pytest.approx(grid_mean, rel=1e-6, abs=1e-8)
    assert var.item() == pytest.approx(grid_var, rel=1e-4)


def test_grid_check_rejects_beta_in_place_of_beta_tilde(schedule: NoiseSchedule) -> None:
    """Mutation: the DDPM 'large' variance β_t is not the posterior variance; the grid check must notice."""
    _, grid_var = grid_posterior(schedule, 0.5, -1.2, 400)
    assert schedule.betas[400].item() != pytest.approx(grid_var, rel=1e-4)


def test_mean_through_eps_equals_mean_through_x0(schedule: NoiseSchedule) -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 100, 500, 999, 1000])
    x_t = schedule.q_sample(x0, t, eps)
    through_x0, _ = posterior_mean_variance(schedule, x0, x_t, t)
    assert torch.allclose(posterior_mean_from_eps(schedule, x_t, t, eps), through_x0, rtol=1e-9, atol=1e-10)


# --- the Gaussian KL, analytic vs Monte Carlo -----------------------------------------


def test_gaussian_kl_matches_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(0)
    mean_1, var_1, mean_2, var_2 = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]), torch.tensor([-0.2, 0.0]), \
        torch.tensor([1.5, 0.7])
    draws = mean_1 + var_1.sqrt() * torch.randn(400_000, 2, generator=generator)
    log_ratio = gaussian_log_prob(draws, mean_1, var_1) - gaussian_log_prob(draws, mean_2, var_2)
    standard_error = log_ratio.std(0) / 400_000**0.5
    assert ((log_ratio.mean(0) - gaussian_kl(mean_1, var_1, mean_2, var_2)).abs() < 5 * standard_error).all()


def test_gaussian_kl_is_zero_only_for_equal_gaussians_and_broadcasts() -> None:
    assert gaussian_kl(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)).abs().max() == 0
    assert gaussian_kl(torch.zeros(4, 1), torch.ones(1), torch.ones(4, 5), torch.ones(1)).shape == (4, 5)
    with pytest.raises(ValueError, match="positive"):
        gaussian_kl(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1))


# --- from mean matching to noise prediction -------------------------------------------


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_kl_is_lambda_times_eps_error_plus_a_constant(schedule: NoiseSchedule, variance: str) -> None:
    """KL(q(x_{t−1}|x_t,x_0) ‖ p_θ) − λ_t ‖ε − ε_θ‖² does not depend on ε_θ, and is 0 for σ_t² = β̃_t."""
    generator = torch.Generator().manual_seed(1)
    weights = elbo_weights(schedule, variance)
    for t in (2, 30, 300, 1000):
        x0 = torch.randn(1, 4, generator=generator, dtype=torch.float64)
        eps = torch.randn(1, 4, generator=generator, dtype=torch.float64)
        x_t = schedule.q_sample(x0, t, eps)
        true_mean, true_var = posterior_mean_variance(schedule, x0, x_t, t)
        gaps = []
        for _ in range(3):  # arbitrary "network outputs"
            eps_pred = torch.randn(1, 4, generator=generator, dtype=torch.float64)
            model_mean, model_var = model_mean_variance(schedule, x_t, t, eps_pred, variance)
            kl = gaussian_kl(true_mean, true_var, model_mean, model_var).sum()
            gaps.append((kl - weights[t] * ((eps - eps_pred) ** 2).sum()).item())
        assert max(gaps) - min(gaps) == pytest.approx(0, abs=1e-8 * max(1.0, abs(gaps[0])))
        if variance == "beta_tilde":
            assert gaps[0] == pytest.approx(0, abs=1e-8)


def test_lambda_without_alpha_fails_the_kl_identity(schedule: NoiseSchedule) -> None:
    """Mutation: dropping α_t from λ_t's denominator breaks the identity that the test above checks."""
    t, generator = 900, torch.Generator().manual_seed(2)
    x0, eps, eps_pred = (torch.randn(1, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    x_t = schedule.q_sample(x0, t, eps)
    true_mean, true_var = posterior_mean_variance(schedule, x0, x_t, t)
    model_mean, model_var = model_mean_variance(schedule, x_t, t, eps_pred, "beta_tilde")
    kl = gaussian_kl(true_mean, true_var, model_mean, model_var).sum().item()
    beta, a_bar = schedule.betas[t], schedule.alpha_bars[t]
    wrong_lambda = beta**2 / (2 * schedule.posterior_variances[t] * (1 - a_bar))
    assert kl != pytest.approx((wrong_lambda * ((eps - eps_pred) ** 2).sum()).item(), rel=1e-3)


def test_variance_choices(schedule: NoiseSchedule) -> None:
    assert torch.equal(model_variances(schedule, "beta"), schedule.betas)
    small = model_variances(schedule, "beta_tilde")
    assert small[1] == schedule.betas[1] and torch.equal(small[2:], schedule.posterior_variances[2:])
    with pytest.raises(ValueError, match="variance kind"):
        model_variances(schedule, "learned")


# --- the whole bound on Gaussian data ----------------------------------------------------


def bound_estimates(T: int, seed: int = 0, repeats: int = 3000) -> dict[str, torch.Tensor]:
    schedule = NoiseSchedule.cosine(T)
    data = GaussianData(schedule, mean=0.5, var=0.3**2)
    generator = torch.Generator().manual_seed(seed)
    points = data.sample(4, generator=generator)  # four data points, each with many trajectories
    x0 = points.repeat_interleave(repeats, 0)
    analytic = elbo_terms(schedule, data.optimal_eps, x0, generator, decoder="gaussian")["total"].reshape(4, repeats)
    trajectories = trajectory_bound(schedule, data.optimal_eps, x0, generator, decoder="gaussian").reshape(4, repeats)
    return {"analytic": analytic, "trajectories": trajectories, "model_nll": -data.model_log_prob(points),
            "data_nll": -data.log_prob(points)}


@pytest.fixture(scope="module", params=[10, 100, 1000])
def estimates(request: pytest.FixtureRequest) -> tuple[int, dict[str, torch.Tensor]]:
    return request.param, bound_estimates(request.param)


def standard_error(samples: torch.Tensor) -> torch.Tensor:
    return samples.std(1) / samples.shape[1] ** 0.5


def test_sum_of_terms_equals_the_trajectory_monte_carlo(estimates: tuple[int, dict[str, torch.Tensor]]) -> None:
    _, e = estimates
    difference = e["analytic"].mean(1) - e["trajectories"].mean(1)
    combined = (standard_error(e["analytic"]) ** 2 + standard_error(e["trajectories"]) ** 2).sqrt()
    assert (difference.abs() < 5 * combined).all(), (difference, combined)


def test_bound_is_never_below_the_exact_model_nll(estimates: tuple[int, dict[str, torch.Tensor]]) -> None:
    _, e = estimates
    bound = e["trajectories"].mean(1)
    assert (bound > e["model_nll"] - 4 * standard_error(e["trajectories"])).all(), (bound, e["model_nll"])


def test_bound_tightens_as_T_grows() -> None:
    gaps = []
    for T in (10, 100, 1000):
        e = bound_estimates(T, seed=5, repeats=2000)
        gaps.append((e["trajectories"].mean(1) - e["model_nll"]).mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps
    assert gaps[2] < 0.02  # within 0.02 nats of the exact likelihood at T = 1000


def test_prior_term_is_negligible_for_standard_schedules() -> None:
    """L_T for an MNIST-sized example (784 values in [-1, 1]) in bits/dim: ≈ 2e-5 (linear), ≈ 2e-9 (cosine)."""
    x0 = torch.ones(1, 784, dtype=torch.float64)  # the worst case: every pixel at the extreme
    linear = bits_per_dim(prior_term(NoiseSchedule.linear(1000), x0), x0).item()
    cosine = bits_per_dim(prior_term(NoiseSchedule.cosine(1000), x0), x0).item()
    assert 1e-6 < linear < 1e-4 and cosine < 1e-7
    # against the KL written out by hand for one dimension
    a_bar = NoiseSchedule.linear(1000).alpha_bars[-1].item()
    by_hand = 0.5 * (a_bar * 1.0 + (1 - a_bar) - 1 - math.log(1 - a_bar))
    assert linear == pytest.approx(by_hand / math.log(2), rel=1e-6)


# --- the decoder for 8-bit data ------------------------------------------------------------


def test_discretized_likelihood_is_a_probability_mass_function() -> None:
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in ((0.0, 0.01), (0.99, 0.05), (-0.3, 0.5), (2.0, 0.1)):
        mass = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(std)).exp()
        assert mass.sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("mean", "std", "level"), [(0.1, 0.03, 140), (0.1, 0.03, 137), (0.1, 0.01, 141),
                                                   (0.98, 0.02, 255), (-0.99, 0.05, 0), (-0.5, 0.3, 3)])
def test_discretized_likelihood_matches_numerical_integration(mean: float, std: float, level: int) -> None:
    x = -1 + 2 * level / 255
    # the outer bins reach to ±∞; 40 standard deviations is infinity to double precision
    low = mean - 40 * std if level == 0 else x - 1 / 255
    high = mean + 40 * std if level == 255 else x + 1 / 255
    mass, _ = integrate.quad(lambda v: stats.norm.pdf(v, mean, std), low, high, points=[mean] if low < mean < high
                             else None)
    as64 = {"dtype": torch.float64}
    got = discretized_gaussian_log_likelihood(torch.tensor(x, **as64), torch.tensor(mean, **as64),
                                              torch.tensor(std, **as64)).exp().item()
    assert got == pytest.approx(mass, rel=1e-6)


def test_decoder_term_for_a_perfect_denoiser_is_the_bin_mass_of_its_noise(schedule: NoiseSchedule) -> None:
    """With the true ε, μ_θ(x_1) = x_0 exactly; what is left is the mass of N(x_0, β_1) in x_0's bin.

    σ_1 = √β_1 = 0.01 is wider than the half-bin 1/255, so even a perfect denoiser pays about 1.19 nats per
    interior pixel: the price of DDPM's fixed decoder variance.
    """
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (8, 1, 4, 4), generator=generator).double() / 255 * 2 - 1
    oracle_noise: dict[str, torch.Tensor] = {}

    def oracle(x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        oracle_noise["eps"] = schedule.eps_from_x0(x_1, t, x0)
        return oracle_noise["eps"]

    nats = decoder_term(schedule, oracle, x0, generator, decoder="discretized")
    # independent value: −log of the N(x_0, β_1) mass of each pixel's bin, the outer bins reaching to ±∞
    std, half = math.sqrt(schedule.betas[1].item()), 1 / 255
    interior = -math.log(stats.norm.cdf(half / std) - stats.norm.cdf(-half / std))
    edge = -math.log(stats.norm.cdf(half / std))
    at_edge = (x0.abs() > 1 - half).reshape(8, -1).sum(1).double()
    assert torch.allclose(nats, at_edge * edge + (16 - at_edge) * interior, rtol=1e-8)


# --- the VAE recap: a linear-Gaussian VAE with the exact posterior is tight -----------------


def linear_vae_elbo(x: float, weight: float, bias: float, noise_var: float, enc_mean: float, enc_var: float,
                    num_samples: int = 1000) -> torch.Tensor:
    """Monte Carlo ELBO of p(z) = N(0,1), p(x|z) = N(w z + b, s²), encoder q(z|x) = N(enc_mean, enc_var)."""
    generator = torch.Generator().manual_seed(0)
    z = enc_mean + enc_var**0.5 * torch.randn(num_samples, generator=generator, dtype=torch.float64)
    log_joint = gaussian_log_prob(torch.tensor(x), weight * z + bias, torch.tensor(noise_var)) + \
        gaussian_log_prob(z, torch.tensor(0.0), torch.tensor(1.0))
    return log_joint - gaussian_log_prob(z, torch.tensor(enc_mean), torch.tensor(enc_var))


def test_vae_with_the_exact_posterior_has_elbo_equal_to_log_likelihood() -> None:
    x, weight, bias, noise_var = 1.3, 2.0, 0.5, 0.25
    log_px = stats.norm.logpdf(x, bias, math.sqrt(weight**2 + noise_var))
    post_mean = weight * (x - bias) / (weight**2 + noise_var)
    post_var = noise_var / (weight**2 + noise_var)
    exact = linear_vae_elbo(x, weight, bias, noise_var, post_mean, post_var)
    # every single sample equals log p(x): the bound is tight with zero variance
    assert torch.allclose(exact, torch.full_like(exact, log_px), atol=1e-10)
    # a wrong encoder is strictly below, by exactly KL(q ‖ p(z|x))
    wrong = linear_vae_elbo(x, weight, bias, noise_var, post_mean + 0.3, post_var * 2, num_samples=200_000)
    gap = gaussian_kl(torch.tensor(post_mean + 0.3), torch.tensor(post_var * 2), torch.tensor(post_mean),
                      torch.tensor(post_var)).item()
    assert wrong.mean().item() == pytest.approx(log_px - gap, abs=5 * wrong.std().item() / 200_000**0.5)
    assert gap > 0.1
