"""Lesson 05: the SDE view, checked against closed forms and the exact mixture density."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from minidiff.metrics import compare_to_data, mixture_log_likelihood
from minidiff.oracles import mixture_eps_model, mixture_time_score, noised_mixture
from minidiff.samplers import ddpm_step
from minidiff.schedules import NoiseSchedule
from minidiff.score import annealed_langevin, geometric_sigmas
from minidiff.sde import (
    VESDE,
    VPSDE,
    euler_maruyama,
    ode_euler,
    ode_heun,
    ode_log_likelihood,
    ode_solve_ivp,
    prior_sample,
    probability_flow_drift,
    reverse_sde_sample,
)
from minidiff.toys import eight_gaussians_mixture


@pytest.fixture(scope="module")
def vp() -> VPSDE:
    return VPSDE(NoiseSchedule.linear(1000))


def test_vp_sde_matches_the_discrete_schedule(vp: VPSDE) -> None:
    schedule = vp.schedule
    for k in (0, 1, 10, 500, 1000):
        assert vp.alpha_bar(k / 1000) == pytest.approx(schedule.alpha_bars[k].item(), rel=1e-12)
    # ᾱ(s) = exp(−∫β): integrate the piecewise-constant β numerically
    for s in (0.0123, 0.37, 0.9):
        integral, _ = integrate.quad(vp.beta, 0, s, limit=2000, points=np.arange(1, 1000) / 1000)
        assert vp.alpha_bar(s) == pytest.approx(math.exp(-integral), rel=1e-6)
    # the continuous β(s)/T is close to the discrete β_t for small betas
    assert vp.beta(0.5) / 1000 == pytest.approx(schedule.betas[500].item(), rel=0.01)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_euler_maruyama_forward_marginals_match_the_closed_form(vp: VPSDE, kind: str) -> None:
    sde = vp if kind == "vp" else VESDE(0.01, 5.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((20_000, 1), 0.8, dtype=torch.float64)
    s_end = 0.4
    simulated = euler_maruyama(sde, x0, s_end, steps=400, generator=generator)
    mean = math.sqrt(sde.alpha_bar(s_end)) * 0.8 if kind == "vp" else 0.8
    assert stats.kstest(simulated[:, 0].numpy(), stats.norm(mean, sde.marginal_std(s_end)).cdf).pvalue > 1e-3
    # teeth: a closed form with the wrong noise level is rejected
    wrong_std = 1.2 * sde.marginal_std(s_end)
    assert stats.kstest(simulated[:, 0].numpy(), stats.norm(mean, wrong_std).cdf).pvalue < 1e-6


def assert_samples_the_mixture(samples: torch.Tensor, generator: torch.Generator) -> None:
    mixture = eight_gaussians_mixture()
    comparison = compare_to_data(samples.float(), lambda n, g: mixture.sample(n, g), generator, repeats=10)
    assert comparison.ratio < 2.0, comparison
    data_ll = mixture_log_likelihood(mixture.sample(20_000, generator), mixture)
    assert abs(mixture_log_likelihood(samples, mixture) - data_ll) < 0.06


def test_reverse_sde_with_the_exact_score_samples_the_data(vp: VPSDE) -> None:
    generator = torch.Generator().manual_seed(1)
    score = mixture_time_score(vp, eight_gaussians_mixture())
    samples = reverse_sde_sample(vp, score, prior_sample(vp, (2000, 2), generator), steps=500, generator=generator)
    assert_samples_the_mixture(samples, generator)


def test_probability_flow_ode_with_the_exact_score_samples_the_data(vp: VPSDE) -> None:
    generator = torch.Generator().manual_seed(2)
    drift = probability_flow_drift(vp, mixture_time_score(vp, eight_gaussians_mixture()))
    samples, evaluations = ode_solve_ivp(drift, prior_sample(vp, (2000, 2), generator), 1.0, 1e-3)
    assert evaluations < 400
    assert_samples_the_mixture(samples, generator)


def test_annealed_langevin_with_the_exact_score_samples_the_data() -> None:
    mixture, generator = eight_gaussians_mixture(), torch.Generator().manual_seed(3)
    start = 5 * torch.randn(2000, 2, generator=generator, dtype=torch.float64)
    samples = annealed_langevin(lambda x, sigma: mixture.convolved(sigma**2).score(x), start,
                                geometric_sigmas(5.0, 0.01, 15), steps_per_level=100, step_scale=2e-5,
                                generator=generator)
    assert_samples_the_mixture(samples, generator)


def test_ve_sde_reverse_sampling_with_the_exact_score() -> None:
    ve, generator = VESDE(0.01, 8.0), torch.Generator().manual_seed(4)
    start = prior_sample(ve, (2000, 2), generator)
    samples = reverse_sde_sample(ve, mixture_time_score(ve, eight_gaussians_mixture()), start, steps=1000,
                                 generator=generator, s_min=0.0)
    assert_samples_the_mixture(samples, generator)


def fitted_order(step_counts: list[int], errors: list[float]) -> float:
    slope, _ = np.polyfit(np.log(step_counts), np.log(errors), 1)
    return -slope


def test_smooth_vp_sde_has_the_closed_form_alpha_bar() -> None:
    smooth = VPSDE(beta_min=0.1, beta_max=20.0)
    for s in (0.1, 0.5, 1.0):
        integral, _ = integrate.quad(smooth.beta, 0, s)
        assert smooth.alpha_bar(s) == pytest.approx(math.exp(-integral), rel=1e-10)
    # it is the continuous limit of DDPM's linear schedule: ᾱ(1) ≈ ᾱ_T
    assert smooth.alpha_bar(1.0) == pytest.approx(NoiseSchedule.linear(1000).alpha_bars[-1].item(), rel=0.1)


def test_euler_is_first_order_and_heun_second_order() -> None:
    """Error against a tight reference from the same x_1, as the number of steps doubles (smooth β(s))."""
    generator, smooth = torch.Generator().manual_seed(5), VPSDE(beta_min=0.1, beta_max=20.0)
    drift = probability_flow_drift(smooth, mixture_time_score(smooth, eight_gaussians_mixture()))
    start = prior_sample(smooth, (32, 2), generator)
    s_min = 0.05  # away from the data, where the solution is smooth and the asymptotic order shows
    reference, _ = ode_solve_ivp(drift, start, 1.0, s_min, rtol=1e-11, atol=1e-11, method="DOP853")
    counts = [16, 32, 64, 128]
    euler = [(ode_euler(drift, start, 1.0, s_min, n)[0] - reference).norm(dim=1).mean().item() for n in counts]
    heun = [(ode_heun(drift, start, 1.0, s_min, n)[0] - reference).norm(dim=1).mean().item() for n in counts]
    assert fitted_order(counts, euler) == pytest.approx(1.0, abs=0.25), euler
    assert fitted_order(counts, heun) == pytest.approx(2.0, abs=0.3), heun


def test_ode_log_likelihood_matches_the_exact_mixture_density(vp: VPSDE) -> None:
    mixture, generator = eight_gaussians_mixture(), torch.Generator().manual_seed(6)
    points = mixture.sample(20, generator).double()
    log_likelihood, _ = ode_log_likelihood(vp, mixture_time_score(vp, mixture), points, s_min=1e-3)
    exact = vp.mixture_marginal(mixture, 1e-3).log_prob(points)
    assert (log_likelihood - exact).abs().max().item() < 0.02  # reached: about 0.007 nats at rtol = atol = 1e-6


def test_bad_inputs(vp: VPSDE) -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vp.alpha_bar(1.5)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(1.0, 0.5)
    with pytest.raises(ValueError, match="steps"):
        ode_euler(lambda x, s: x, torch.zeros(1, 2), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        ode_log_likelihood(vp, lambda x, s: x, torch.zeros(2, 2, 2))


def test_a_ddpm_step_is_euler_maruyama_of_the_reverse_sde_to_first_order() -> None:
    """Lesson 05: with g² Δs = β_t, Euler–Maruyama of the reverse VP SDE (3) reads
    x_{t−1} = x_t + β_t (½ x_t + ∇log q_t(x_t)) + √β_t z, while DDPM's step is (x_t + β_t ∇log q_t)/√(1 − β_t) + √β_t z
    (σ² = β). They differ by O(β²): halving β must divide the gap by about 4 (by 2 if a term of order β were off).
    The Euler–Maruyama step is written here from the SDE, with the exact score of the noised mixture."""
    mixture = eight_gaussians_mixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gaps = []
    for beta in (0.02, 0.01, 0.005):
        schedule = NoiseSchedule(torch.full((round(1.4 / beta),), beta))
        t = schedule.T // 2  # ᾱ_t ≈ e^{-0.7} for every β
        score = noised_mixture(mixture, schedule, t).score(x)
        euler_maruyama_step = x + beta * (0.5 * x + score) + beta**0.5 * z
        eps = mixture_eps_model(mixture, schedule)(x, torch.full((64,), t))
        gaps.append((ddpm_step(x, eps, t, schedule, z) - euler_maruyama_step).abs().max().item())
    assert gaps[0] < 0.02 * 0.02 * 10  # of order β²
    for larger, smaller in itertools.pairwise(gaps):
        assert 3.5 < larger / smaller < 4.5, gaps
