"""Lesson 08: DDIM, the probability-flow solvers, DPM-Solver++(2M), inversion and slerp."""

import numpy as np
import pytest
import torch

from minidiff.oracles import mixture_eps_model
from minidiff.samplers import (
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_pp_sample,
    pf_ode_sample,
    slerp,
    threshold_x0,
    thresholded,
    timestep_sequence,
)
from minidiff.schedules import NoiseSchedule
from minidiff.toys import eight_gaussians_mixture

MIXTURE = eight_gaussians_mixture()


def start_noise(count: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_timestep_sequences() -> None:
    assert timestep_sequence(1000, 10, "leading") == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert timestep_sequence(1000, 10, "trailing") == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert timestep_sequence(1000, 4, "linspace") == [1000, 667, 334, 1]
    assert timestep_sequence(10, 10) == list(range(10, 0, -1))
    with pytest.raises(ValueError, match=r"steps \(11\) cannot exceed the schedule's T = 10"):
        timestep_sequence(10, 11)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        timestep_sequence(10, 0)
    with pytest.raises(ValueError, match="spacing"):
        timestep_sequence(10, 5, "random")


def test_samplers_reject_bad_arguments() -> None:
    schedule = NoiseSchedule.linear(20)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_T = start_noise(4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(eps, schedule, x_T, eta=-0.1)
    with pytest.raises(ValueError, match="cannot exceed"):
        dpm_solver_pp_sample(eps, schedule, x_T, steps=21)
    with pytest.raises(ValueError, match="method"):
        pf_ode_sample(eps, schedule, x_T, method="rk4")
    with pytest.raises(ValueError, match="nothing to threshold"):
        thresholded(eps, schedule)


def test_ddim_with_eta_one_over_all_steps_is_ddpm_with_posterior_variance() -> None:
    """η = 1, every step: σ² = β̃_t exactly, so with the same random draws DDIM *is* DDPM(σ² = β̃)."""
    schedule = NoiseSchedule.linear(50, start=2e-3, end=0.3)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_T = start_noise()
    ddim = ddim_sample(eps, schedule, x_T=x_T, steps=50, eta=1.0, generator=torch.Generator().manual_seed(3))
    ddpm = ddpm_sample(eps, schedule, x_T=x_T, variance="beta_tilde", generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddim, ddpm, atol=1e-10)
    not_beta = ddpm_sample(eps, schedule, x_T=x_T, variance="beta", generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(ddim, not_beta, atol=1e-3)  # the check can tell β from β̃


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not() -> None:
    schedule = NoiseSchedule.linear(100)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_T = start_noise(50)
    first = ddim_sample(eps, schedule, x_T=x_T, steps=20, generator=torch.Generator().manual_seed(1))
    second = ddim_sample(eps, schedule, x_T=x_T, steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    noisy = [ddim_sample(eps, schedule, x_T=x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(s))
             for s in (1, 2)]
    assert not torch.allclose(noisy[0], noisy[1])


def test_one_ddim_step_is_an_euler_step_of_the_pf_ode_in_scaled_variables() -> None:
    """Written independently here: x̄ = x/√ᾱ, σ̄ = √(1−ᾱ)/√ᾱ, x̄_s = x̄_t + (σ̄_s − σ̄_t) ε(x_t, t)."""
    schedule = NoiseSchedule.cosine(1000)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_t = start_noise(100)
    t, s = 1000, 500  # ddim_sample with 2 trailing steps visits 1000 then 500, then jumps to 0
    a_t, a_s = schedule.alpha_bars[t].item(), schedule.alpha_bars[s].item()
    x_bar = x_t / np.sqrt(a_t) + (np.sqrt((1 - a_s) / a_s) - np.sqrt((1 - a_t) / a_t)) * eps(x_t, torch.full((100,), t))
    x_s = x_bar * np.sqrt(a_s)
    x_0 = x_s / np.sqrt(a_s) + (0.0 - np.sqrt((1 - a_s) / a_s)) * eps(x_s, torch.full((100,), s))
    assert torch.allclose(ddim_sample(eps, schedule, x_T=x_t, steps=2), x_0, atol=1e-10)
    assert torch.allclose(pf_ode_sample(eps, schedule, x_T=x_t, steps=2, method="euler"), x_0, atol=1e-10)


def fitted_order(sampler, steps: list[int], schedule: NoiseSchedule, x_T: torch.Tensor,
                 reference: torch.Tensor) -> float:
    errors = [(sampler(n) - reference).norm(dim=1).mean().item() for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def test_orders_of_convergence_with_the_exact_mixture_score() -> None:
    """Error vs a 1000-step Heun reference as steps double: DDIM ~1, Heun ~2, DPM-Solver++(2M) ~2."""
    schedule = NoiseSchedule.cosine(1000)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_T = start_noise(300)
    reference = pf_ode_sample(eps, schedule, x_T=x_T, steps=1000, method="heun")
    ddim = fitted_order(lambda n: ddim_sample(eps, schedule, x_T=x_T, steps=n), [40, 80, 160], schedule, x_T, reference)
    heun = fitted_order(lambda n: pf_ode_sample(eps, schedule, x_T=x_T, steps=n), [80, 160, 320], schedule, x_T,
                        reference)
    dpm = fitted_order(lambda n: dpm_solver_pp_sample(eps, schedule, x_T=x_T, steps=n), [40, 80, 160], schedule, x_T,
                       reference)
    assert 0.8 < ddim < 1.25, ddim
    assert 1.7 < heun < 3.2, heun
    assert 1.7 < dpm < 2.6, dpm


def test_fast_samplers_land_on_the_mixture() -> None:
    """With the exact score each sampler lands within 0.1 nats of the data's mean log-density.

    The modes are narrow (std 0.15), and coarse deterministic samplers over-concentrate on them: the excess
    measured 0.12 for DDIM with 50 steps, 0.05 with 200 and 0.03 with 1000 (lesson 08), hence the step counts.
    """
    schedule = NoiseSchedule.cosine(1000)
    eps = mixture_eps_model(MIXTURE, schedule)
    x_T = start_noise(2000, seed=5)
    data_level = MIXTURE.log_prob(MIXTURE.sample(20000, torch.Generator().manual_seed(0))).mean().item()
    for samples in (ddim_sample(eps, schedule, x_T=x_T, steps=200),
                    pf_ode_sample(eps, schedule, x_T=x_T, steps=100),
                    dpm_solver_pp_sample(eps, schedule, x_T=x_T, steps=50),
                    ddim_sample(eps, schedule, x_T=x_T, steps=1000, eta=1.0, generator=torch.Generator())):
        assert abs(MIXTURE.log_prob(samples).mean().item() - data_level) < 0.1


def test_inversion_reconstructs_and_improves_with_steps() -> None:
    schedule = NoiseSchedule.cosine(1000)
    eps = mixture_eps_model(MIXTURE, schedule)
    x0 = MIXTURE.sample(300, torch.Generator().manual_seed(2))
    errors = []
    for steps in (20, 100):
        x_T = ddim_invert(eps, schedule, x0, steps=steps)
        errors.append((ddim_sample(eps, schedule, x_T=x_T, steps=steps) - x0).norm(dim=1).mean().item())
    assert errors[1] < errors[0] and errors[1] < 0.05, errors
    x_T = ddim_invert(eps, schedule, x0, steps=100)
    assert abs(x_T.std().item() - 1.0) < 0.15  # the inverted points look like N(0, I) noise


def test_threshold_and_clip() -> None:
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.1]])
    assert torch.equal(threshold_x0(x0, clip=1.0), x0.clamp(-1, 1))
    dynamic = threshold_x0(x0, dynamic_percentile=1.0)
    assert torch.allclose(dynamic[0], x0[0] / 3.0) and torch.equal(dynamic[1], x0[1])  # s = max(1, max|x|)
    with pytest.raises(ValueError, match="dynamic_percentile"):
        threshold_x0(x0, dynamic_percentile=1.5)


def test_clipping_keeps_samples_in_range() -> None:
    schedule = NoiseSchedule.linear(100)
    wild = lambda x, t: 3.0 * torch.ones_like(x)  # noqa: E731  a bad model that predicts huge noise
    x_T = start_noise(20)
    clipped = thresholded(wild, schedule, clip=1.0)
    assert ddim_sample(clipped, schedule, x_T=x_T, steps=10).abs().max() <= 1.0 + 1e-9
    assert dpm_solver_pp_sample(clipped, schedule, x_T=x_T, steps=10).abs().max() <= 1.0 + 1e-9
    assert pf_ode_sample(clipped, schedule, x_T=x_T, steps=10, method="euler").abs().max() <= 1.0 + 1e-9
    assert ddim_sample(wild, schedule, x_T=x_T, steps=10).abs().max() > 1.5


def test_slerp_stays_on_the_sphere_and_hits_its_ends() -> None:
    generator = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 784, generator=generator)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-5) and torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-5)
    middle = slerp(z0, z1, 0.5)
    assert torch.allclose(middle.norm(dim=1), (z0.norm(dim=1) + z1.norm(dim=1)) / 2, rtol=0.02)
    assert ((z0 + z1) / 2).norm(dim=1).mean() < 0.8 * middle.norm(dim=1).mean()  # the straight line sags
    with pytest.raises(ValueError, match="same shape"):
        slerp(z0, z1[:2], 0.5)


def test_callbacks_see_every_step_in_order() -> None:
    schedule = NoiseSchedule.linear(100)
    eps = mixture_eps_model(MIXTURE, schedule)
    for sampler in (ddim_sample, pf_ode_sample, dpm_solver_pp_sample):
        states = []
        final = sampler(eps, schedule, x_T=start_noise(5), steps=10, callback=states.append)
        assert [state["i"] for state in states] == list(range(10))
        assert [state["t"] for state in states] == list(range(100, 0, -10))
        assert [state["t_next"] for state in states] == [*range(90, 0, -10), 0]
        assert torch.equal(states[-1]["x"], final)
        # the x̂_0 reported at each step is the closed form solved for x_0 with the model's ε at that step
        first = states[0]
        x_T = start_noise(5)
        expected_x0 = schedule.x0_from_eps(x_T, 100, eps(x_T, torch.full((5,), 100)))
        assert torch.allclose(first["x0"], expected_x0, atol=1e-10), sampler.__name__
