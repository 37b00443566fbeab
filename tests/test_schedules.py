"""Lesson 01: schedules and the forward process, checked against independent computations."""

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from minidiff.schedules import NoiseSchedule, betas_from_alpha_bars, cosine_betas, linear_betas, sigmoid_betas


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1000)


# --- the schedules themselves ---------------------------------------------------------


def test_linear_betas_match_the_paper() -> None:
    betas = linear_betas(1000)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_alpha_bars_follow_the_cosine_law() -> None:
    # Independent of betas_from_alpha_bars: rebuild ᾱ_t as a product of (1 − β) and compare with f(t)/f(0).
    T, s = 1000, 0.008
    alpha_bars = torch.cumprod(1 - cosine_betas(T, s), 0)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    unclipped = t < T - 20  # the last few betas hit max_beta by design
    assert torch.allclose(alpha_bars[unclipped], f[unclipped], rtol=1e-9, atol=1e-12)
    assert cosine_betas(T).max() <= 0.999


def test_sigmoid_schedule_is_monotone_and_ends_near_zero() -> None:
    alpha_bars = torch.cumprod(1 - sigmoid_betas(1000), 0)
    assert (alpha_bars.diff() < 0).all() and alpha_bars[0] > 0.999 and alpha_bars[-1] < 1e-3


@given(st.lists(st.floats(1e-4, 0.5), min_size=1, max_size=50))
@settings(max_examples=50, deadline=None)
def test_betas_from_alpha_bars_inverts_cumprod(betas: list[float]) -> None:
    betas_tensor = torch.tensor(betas, dtype=torch.float64)
    recovered = betas_from_alpha_bars(torch.cumprod(1 - betas_tensor, 0))
    assert torch.allclose(recovered, betas_tensor, rtol=1e-9, atol=1e-12)


def test_tables_are_indexed_by_paper_t(schedule: NoiseSchedule) -> None:
    assert schedule.T == 1000 and len(schedule.alpha_bars) == 1001
    assert schedule.betas[0] == 0 and schedule.alpha_bars[0] == 1 and math.isinf(schedule.snr[0])
    # ᾱ_t computed by an explicit Python product, term by term
    product = 1.0
    for t in range(1, 11):
        product *= 1.0 - (1e-4 + (t - 1) * (0.02 - 1e-4) / 999)
        assert schedule.alpha_bars[t].item() == pytest.approx(product, rel=1e-12)
    assert torch.allclose(schedule.snr[1:], schedule.alpha_bars[1:] / (1 - schedule.alpha_bars[1:]))


# --- the closed form q(x_t | x_0) against a simulated chain ---------------------------


ClosedForm = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def chain_agrees_with_closed_form(schedule: NoiseSchedule, closed_form: ClosedForm,
                                  num_chains: int = 20_000, seed: int = 0) -> bool:
    """Simulate q_step t times from x_0 and test the marginal against samples of ``closed_form``.

    Uses a two-sample Kolmogorov–Smirnov test at several t: the simulated chain never touches the closed form.
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.full((num_chains,), 1.5, dtype=torch.float64)
    x, checkpoints, pvalues = x0.clone(), {5, 50, 200, 500}, []
    for t in range(1, max(checkpoints) + 1):
        x = schedule.q_step(x, t, torch.randn(num_chains, generator=generator, dtype=torch.float64))
        if t in checkpoints:
            direct = closed_form(x0, t, torch.randn(num_chains, generator=generator, dtype=torch.float64))
            pvalues.append(stats.ks_2samp(x.numpy(), direct.numpy()).pvalue)
    # Bonferroni over the checkpoints; a correct formula fails this about once in 10^4 runs (fixed seed: never).
    return min(pvalues) > 1e-4 / len(checkpoints)


def test_closed_form_matches_step_by_step_chain(schedule: NoiseSchedule) -> None:
    assert chain_agrees_with_closed_form(schedule, schedule.q_sample)


def test_check_catches_alpha_in_place_of_alpha_bar(schedule: NoiseSchedule) -> None:
    """The derivation check must fail when the closed form is wrong: ᾱ_t replaced by α_t."""

    def broken_closed_form(x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        alpha = schedule.alphas[t]
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    assert not chain_agrees_with_closed_form(schedule, broken_closed_form)


def test_check_catches_a_missing_square_root(schedule: NoiseSchedule) -> None:
    def broken_closed_form(x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        alpha_bar = schedule.alpha_bars[t]
        return alpha_bar * x0 + (1 - alpha_bar).sqrt() * noise

    assert not chain_agrees_with_closed_form(schedule, broken_closed_form)


def test_q_mean_variance_matches_q_sample_moments(schedule: NoiseSchedule) -> None:
    generator = torch.Generator().manual_seed(3)
    x0 = torch.full((200_000,), -0.7, dtype=torch.float64)
    samples = schedule.q_sample(x0, 400, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    mean, variance = schedule.q_mean_variance(x0[:1], 400)
    assert samples.mean().item() == pytest.approx(mean.item(), abs=5 * variance.sqrt().item() / 200_000**0.5)
    assert samples.var().item() == pytest.approx(variance.item(), rel=0.02)


def test_per_example_timesteps_broadcast_over_images(schedule: NoiseSchedule) -> None:
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 500, 1000])
    batched = schedule.q_sample(x0, t, noise)
    for i in range(3):
        assert torch.allclose(batched[i], schedule.q_sample(x0[i : i + 1], int(t[i]), noise[i : i + 1])[0])
    assert torch.equal(schedule.q_sample(x0, 0, noise), x0)


# --- conversions between ε, x_0, v and the score ---------------------------------------


def test_score_from_eps_is_the_gradient_of_the_conditional_log_density(schedule: NoiseSchedule) -> None:
    """∇_{x_t} log N(x_t; √ᾱ x_0, (1 − ᾱ) I) by autograd equals −ε/√(1 − ᾱ)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 300, 700, 1000])
    x_t = schedule.q_sample(x0, t, eps).requires_grad_(True)
    alpha_bar = schedule.alpha_bars[t][:, None]
    log_density = (-(x_t - alpha_bar.sqrt() * x0) ** 2 / (2 * (1 - alpha_bar))).sum()
    (autograd_score,) = torch.autograd.grad(log_density, x_t)
    assert torch.allclose(schedule.score_from_eps(x_t.detach(), t, eps), autograd_score, rtol=1e-10)
    assert torch.allclose(schedule.eps_from_score(x_t.detach(), t, autograd_score), eps, rtol=1e-10)


def test_prediction_conversions_recover_the_truth(schedule: NoiseSchedule) -> None:
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 600, 999])
    x_t = schedule.q_sample(x0, t, eps)
    assert torch.allclose(schedule.x0_from_eps(x_t, t, eps), x0, atol=1e-8)
    assert torch.allclose(schedule.eps_from_x0(x_t, t, x0), eps, atol=1e-8)
    v = schedule.v_from_eps(x_t, t, eps)
    alpha_bar = schedule.alpha_bars[t][:, None]
    assert torch.allclose(v, alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0, atol=1e-10)  # the definition
    assert torch.allclose(schedule.eps_from_v(x_t, t, v), eps, atol=1e-8)
    assert torch.allclose(schedule.x0_from_v(x_t, t, v), x0, atol=1e-8)


def test_posterior_coefficients_transcribe_the_paper_formula(schedule: NoiseSchedule) -> None:
    """A transcription test: it re-types Ho et al.'s eq. 7 and can only catch typos. The derivation itself is
    checked independently, by Bayes' rule on a grid, in tests/test_elbo.py."""
    t = 250
    a_bar, a_bar_prev, beta = schedule.alpha_bars[t], schedule.alpha_bars[t - 1], schedule.betas[t]
    assert schedule.posterior_variances[t] == pytest.approx((beta * (1 - a_bar_prev) / (1 - a_bar)).item())
    x0, x_t = torch.ones(1, dtype=torch.float64), 2 * torch.ones(1, dtype=torch.float64)
    expected = a_bar_prev.sqrt() * beta / (1 - a_bar) * 1 + (1 - beta).sqrt() * (1 - a_bar_prev) / (1 - a_bar) * 2
    assert schedule.posterior_mean(x0, x_t, t).item() == pytest.approx(expected.item())
    assert schedule.posterior_variances[1] == 0  # given x_0, x_0 is known exactly


# --- bad input gets a clear error -------------------------------------------------------


@pytest.mark.parametrize("bad", [[0.0, 0.1], [0.1, 1.0], [-0.1], [1.5], [float("nan")]])
def test_betas_outside_the_open_unit_interval_are_rejected(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(torch.tensor(bad))


def test_schedule_constructor_errors() -> None:
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="T"):
        linear_betas(0)
    with pytest.raises(ValueError, match="start"):
        linear_betas(10, start=0.5, end=0.1)
    with pytest.raises(ValueError, match="max_beta"):
        cosine_betas(10, max_beta=1.0)


def test_timestep_errors(schedule: NoiseSchedule) -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"timestep t must be in 0\.\.1000.*1001"):
        schedule.q_sample(x, 1001, x)
    with pytest.raises(ValueError, match=r"1\.\.1000.*got 0"):
        schedule.q_step(x, 0, x)
    with pytest.raises(ValueError, match="integer"):
        schedule.q_sample(x, torch.tensor([0.5, 1.0]), x)
    with pytest.raises(ValueError, match="one timestep per example"):
        schedule.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="int or an integer tensor"):
        schedule.q_sample(x, 3.0, x)


def test_shape_mismatch_errors_name_the_arguments(schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match=r"x0 \(2, 3\).*noise \(2, 4\)"):
        schedule.q_sample(torch.zeros(2, 3), 5, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x_t"):
        schedule.x0_from_eps(torch.zeros(2, 3), 5, torch.zeros(3, 3))


def test_the_jump_between_two_noise_levels_composes_the_single_steps(schedule: NoiseSchedule) -> None:
    """q(x_t | x_s) (lesson 01, eq. 3b) against the single steps (2) composed one by one: the mean is multiplied
    by √α_i and the variance follows v ← α_i v + β_i, for i = s+1..t. The closed form uses ᾱ_t/ᾱ_s instead."""
    x_s = torch.tensor([0.7, -1.3], dtype=torch.float64)
    for s, t in ((0, 1), (0, 500), (120, 121), (120, 700), (999, 1000)):
        factor, variance = 1.0, 0.0
        for i in range(s + 1, t + 1):
            alpha, beta = float(schedule.alphas[i]), float(schedule.betas[i])
            factor, variance = factor * alpha**0.5, alpha * variance + beta
        mean, var = schedule.q_mean_variance_between(x_s, s, t)
        assert torch.allclose(mean, factor * x_s, rtol=1e-10)
        assert torch.allclose(var, torch.full_like(x_s, variance), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="needs s < t"):
        schedule.q_mean_variance_between(x_s, 500, 500)
