"""The model contracts and their adapters (minidiff.contracts), the published sampler steps, and the
agreement of the two probability-flow ODE solvers of lessons 05 and 08."""

import pytest
import torch

from minidiff.contracts import at_level, eps_from_score, eps_from_velocity, per_timestep, score_from_eps
from minidiff.oracles import GaussianData, mixture_eps_model, mixture_time_score, noised_mixture
from minidiff.runtime import standard_normal
from minidiff.samplers import ddim_sample, ddim_step, ddpm_step, pf_ode_sample
from minidiff.schedules import NoiseSchedule
from minidiff.sde import VPSDE, ode_heun, probability_flow_drift
from minidiff.toys import eight_gaussians_mixture

MIXTURE = eight_gaussians_mixture()
SCHEDULE = NoiseSchedule.linear(1000)


def points(count: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_score_from_eps_matches_the_continuous_time_oracle() -> None:
    """The ε-oracle of the discrete schedule, read as a score at s = t/T, is the SDE's exact score there."""
    vp, x = VPSDE(SCHEDULE), points()
    score = score_from_eps(mixture_eps_model(MIXTURE, SCHEDULE), vp)
    for t in (10, 250, 900):
        expected = mixture_time_score(vp, MIXTURE)(x, t / 1000)
        assert torch.allclose(score(x, t / 1000), expected, rtol=1e-6, atol=1e-9), t


def test_eps_from_score_inverts_score_from_eps_and_per_example_timesteps_are_kept_apart() -> None:
    vp, x = VPSDE(SCHEDULE), points(6)
    eps = eps_from_score(mixture_time_score(vp, MIXTURE), SCHEDULE)
    timesteps = torch.tensor([1, 500, 1, 999, 500, 40])
    assert torch.allclose(eps(x, timesteps), mixture_eps_model(MIXTURE, SCHEDULE)(x, timesteps), rtol=1e-6, atol=1e-9)
    level = at_level(mixture_time_score(vp, MIXTURE), 0.5)
    assert torch.allclose(level(x), noised_mixture(MIXTURE, SCHEDULE, 500).score(x), rtol=1e-6)


def test_oracles_refuse_real_valued_timesteps() -> None:
    with pytest.raises(ValueError, match="integer timesteps"):
        per_timestep(points(2), torch.tensor([10.5, 3.0]), lambda t, rows: rows)
    # an integral float is fine: that is what score_from_eps sends at s = t/T
    assert torch.equal(per_timestep(points(2), torch.tensor([10.0, 3.0]), lambda t, rows: rows * t)[:, 0],
                       points(2)[:, 0] * torch.tensor([10.0, 3.0], dtype=torch.float64))


def test_eps_from_velocity_with_the_exact_straight_path_velocity_of_gaussian_data() -> None:
    """For x_0 ~ N(m, v), E[ε − x_0 | x_τ] on x_τ = (1 − τ) x_0 + τ ε follows from Gaussian conditioning
    alone; through the adapter it must give the VP schedule's optimal ε, computed by GaussianData."""
    m, v = 0.7, 0.3

    def exact_velocity(x_tau: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.view(-1, 1)
        covariance = tau - (1 - tau) * v  # Cov(ε − x_0, x_τ)
        variance = (1 - tau) ** 2 * v + tau**2  # Var(x_τ)
        return -m + covariance / variance * (x_tau - (1 - tau) * m)

    data = GaussianData(SCHEDULE, mean=m, var=v)
    x_t = points(8) * 1.3 + 0.2
    for t in (1, 30, 400, 1000):
        timesteps = torch.full((8,), t)
        assert torch.allclose(eps_from_velocity(exact_velocity, SCHEDULE)(x_t, timesteps),
                              data.optimal_eps(x_t, timesteps), rtol=1e-9, atol=1e-10), t


def test_ddim_step_with_eta_one_one_step_back_is_the_ddpm_step_with_posterior_variance() -> None:
    """Two formulas derived in different lessons (08 eq. 12 and 03's Algorithm 2 with σ² = β̃) meet exactly."""
    x_t, eps, z = points(5, 1), points(5, 2), points(5, 3)
    for t in (2, 300, 1000):
        ddim = ddim_step(x_t, eps, float(SCHEDULE.alpha_bars[t]), float(SCHEDULE.alpha_bars[t - 1]), 1.0, z)
        assert torch.allclose(ddim, ddpm_step(x_t, eps, t, SCHEDULE, z, "beta_tilde"), atol=1e-10), t
    assert torch.equal(ddpm_step(x_t, eps, 1, SCHEDULE, z), ddpm_step(x_t, eps, 1, SCHEDULE, 0 * z))  # no noise at t=1


def test_the_two_probability_flow_solvers_agree() -> None:
    """Lesson 08's PF-ODE in (σ̄, x̄) and lesson 05's PF-ODE in (s, x) are one ODE: fine solves meet."""
    x_T = points(200, 4)
    eps = mixture_eps_model(MIXTURE, SCHEDULE)
    in_sigma_bar = pf_ode_sample(eps, SCHEDULE, x_T, steps=1000, method="heun")
    drift = probability_flow_drift(VPSDE(SCHEDULE), mixture_time_score(VPSDE(SCHEDULE), MIXTURE))
    in_time, _ = ode_heun(drift, x_T, 1.0, 0.0, 4000)
    assert (in_sigma_bar - in_time).norm(dim=1).median() < 0.02
    # and a coarse σ̄-solve is visibly off, so the comparison has the resolution to fail
    coarse = pf_ode_sample(eps, SCHEDULE, x_T, steps=3, method="euler")
    assert (coarse - in_time).norm(dim=1).median() > 0.1


def test_samplers_refuse_a_shape_for_x_T() -> None:
    with pytest.raises(ValueError, match="x_T must be a tensor"):
        ddim_sample(mixture_eps_model(MIXTURE, SCHEDULE), SCHEDULE, (4, 2))
    assert standard_normal((3, 2), torch.Generator().manual_seed(0)).shape == (3, 2)


def test_schedule_from_spec() -> None:
    assert torch.equal(NoiseSchedule.from_spec({"kind": "cosine", "T": 50}).betas, NoiseSchedule.cosine(50).betas)
    with pytest.raises(ValueError, match="schedule spec"):
        NoiseSchedule.from_spec({"kind": "quadratic", "T": 50})
