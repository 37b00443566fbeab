"""Lesson 01: the toy data and the exact noised Gaussian mixture."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from minidiff.oracles import noised_mixture
from minidiff.schedules import NoiseSchedule
from minidiff.toys import TOYS, GaussianMixture, eight_gaussians_mixture, sample_toy, two_gaussians_mixture


def skewed_mixture() -> GaussianMixture:
    """Three unequal components with full covariances: harder than the round ring."""
    means = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=torch.float64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.05]]],
                        dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def test_log_prob_matches_scipy() -> None:
    mixture = skewed_mixture()
    x = torch.randn(50, 2, dtype=torch.float64)
    expected = np.log(sum(w.item() * stats.multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy())
                          for w, m, c in zip(mixture.weights, mixture.means, mixture.covariances, strict=True)))
    assert np.allclose(mixture.log_prob(x).numpy(), expected, rtol=1e-10)


def test_density_integrates_to_one_on_a_grid() -> None:
    axis = torch.linspace(-6, 6, 601, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    density = skewed_mixture().log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp()
    assert (density.sum() * (axis[1] - axis[0]) ** 2).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("alpha_bar", [1.0, 0.6, 0.05])
def test_exact_score_equals_autograd_of_exact_log_density(alpha_bar: float) -> None:
    mixture = skewed_mixture().diffused(alpha_bar)
    x = (2 * torch.randn(40, 2, dtype=torch.float64)).requires_grad_(True)
    (autograd_score,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    assert torch.allclose(mixture.score(x.detach()), autograd_score, rtol=1e-8, atol=1e-10)


def projected_ks_pvalue(points: torch.Tensor, mixture: GaussianMixture, angle: float) -> float:
    """KS test of points against the exact CDF of the mixture projected on a direction (a 1D mixture)."""
    direction = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    means = mixture.means @ direction
    stds = torch.einsum("i,kij,j->k", direction, mixture.covariances, direction).sqrt()

    def cdf(values: np.ndarray) -> np.ndarray:
        return sum(w.item() * stats.norm.cdf(values, m.item(), s.item())
                   for w, m, s in zip(mixture.weights, means, stds, strict=True))

    return stats.kstest((points.double() @ direction).numpy(), cdf).pvalue


def test_sampling_matches_the_mixture_along_projections() -> None:
    mixture = skewed_mixture()
    samples = mixture.sample(20_000, torch.Generator().manual_seed(0))
    assert min(projected_ks_pvalue(samples, mixture, angle) for angle in (0.0, 1.0, 2.2)) > 1e-3


def noised(mixture: GaussianMixture, schedule: NoiseSchedule, t: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    data = mixture.sample(20_000, generator).double()
    return schedule.q_sample(data, t, torch.randn(data.shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("t", [30, 150, 600])
def test_noised_data_follows_the_exact_marginal(t: int) -> None:
    """Push data through q_sample and KS-test it against the exact q_t along projections."""
    schedule, mixture = NoiseSchedule.linear(1000), skewed_mixture()
    points = noised(mixture, schedule, t, seed=t)
    assert min(projected_ks_pvalue(points, noised_mixture(mixture, schedule, t), angle) for angle in (0.0, 1.6)) > 1e-3


def test_marginal_check_rejects_alpha_in_place_of_alpha_bar() -> None:
    schedule, mixture, t = NoiseSchedule.linear(1000), skewed_mixture(), 150
    points = noised(mixture, schedule, t, seed=1)
    wrong = mixture.diffused(schedule.alphas[t].item())
    assert min(projected_ks_pvalue(points, wrong, angle) for angle in (0.0, 1.6)) < 1e-6


def test_fully_noised_mixture_is_standard_normal() -> None:
    far = eight_gaussians_mixture().diffused(0.0)
    assert torch.allclose(far.means, torch.zeros(8, 2, dtype=torch.float64))
    assert torch.allclose(far.covariances, torch.eye(2, dtype=torch.float64).expand(8, 2, 2))


def test_responsibilities_sum_to_one_and_pick_the_near_component() -> None:
    mixture = two_gaussians_mixture(separation=6.0, std=0.3)
    resp = mixture.responsibilities(torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(resp.sum(1), torch.ones(2, dtype=torch.float64))
    assert resp[0, 0] > 0.999 and resp[1, 1] > 0.999


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys_have_the_right_shape_and_scale(name: str) -> None:
    first = sample_toy(name, 5000, torch.Generator().manual_seed(0))
    again = sample_toy(name, 5000, torch.Generator().manual_seed(0))
    assert first.shape == (5000, 2) and first.dtype == torch.float32 and torch.equal(first, again)
    assert 0.3 < first.std(0).min() and first.abs().max() < 4.0


def test_checkerboard_only_fills_dark_squares() -> None:
    points = sample_toy("checkerboard", 5000, torch.Generator().manual_seed(0))
    cells = torch.floor((points + 2.0) / 1.0).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown toy"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="n"):
        sample_toy("two_moons", 0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match=r"covariances must have shape"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.eye(2)[None])
    with pytest.raises(ValueError, match="alpha_bar"):
        eight_gaussians_mixture().diffused(1.5)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 2\]"):
        eight_gaussians_mixture().log_prob(torch.zeros(3, 3))
