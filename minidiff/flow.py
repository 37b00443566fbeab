"""Flow matching and rectified flow (lesson 14): learn the velocity that carries noise to data.

A Gaussian probability path joins data (τ = 0) and noise (τ = 1): x_τ = α(τ) x_0 + σ(τ) ε. Its *conditional*
velocity, given the pair (x_0, ε), is u = α'(τ) x_0 + σ'(τ) ε; a network v_θ(x_τ, τ) regressed onto u learns the
*marginal* velocity E[u | x_τ], whose ODE dx/dτ = v carries N(0, I) at τ = 1 to the data at τ = 0
(Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023).

* :class:`GaussianPath` — α(τ), σ(τ) and their derivatives: :func:`linear_path` (rectified flow, α = 1 − τ,
  σ = τ) and :func:`cosine_path` (a variance-preserving path, α = cos(πτ/2), σ = sin(πτ/2)).
* :func:`flow_matching_loss` with :func:`uniform_times` or SD3's :func:`logit_normal_times`.
* :func:`euler_sample`, :func:`heun_sample` — the ODE from τ = 1 to 0 (lesson 08's solvers, in τ).
* :func:`x0_and_eps_from_velocity`, :func:`score_from_velocity` — what a velocity says about x_0, ε and the score.
* :func:`mixture_velocity` — the exact marginal velocity of Gaussian-mixture data (lesson 04's exact score, moved).
* :func:`reflow_pairs`, :func:`straightness` — rectified flow's second round, and how straight the paths are.

Models are :data:`~minidiff.contracts.VelocityModel`: ``velocity(x_τ, τ)`` with τ a [B] tensor of reals in [0, 1].
A U-Net that embeds integer timesteps is given ``1000 τ`` by :class:`TimeScaled`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from minidiff.contracts import VelocityModel
from minidiff.runtime import check_number
from minidiff.samplers import _finite, _start
from minidiff.toys import GaussianMixture

Schedule = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GaussianPath:
    """x_τ = α(τ) x_0 + σ(τ) ε with α(0) = 1, σ(0) = 0 (data) and α(1) = 0, σ(1) = 1 (noise) (lesson 14, eq. 1)."""

    name: str
    alpha: Schedule
    sigma: Schedule
    d_alpha: Schedule
    d_sigma: Schedule

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x_τ for each example (τ has one entry per example)."""
        a, s = (f(tau).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for f in (self.alpha, self.sigma))
        return a * x0 + s * noise

    def conditional_velocity(self, x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u = α'(τ) x_0 + σ'(τ) ε, the velocity of one pair's path (lesson 14, eq. 2); ε − x_0 on the linear path."""
        da, ds = (f(tau).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for f in (self.d_alpha, self.d_sigma))
        return da * x0 + ds * noise


def linear_path() -> GaussianPath:
    """Rectified flow's straight path: α = 1 − τ, σ = τ, so u = ε − x_0 (Liu et al. 2023; SD3)."""
    return GaussianPath("linear", lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t),
                        lambda t: torch.ones_like(t))


def cosine_path() -> GaussianPath:
    """A variance-preserving path (α² + σ² = 1): α = cos(πτ/2), σ = sin(πτ/2), the cosine schedule without clipping."""
    half_pi = math.pi / 2
    return GaussianPath("cosine", lambda t: torch.cos(half_pi * t), lambda t: torch.sin(half_pi * t),
                        lambda t: -half_pi * torch.sin(half_pi * t), lambda t: half_pi * torch.cos(half_pi * t))


def uniform_times(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """τ ~ U(0, 1), one per example (drawn with the device's default generator, so a CUDA graph can record it)."""
    return torch.rand(n, device=device)


def logit_normal_times(n: int, device: torch.device | str = "cpu", mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """τ = sigmoid(m + s z), z ~ N(0, 1): SD3's density (Esser et al. 2024, §3.1), denser in the middle of the
    path, where the velocity is hardest to predict, and thin at both ends, where it is nearly x or −x_0."""
    check_number("std", std, 0.0, above=True)
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


def flow_matching_loss(model: VelocityModel, x0: torch.Tensor, path: GaussianPath | None = None,
                       times: Callable[..., torch.Tensor] = uniform_times,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """The conditional flow-matching loss E ‖v_θ(x_τ, τ) − (α' x_0 + σ' ε)‖² (lesson 14, eq. 4), mean per dimension.

    ``noise`` pairs each x_0 with a given ε (reflow trains on pairs made by a previous model); by default fresh.
    """
    path = path or linear_path()
    tau = times(x0.shape[0], x0.device)
    noise = torch.randn_like(x0) if noise is None else noise
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    prediction = model(path.sample(x0, noise, tau), tau)
    return ((prediction.float() - path.conditional_velocity(x0, noise, tau).float()) ** 2).mean()


class TimeScaled(nn.Module):
    """A velocity model from a network that embeds timesteps of a 1000-step schedule: v(x, τ) = net(x, 1000 τ)."""

    def __init__(self, net: nn.Module, scale: float = 1000.0) -> None:
        super().__init__()
        self.net, self.scale = net, float(scale)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """v_θ(x_τ, τ), τ a [B] tensor in [0, 1]."""
        return self.net(x, tau * self.scale)


def _time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """τ_0 = 1 > τ_1 > … > τ_steps = 0, uniform in τ then bent by SD3's shift τ ↦ shift τ/(1 + (shift − 1) τ)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_number("shift", shift, 0.0, above=True)
    return [shift * t / (1 + (shift - 1) * t) for t in (1 - i / steps for i in range(steps + 1))]


def _at(x: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.full((x.shape[0],), tau, device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)


@torch.no_grad()
def euler_sample(velocity: VelocityModel, x1: torch.Tensor, steps: int = 50, shift: float = 1.0) -> torch.Tensor:
    """Euler's method for dx/dτ = v from τ = 1 (noise ``x1``) to τ = 0: x ← x + (τ_next − τ) v(x, τ)."""
    grid, x = _time_grid(steps, shift), _start(x1)
    for tau, tau_next in itertools.pairwise(grid):
        x = x + (tau_next - tau) * velocity(x, _at(x, tau)).to(x.dtype)
    return _finite(x, "Euler")


@torch.no_grad()
def heun_sample(velocity: VelocityModel, x1: torch.Tensor, steps: int = 25, shift: float = 1.0) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1) in τ: an Euler guess, then the average of the two slopes.

    Two velocity calls per step except the last, to τ = 0, which is Euler (so 2·steps − 1 calls in all).
    """
    grid, x = _time_grid(steps, shift), _start(x1)
    for tau, tau_next in itertools.pairwise(grid):
        slope = velocity(x, _at(x, tau)).to(x.dtype)
        guess = x + (tau_next - tau) * slope
        if tau_next > 0:
            slope = 0.5 * (slope + velocity(guess, _at(x, tau_next)).to(x.dtype))
            guess = x + (tau_next - tau) * slope
        x = guess
    return _finite(x, "Heun")


def x0_and_eps_from_velocity(x: torch.Tensor, velocity: torch.Tensor, tau: torch.Tensor,
                             path: GaussianPath | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve x = α x̂_0 + σ ε̂ and v = α' x̂_0 + σ' ε̂ for (x̂_0, ε̂) (lesson 14, eq. 6):

    x̂_0 = (σ' x − σ v)/(α σ' − σ α'),  ε̂ = (α v − α' x)/(α σ' − σ α').  On the linear path the denominator is 1.
    """
    path = path or linear_path()
    a, s, da, ds = (f(tau).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
                    for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    determinant = a * ds - s * da
    return (ds * x - s * velocity) / determinant, (a * velocity - da * x) / determinant


def score_from_velocity(x: torch.Tensor, velocity: torch.Tensor, tau: torch.Tensor,
                        path: GaussianPath | None = None) -> torch.Tensor:
    """∇ log p_τ(x) = −ε̂/σ(τ) (lesson 04's Tweedie relation), with ε̂ from :func:`x0_and_eps_from_velocity`."""
    path = path or linear_path()
    _, eps = x0_and_eps_from_velocity(x, velocity, tau, path)
    return -eps / path.sigma(tau).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def mixture_velocity(mixture: GaussianMixture, path: GaussianPath | None = None) -> VelocityModel:
    """The exact marginal velocity E[α' x_0 + σ' ε | x_τ] of mixture data (lesson 14, eq. 5), for τ in (0, 1].

    E[x_0 | x_τ] = Σ_k p(k | x_τ) (μ_k + α Σ_k (α² Σ_k + σ² I)⁻¹ (x_τ − α μ_k)) (each component's Gaussian posterior)
    and E[ε | x_τ] = (x_τ − α E[x_0 | x_τ])/σ. Examples that share a τ are computed together.
    """
    path = path or linear_path()
    means, covariances = mixture.means, mixture.covariances

    def at(tau: float, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(tau, dtype=torch.float64)
        a, s, da, ds = (float(f(t)) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
        if s <= 0:
            raise ValueError("the exact velocity is defined for tau in (0, 1]: at tau = 0 the data has no density")
        rows = x.double()
        noised = GaussianMixture(mixture.weights, a * means, a * a * covariances + s * s * torch.eye(mixture.dim,
                                                                                                    dtype=torch.float64))
        responsibilities = noised.responsibilities(rows).double()  # [B, K]
        offsets = rows[:, None, :] - a * means[None]  # [B, K, D]
        gains = a * covariances @ torch.linalg.inv(noised.covariances)  # [K, D, D]
        posterior_means = means[None] + torch.einsum("kij,bkj->bki", gains, offsets)
        x0 = (responsibilities[..., None] * posterior_means).sum(1)
        eps = (rows - a * x0) / s
        return (da * x0 + ds * eps).to(x.dtype)

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for value in torch.unique(tau):
            chosen = tau == value
            out[chosen] = at(float(value), x[chosen])
        return out
    return velocity


@torch.no_grad()
def reflow_pairs(velocity: VelocityModel, noise: torch.Tensor, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow's second round (Liu et al. 2023, "reflow"): couple each noise with the sample the current
    ODE makes from it. Training a new model on these (x_0, ε) pairs, instead of independent ones, straightens the
    paths: their straight interpolations no longer cross. Returns (samples, noise)."""
    return euler_sample(velocity, noise, steps), noise


@torch.no_grad()
def straightness(velocity: VelocityModel, x1: torch.Tensor, steps: int = 100) -> float:
    """Liu et al.'s S = E ∫₀¹ ‖(x_1 − x_0) − v(x_τ, τ)‖² dτ along the model's own Euler trajectories, divided by
    E ‖x_1 − x_0‖² (0: every path is a straight line travelled at constant speed, where one Euler step is exact)."""
    grid, x, slopes = _time_grid(steps), _start(x1), []
    for tau, tau_next in itertools.pairwise(grid):
        slope = velocity(x, _at(x, tau)).to(x.dtype)
        slopes.append(slope)
        x = x + (tau_next - tau) * slope
    chord = x1 - x  # the straight line's velocity d x/dτ = x_1 − x_0
    deviation = torch.stack([((chord - slope) ** 2).flatten(1).sum(1) for slope in slopes]).mean(0)
    return (deviation.mean() / (chord**2).flatten(1).sum(1).mean()).item()
