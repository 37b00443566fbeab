"""Two-dimensional toy data, and a Gaussian mixture whose noised marginals are known exactly (lesson 01).

Why a mixture: if q(x_0) = Σ_k π_k N(μ_k, Σ_k), then the forward marginal
q_t(x_t) = ∫ q(x_t | x_0) q(x_0) dx_0 is again a mixture,
Σ_k π_k N(√ᾱ_t μ_k, ᾱ_t Σ_k + (1 − ᾱ_t) I) (lesson 01, "the marginal is a Gaussian convolution").
So its density and its score ∇ log q_t are exact at every t: an oracle that later lessons use
to tell the error of a learned model apart from the error of a sampler.

Every sampler here takes ``n`` and an optional ``torch.Generator`` and returns float32 points
of shape [n, 2], scaled to roughly unit spread.
"""

from __future__ import annotations

import math

import torch


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of points) must be an int >= 1, got {n!r}")


class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k) in D dimensions, with exact sampling, log-density and score.

    Args:
        weights: [K] non-negative mixture weights π_k (normalised here).
        means: [K, D] component means μ_k.
        covariances: [K, D, D] symmetric positive-definite Σ_k.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K, D = means.shape
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape [K]=[{K}] to match means, got {tuple(weights.shape)}")
        if covariances.shape != (K, D, D):
            raise ValueError(f"covariances must have shape [K, D, D]=[{K}, {D}, {D}], got {tuple(covariances.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        if not torch.allclose(covariances, covariances.transpose(1, 2)):
            raise ValueError("covariances must be symmetric")
        cholesky, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            raise ValueError("covariances must be positive definite")
        self.weights = weights / weights.sum()
        self.means = means
        self.covariances = covariances
        self.cholesky = cholesky
        # L_k^{-1}, once: applying it is one batched product per call, where a triangular solve for every
        # (point, component) pair was most of an oracle sampler's time (lesson 03's schedule table)
        identity = torch.eye(D, dtype=torch.float64).expand(K, D, D)
        self.cholesky_inverse = torch.linalg.solve_triangular(cholesky, identity, upper=False)
        self.dim = D

    @property
    def num_components(self) -> int:
        """K, the number of components."""
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw n points: pick a component k ~ π, then x = μ_k + L_k z with L_k L_kᵀ = Σ_k."""
        _check_count(n)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        points = self.means[labels] + torch.einsum("nij,nj->ni", self.cholesky[labels], z)
        points = points.float()
        return (points, labels) if return_labels else points

    def _component_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log N(x; μ_k, Σ_k) for each k ([N, K]) and the whitened residuals Σ_k^{-1}(x − μ_k) ([N, K, D])."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {tuple(x.shape)}")
        x64 = x.to(torch.float64)
        diff = x64[:, None, :] - self.means.to(x.device)[None]  # [N, K, D]
        chol, inverse = self.cholesky.to(x.device), self.cholesky_inverse.to(x.device)
        # y = L^{-1} (x − μ) for each component, so |y|² is the Mahalanobis distance
        y = torch.einsum("kij,nkj->nki", inverse, diff)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # [K]
        log_probs = -0.5 * (y**2).sum(-1) - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi)
        # Σ^{-1}(x − μ) = L^{-T} y
        whitened = torch.einsum("kji,nkj->nki", inverse, y)
        return log_probs, whitened

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) = logsumexp_k (log π_k + log N(x; μ_k, Σ_k)), shape [N], in x's dtype."""
        log_probs, _ = self._component_log_probs(x)
        return torch.logsumexp(log_probs + self.weights.to(x.device).log(), dim=1).to(x.dtype)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(k | x) = π_k N(x; μ_k, Σ_k) / q(x), shape [N, K]: the exact posterior over components."""
        log_probs, _ = self._component_log_probs(x)
        return torch.softmax(log_probs + self.weights.to(x.device).log(), dim=1).to(x.dtype)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇_x log q(x) = −Σ_k p(k | x) Σ_k^{-1} (x − μ_k), shape [N, D] (derived in lesson 04)."""
        log_probs, whitened = self._component_log_probs(x)
        resp = torch.softmax(log_probs + self.weights.to(x.device).log(), dim=1)
        return -(resp[..., None] * whitened).sum(1).to(x.dtype)

    def diffused(self, alpha_bar: float | torch.Tensor) -> GaussianMixture:
        """The forward marginal q_t for ᾱ_t = ``alpha_bar``: Σ_k π_k N(√ᾱ μ_k, ᾱ Σ_k + (1 − ᾱ) I) (lesson 01, eq. 6)."""
        alpha_bar = float(alpha_bar)
        if not 0.0 <= alpha_bar <= 1.0:
            raise ValueError(f"alpha_bar must be in [0, 1], got {alpha_bar}")
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, math.sqrt(alpha_bar) * self.means,
                               alpha_bar * self.covariances + (1.0 - alpha_bar) * eye)

    def convolved(self, noise_var: float | torch.Tensor) -> GaussianMixture:
        """The data plus independent N(0, noise_var · I) noise: Σ_k π_k N(μ_k, Σ_k + noise_var I) (lesson 04)."""
        noise_var = float(noise_var)
        if noise_var < 0:
            raise ValueError(f"noise_var must be >= 0, got {noise_var}")
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, self.means, self.covariances + noise_var * eye)


def _ring(num_modes: int, radius: float, std: float) -> GaussianMixture:
    angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(num_modes, 2, 2).clone()
    return GaussianMixture(torch.ones(num_modes), means, covs)


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """Eight equal, round Gaussians on a circle: the classic 2D toy, here with its exact density."""
    return _ring(8, radius, std)


def two_gaussians_mixture(separation: float = 3.0, std: float = 0.5, weight_left: float = 0.5) -> GaussianMixture:
    """Two round Gaussians at (±separation/2, 0), with an unequal weight if asked (useful for guidance)."""
    means = torch.tensor([[-separation / 2, 0.0], [separation / 2, 0.0]], dtype=torch.float64)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    return GaussianMixture(torch.tensor([weight_left, 1 - weight_left]), means, covs)


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points from :func:`eight_gaussians_mixture`."""
    return eight_gaussians_mixture().sample(n, generator)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """A 2D swiss roll: angle θ ∈ [1.5π, 4.5π], radius ∝ θ, plus isotropic noise; scaled to about [-2, 2]²."""
    _check_count(n)
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    points = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / (4.5 * math.pi) * 2
    return (points + noise * torch.randn(n, 2, generator=generator)).float()


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles (as in scikit-learn's make_moons), centred and scaled."""
    _check_count(n)
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return (points + noise * torch.randn(n, 2, generator=generator)).float()


def checkerboard(n: int, generator: torch.Generator | None = None, squares: int = 4) -> torch.Tensor:
    """Uniform points on the dark squares of a ``squares`` × ``squares`` board covering [-2, 2]²."""
    _check_count(n)
    if squares < 2 or squares % 2:
        raise ValueError(f"squares must be an even int >= 2, got {squares}")
    # Pick a column, then a row of the right parity in that column, then a uniform point in the cell.
    column = torch.randint(0, squares, (n,), generator=generator)
    row = 2 * torch.randint(0, squares // 2, (n,), generator=generator) + (column % 2)
    cell = torch.rand(n, 2, generator=generator)
    size = 4.0 / squares
    return (torch.stack([column, row], dim=1) * size + cell * size - 2.0).float()


TOYS = {
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points from the toy called ``name`` (one of :data:`TOYS`)."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {sorted(TOYS)}")
    return TOYS[name](n, generator)
