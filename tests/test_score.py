"""Lesson 04: score matching losses and Langevin dynamics, against exact scores."""

import pytest
import torch
from torch import nn

from minidiff.oracles import mixture_eps_model
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


def test_tweedie_the_eps_oracle_is_the_posterior_mean_of_the_noise() -> None:
    """ε*(x_t) = E[ε | x_t], computed without any score: given the component k, (x_0, x_t) is jointly Gaussian, so
    E[x_0 | x_t, k] = μ_k + √ᾱ Σ_k (ᾱ Σ_k + (1 − ᾱ) I)⁻¹ (x_t − √ᾱ μ_k); average over p(k | x_t) and solve
    x_t = √ᾱ x_0 + √(1 − ᾱ) ε for ε. The library's oracle goes through the score instead (lesson 04, eq. 6)."""
    mixture, schedule = eight_gaussians_mixture(), NoiseSchedule.cosine(1000)
    generator = torch.Generator().manual_seed(0)
    for t in (1, 250, 900):
        x_t = 2 * torch.randn(50, 2, generator=generator, dtype=torch.float64)
        a = float(schedule.alpha_bars[t])
        eye = torch.eye(2, dtype=torch.float64)
        log_weights, means = [], []
        for weight, mu, cov in zip(mixture.weights, mixture.means, mixture.covariances, strict=True):
            marginal = torch.distributions.MultivariateNormal(a**0.5 * mu, a * cov + (1 - a) * eye)
            log_weights.append(weight.log() + marginal.log_prob(x_t))
            gain = a**0.5 * cov @ torch.linalg.inv(a * cov + (1 - a) * eye)
            means.append(mu + (x_t - a**0.5 * mu) @ gain.T)
        posterior = torch.stack(log_weights, 1).softmax(1)  # p(k | x_t)
        x0_mean = (posterior[..., None] * torch.stack(means, 1)).sum(1)
        expected = (x_t - a**0.5 * x0_mean) / (1 - a) ** 0.5
        got = mixture_eps_model(mixture, schedule)(x_t, torch.full((50,), t))
        assert torch.allclose(got, expected, atol=1e-9), t


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


def test_langevin_with_the_exact_score_samples_a_gaussian_with_its_step_size_bias() -> None:
    """Unadjusted Langevin on N(m, v) is x ← (1 − η/v) x + (η/v) m + √(2η) z: its stationary variance solves
    s = (1 − η/v)² s + 2η, i.e. s = v / (1 − η/(2v)). With v = 0.25 and η = 0.1 that is 0.3125, 25% above v."""
    generator = torch.Generator().manual_seed(0)
    start = 5 * torch.ones(20_000, 2, dtype=torch.float64)
    samples = langevin(lambda x: gaussian_score(x, 1.0, 0.25), start, step_size=0.1, steps=200, generator=generator)
    assert samples.mean().item() == pytest.approx(1.0, abs=0.01)
    variance = samples.var(0).mean().item()  # 40,000 draws: relative standard error about 0.7%
    assert variance == pytest.approx(0.25 / (1 - 0.1 / 0.5), rel=0.025)
    assert abs(variance - 0.25) > 0.04  # the biased value, not the target's


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
