import math

import numpy as np
import pytest
import torch
from scipy import stats

from minidiff.metrics import compare_to_data, energy_distance, frechet_distance, sliced_wasserstein


def expected_abs(mean: float, std: float) -> float:
    """E|N(mean, std²)| (folded normal)."""
    folded = std * math.sqrt(2 / math.pi) * math.exp(-(mean**2) / (2 * std**2))
    return folded + mean * (1 - 2 * stats.norm.cdf(-mean / std))


def test_energy_distance_of_shifted_gaussians_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    shift = 0.7
    a = torch.randn(4000, 1, generator=generator, dtype=torch.float64)
    b = torch.randn(4000, 1, generator=generator, dtype=torch.float64) + shift
    exact = 2 * expected_abs(shift, math.sqrt(2)) - 2 * expected_abs(0.0, math.sqrt(2))
    assert energy_distance(a, b) == pytest.approx(exact, abs=0.02)
    assert energy_distance(a, a) == 0.0


def test_energy_distance_v_statistic_bias_is_the_self_distance_over_n() -> None:
    """E[V] = 2E|X − Y| − (1 − 1/n)(E|X − X′| + E|Y − Y′|): the diagonal zeros add (E|X − X′| + E|Y − Y′|)/n.
    For two samples of N(0, 1) with n = 10 that is 2 · (2/√π)/10 = 0.2257, seen over 4,000 replicates to about
    ±0.002 (a bias of 1/(n − 1) instead of 1/n would be 0.2508)."""
    generator = torch.Generator().manual_seed(1)
    n, replicates = 10, 4000
    a = torch.randn(replicates, n, 1, generator=generator, dtype=torch.float64)
    b = torch.randn(replicates, n, 1, generator=generator, dtype=torch.float64)
    values = torch.tensor([energy_distance(a[i], b[i]) for i in range(replicates)])
    expected = 2 * expected_abs(0.0, math.sqrt(2)) / n
    assert values.mean().item() == pytest.approx(expected, abs=4 * values.std().item() / replicates**0.5)
    assert abs(values.mean().item() - 2 * expected_abs(0.0, math.sqrt(2)) / (n - 1)) > 0.015


def test_sliced_wasserstein_in_one_dimension_is_the_shift() -> None:
    a = torch.linspace(-1, 1, 1001)[:, None]
    assert sliced_wasserstein(a, a + 0.3, num_projections=8) == pytest.approx(0.3, rel=1e-5)


def test_compare_to_data_baseline_and_errors() -> None:
    generator = torch.Generator().manual_seed(0)
    same = compare_to_data(torch.randn(500, 2, generator=generator), lambda n, g: torch.randn(n, 2, generator=g),
                           generator)
    shifted = compare_to_data(torch.randn(500, 2, generator=generator) + 1,
                              lambda n, g: torch.randn(n, 2, generator=g), generator)
    assert same.ratio < 2 < 20 < shifted.ratio
    assert "ratio" in str(same)
    with pytest.raises(ValueError, match="metric"):
        compare_to_data(torch.zeros(5, 2), lambda n, g: torch.zeros(n, 2), generator, metric="fid")
    with pytest.raises(ValueError, match="same D"):
        energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="equal sizes"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(6, 2))


def test_the_frechet_baseline_grows_like_d_squared_over_n() -> None:
    """Two N-samples of the same N(0, I_d): E[d²] ≈ 2d/N (means) + d(d+1)/(2N) (covariances), an O(d²/N) bias.

    The expansion is independent of the library (second-order perturbation of the matrix square root); the
    statement it replaces, "about tr Σ / N", is off by a factor of about (d + 5)/2.
    """
    generator = torch.Generator().manual_seed(0)
    for d, n in ((8, 400), (24, 400)):
        values = [frechet_distance(torch.randn(n, d, generator=generator, dtype=torch.float64),
                                   torch.randn(n, d, generator=generator, dtype=torch.float64)) for _ in range(30)]
        expected = 2 * d / n + d * (d + 1) / (2 * n)
        assert abs(np.mean(values) / expected - 1) < 0.15, (d, n, np.mean(values), expected)
        assert np.mean(values) > 3 * d / n  # far above "tr Σ / N" = d / N
