"""Lesson 04: score matching losses and Langevin dynamics, against exact scores."""

import pytest
import torch
from torch import nn

from minidiff.oracles import mixture_eps_model, noised_mixture
from minidiff.schedules import NoiseSchedule
from minidiff.score import (
    annealed_langevin,
    denoising_score_matching_loss,
    explicit_score_matching_loss,
    gaussian_score,
    geometric_sigmas,
    langevin,
    sliced_score_matching_loss,
)
from minidiff.toys import GaussianMixture, eight_gaussians_mixture, two_gaussians_mixture


def random_score_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def test_eps_model_is_minus_sqrt_one_minus_alpha_bar_times_the_autograd_score() -> None:
    mixture, schedule = eight_gaussians_mixture(), NoiseSchedule.cosine(1000)
    t = torch.tensor([1, 1, 250, 250, 900, 900])
    x = torch.randn(6, 2, dtype=torch.float64).requires_grad_(True)
    log_density = sum(noised_mixture(mixture, schedule, int(t[i])).log_prob(x[i : i + 1]).sum() for i in range(6))
    (autograd_score,) = torch.autograd.grad(log_density, x)
    expected_eps = -(1 - schedule.alpha_bars[t])[:, None].sqrt() * autograd_score
    assert torch.allclose(mixture_eps_model(mixture, schedule)(x.detach(), t), expected_eps, rtol=1e-8)


def test_gaussian_score_by_autograd() -> None:
    x = torch.randn(4, 3, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad((-(x - 0.5) ** 2 / (2 * 0.3)).sum(), x)
    assert torch.allclose(gaussian_score(x.detach(), 0.5, 0.3), grad)


def paired_difference(loss_a: list[float], loss_b: list[float]) -> tuple[float, float]:
    differences = torch.tensor(loss_a) - torch.tensor(loss_b)
    return differences.mean().item(), differences.std().item() / len(differences) ** 0.5


def test_denoising_minus_explicit_score_matching_is_the_same_constant_for_two_models() -> None:
    """E‖s − ∇log p_σ‖² and E‖s + z/σ‖² differ by a constant C that does not depend on the model."""
    mixture, sigma = two_gaussians_mixture(separation=2.0, std=0.4), 0.3
    noised = mixture.convolved(sigma**2)
    constants = {}
    for seed in (1, 2):
        model = random_score_model(seed)
        gaps = []
        for batch in range(40):
            generator = torch.Generator().manual_seed(batch)
            x = mixture.sample(5000, generator).double()
            z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            x_noisy = x + sigma * z
            explicit = explicit_score_matching_loss(model, x_noisy, noised.score(x_noisy))
            denoising = 0.5 * ((model(x_noisy) + z / sigma) ** 2).sum(-1).mean()  # the same draws, written out
            gaps.append((denoising - explicit).item())
        constants[seed] = gaps
    mean_difference, standard_error = paired_difference(constants[1], constants[2])
    assert abs(mean_difference) < 4 * standard_error + 1e-3
    # and the library's loss is that same estimator (same draws when given the same generator state)
    generator = torch.Generator().manual_seed(0)
    x = mixture.sample(100, generator).double()
    model = random_score_model(3)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    by_hand = 0.5 * ((model(x + sigma * z) + z / sigma) ** 2).sum(-1).mean()
    assert torch.allclose(denoising_score_matching_loss(model, x, sigma, torch.Generator().manual_seed(7)), by_hand)


def test_sliced_minus_explicit_score_matching_is_model_independent() -> None:
    """SSM(θ) = ESM(θ) − ½E‖∇log p‖² after integration by parts: compare two models' differences."""
    mixture = two_gaussians_mixture(separation=2.0, std=0.6)
    gaps: dict[int, list[float]] = {1: [], 2: []}
    for batch in range(30):
        x = mixture.sample(4000, torch.Generator().manual_seed(batch)).double()
        for seed in (1, 2):
            model = random_score_model(seed)
            sliced = sliced_score_matching_loss(model, x, torch.Generator().manual_seed(100 + batch), 4)
            explicit = explicit_score_matching_loss(model, x, mixture.score(x))
            gaps[seed].append((sliced - explicit).item())
    mean_difference, standard_error = paired_difference(gaps[1], gaps[2])
    assert abs(mean_difference) < 4 * standard_error + 1e-3
    many = mixture.sample(200_000, torch.Generator().manual_seed(999)).double()
    expected_constant = -0.5 * (mixture.score(many) ** 2).sum(-1).mean().item()
    gap_mean = torch.tensor(gaps[1]).mean().item()
    gap_error = torch.tensor(gaps[1]).std().item() / 30**0.5
    assert abs(gap_mean - expected_constant) < 4 * gap_error + 0.01, (gap_mean, expected_constant, gap_error)


def test_langevin_with_the_exact_score_samples_a_gaussian() -> None:
    generator = torch.Generator().manual_seed(0)
    start = 5 * torch.ones(20_000, 2, dtype=torch.float64)
    samples = langevin(lambda x: gaussian_score(x, 1.0, 0.25), start, step_size=0.01, steps=800,
                       generator=generator)
    assert samples.mean().item() == pytest.approx(1.0, abs=0.02)
    # unadjusted Langevin is biased by O(step): its stationary variance is var / (1 − step/(2 var)) = 0.2513
    assert samples.var(0).mean().item() == pytest.approx(0.25 / (1 - 0.01 / 0.5), rel=0.03)


def mode_fraction(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    return (mixture.responsibilities(samples.double()).argmax(1) == 0).double().mean().item()


def test_plain_langevin_gets_mode_weights_wrong_and_annealed_langevin_gets_them_right() -> None:
    """Song & Ermon's argument: the score is blind to mode weights between well-separated modes."""
    mixture = two_gaussians_mixture(separation=8.0, std=0.5, weight_left=0.8)
    generator = torch.Generator().manual_seed(0)
    start = 8 * torch.rand(4000, 2, generator=generator, dtype=torch.float64) - 4
    plain = langevin(mixture.score, start, step_size=0.01, steps=1000, generator=generator)
    sigmas = geometric_sigmas(8.0, 0.05, 20)
    annealed = annealed_langevin(lambda x, sigma: mixture.convolved(sigma**2).score(x), start, sigmas,
                                 steps_per_level=100, step_scale=5e-4, generator=generator)
    assert abs(mode_fraction(plain, mixture) - 0.8) > 0.2  # stuck near the initial split, about one half
    assert mode_fraction(annealed, mixture) == pytest.approx(0.8, abs=0.04)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="decreasing"):
        annealed_langevin(lambda x, s: x, torch.zeros(1, 2), [0.1, 1.0], 1, 0.1)
    with pytest.raises(ValueError, match="sigma"):
        denoising_score_matching_loss(lambda x: x, torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        explicit_score_matching_loss(lambda x: x, torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="step_size"):
        langevin(lambda x: x, torch.zeros(1, 2), -0.1, 10)
