"""Diffusion as a stochastic differential equation, and its probability-flow ODE (lesson 05).

Continuous time is written s ∈ [0, 1] (s = t/T for a discrete schedule). A forward SDE
dx = f(x, s) ds + g(s) dW has the reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6)

    dx = [f(x, s) − g(s)² ∇ log p_s(x)] ds + g(s) dW̄      (run from s = 1 down to 0)

and the probability-flow ODE with the same marginals p_s (Song et al. 2021, eq. 13)

    dx/ds = f(x, s) − ½ g(s)² ∇ log p_s(x).

A score here is a :data:`~minidiff.contracts.TimeScore` ``score_fn(x, s)`` with a float s shared by the
batch; :func:`minidiff.contracts.score_from_eps` turns a trained ε-model into one, and
:func:`minidiff.oracles.mixture_time_score` gives the exact one of a Gaussian mixture.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

from minidiff.contracts import TimeScore
from minidiff.runtime import randn_like
from minidiff.schedules import NoiseSchedule
from minidiff.toys import GaussianMixture

Drift = Callable[[torch.Tensor, float], torch.Tensor]


def _check_time(s: float) -> float:
    s = float(s)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"continuous time s must be in [0, 1], got {s}")
    return s


class VPSDE:
    """The variance-preserving SDE dx = −½ β(s) x ds + √β(s) dW, so x_s | x_0 ~ N(√ᾱ(s) x_0, (1 − ᾱ(s)) I).

    Two choices of β(s):

    * ``VPSDE(schedule)`` matches a discrete schedule: β(s) = −T log α_k on ((k − 1)/T, k/T], so that
      ᾱ(s) = exp(−∫_0^s β) equals the schedule's ᾱ_k exactly at s = k/T (log ᾱ is linear in between).
      β(s) jumps at every k/T, which is harmless for sampling but caps ODE solvers' order of accuracy.
    * ``VPSDE(beta_min=0.1, beta_max=20.0)`` is the smooth linear β(s) = β_min + s (β_max − β_min) of
      Song et al. (2021), the continuous limit of DDPM's linear schedule with T = 1000:
      log ᾱ(s) = −β_min s − ½ (β_max − β_min) s².

    ``T`` is the number of discrete steps a network was trained with (s = t/T).
    """

    def __init__(self, schedule: NoiseSchedule | None = None, beta_min: float = 0.1, beta_max: float = 20.0,
                 T: int = 1000) -> None:
        self.schedule = schedule
        if schedule is not None:
            self.T = schedule.T
            self._log_alpha_bars = torch.log(schedule.alpha_bars).numpy()  # at s = 0, 1/T, …, 1
        else:
            if not 0 < beta_min < beta_max:
                raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
            self.T, self.beta_min, self.beta_max = T, beta_min, beta_max

    def log_alpha_bar(self, s: float) -> float:
        """log ᾱ(s) = −∫_0^s β(u) du."""
        s = _check_time(s)
        if self.schedule is None:
            return -self.beta_min * s - 0.5 * (self.beta_max - self.beta_min) * s**2
        return float(np.interp(s * self.T, np.arange(self.T + 1), self._log_alpha_bars))

    def alpha_bar(self, s: float) -> float:
        """ᾱ(s) = exp(−∫_0^s β(u) du)."""
        return math.exp(self.log_alpha_bar(s))

    def beta(self, s: float) -> float:
        """β(s): linear, or −T log α_k for the discrete step k that contains s."""
        s = _check_time(s)
        if self.schedule is None:
            return self.beta_min + s * (self.beta_max - self.beta_min)
        step = min(max(math.ceil(s * self.T), 1), self.T)
        return -self.T * math.log(self.schedule.alphas[step].item())

    def drift(self, x: torch.Tensor, s: float) -> torch.Tensor:
        """f(x, s) = −½ β(s) x."""
        return -0.5 * self.beta(s) * x

    def diffusion_coefficient(self, s: float) -> float:
        """g(s) = √β(s)."""
        return math.sqrt(self.beta(s))

    def marginal_std(self, s: float) -> float:
        """Standard deviation √(1 − ᾱ(s)) of x_s given x_0."""
        return math.sqrt(max(1.0 - self.alpha_bar(s), 0.0))

    def marginal_sample(self, x0: torch.Tensor, s: float, noise: torch.Tensor) -> torch.Tensor:
        """x_s = √ᾱ(s) x_0 + √(1 − ᾱ(s)) ε."""
        return math.sqrt(self.alpha_bar(s)) * x0 + self.marginal_std(s) * noise

    def mixture_marginal(self, mixture: GaussianMixture, s: float) -> GaussianMixture:
        """p_s exactly, when the data are ``mixture``."""
        return mixture.diffused(self.alpha_bar(s))

    def prior_std(self) -> float:
        """x_1 is drawn from N(0, prior_std² I)."""
        return 1.0


class VESDE:
    """The variance-exploding SDE dx = √(dσ²(s)/ds) dW with σ(s) = σ_min (σ_max/σ_min)^s (NCSN in continuous time).

    x_s | x_0 ~ N(x_0, (σ(s)² − σ_min²) I): the data never shrink, the noise grows to σ_max.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, s: float) -> float:
        """σ(s) = σ_min (σ_max/σ_min)^s."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _check_time(s)

    def drift(self, x: torch.Tensor, s: float) -> torch.Tensor:
        """f = 0: no shrinking."""
        return torch.zeros_like(x)

    def diffusion_coefficient(self, s: float) -> float:
        """g(s) = √(dσ²/ds) = σ(s) √(2 log(σ_max/σ_min))."""
        return self.sigma(s) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal_std(self, s: float) -> float:
        """√(σ(s)² − σ_min²)."""
        return math.sqrt(self.sigma(s) ** 2 - self.sigma_min**2)

    def marginal_sample(self, x0: torch.Tensor, s: float, noise: torch.Tensor) -> torch.Tensor:
        """x_s = x_0 + √(σ(s)² − σ_min²) ε."""
        return x0 + self.marginal_std(s) * noise

    def mixture_marginal(self, mixture: GaussianMixture, s: float) -> GaussianMixture:
        """p_s exactly, when the data are ``mixture``."""
        return mixture.convolved(self.marginal_std(s) ** 2)

    def prior_std(self) -> float:
        """x_1 is drawn from N(0, σ_max² I) (the data's own spread is negligible next to σ_max)."""
        return self.sigma_max


SDE = VPSDE | VESDE


def prior_sample(sde: SDE, shape: tuple[int, ...], generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x_1 ~ N(0, prior_std² I)."""
    return sde.prior_std() * torch.randn(shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Stochastic integration
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def euler_maruyama(sde: SDE, x0: torch.Tensor, s_end: float, steps: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulate the forward SDE from s = 0 to ``s_end``: x ← x + f(x, s) Δs + g(s) √Δs z (lesson 05, eq. 3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = np.linspace(0.0, _check_time(s_end), steps + 1)
    x = x0.clone()
    for s, s_next in itertools.pairwise(times):
        step = s_next - s
        x = x + sde.drift(x, s) * step + sde.diffusion_coefficient(s) * math.sqrt(step) * randn_like(x, generator)
    return x


@torch.no_grad()
def reverse_sde_sample(sde: SDE, score_fn: TimeScore, x_T: torch.Tensor, steps: int,
                       generator: torch.Generator | None = None, s_min: float = 1e-3,
                       progress: bool = False) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE from s = 1 to ``s_min`` (Song et al. 2021, eq. 6; lesson 05, eq. 5).

    x ← x − [f(x, s) − g(s)² ∇ log p_s(x)] Δs + g(s) √Δs z, with Δs > 0 the step back in time; no noise on the
    last step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = np.linspace(1.0, _check_time(s_min), steps + 1)
    x = x_T.clone()
    for index in tqdm(range(steps), disable=not progress, desc="reverse SDE", leave=False):
        s, step = times[index], times[index] - times[index + 1]
        g = sde.diffusion_coefficient(s)
        x = x - (sde.drift(x, s) - g**2 * score_fn(x, s)) * step
        if index < steps - 1:
            x = x + g * math.sqrt(step) * randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------
# The probability-flow ODE
# ---------------------------------------------------------------------------------------


def probability_flow_drift(sde: SDE, score_fn: TimeScore) -> Drift:
    """v(x, s) = f(x, s) − ½ g(s)² ∇ log p_s(x): the ODE whose solutions carry p_1 to p_0 (lesson 05, eq. 4)."""
    def drift(x: torch.Tensor, s: float) -> torch.Tensor:
        return sde.drift(x, s) - 0.5 * sde.diffusion_coefficient(s) ** 2 * score_fn(x, s)
    return drift


@torch.no_grad()
def ode_euler(drift: Drift, x: torch.Tensor, s_start: float, s_end: float, steps: int) -> tuple[torch.Tensor, int]:
    """Euler's method, x ← x + v(x, s) Δs, on a uniform grid; returns (x at s_end, number of drift evaluations)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = np.linspace(s_start, s_end, steps + 1)
    for s, s_next in itertools.pairwise(times):
        x = x + drift(x, s) * (s_next - s)
    return x, steps


@torch.no_grad()
def ode_heun(drift: Drift, x: torch.Tensor, s_start: float, s_end: float, steps: int) -> tuple[torch.Tensor, int]:
    """Heun's method (explicit trapezoid, second order): an Euler guess, then the average of both slopes.

    Returns (x at s_end, number of drift evaluations = 2 · steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = np.linspace(s_start, s_end, steps + 1)
    for s, s_next in itertools.pairwise(times):
        step = s_next - s
        slope = drift(x, s)
        guess = x + slope * step
        x = x + 0.5 * (slope + drift(guess, s_next)) * step
    return x, 2 * steps


@torch.no_grad()
def ode_solve_ivp(drift: Drift, x: torch.Tensor, s_start: float, s_end: float, rtol: float = 1e-5,
                  atol: float = 1e-5, method: str = "RK45") -> tuple[torch.Tensor, int]:
    """Solve the ODE with scipy's adaptive ``solve_ivp`` (Dormand–Prince RK45 by default).

    The whole batch is one flat state vector, so the step size adapts to the hardest example.
    Returns (x at s_end, number of drift evaluations).
    """
    shape, dtype, device = x.shape, x.dtype, x.device

    def flat_drift(s: float, state: np.ndarray) -> np.ndarray:
        current = torch.from_numpy(state).to(device=device, dtype=dtype).reshape(shape)
        return drift(current, float(s)).reshape(-1).double().cpu().numpy()

    solution = solve_ivp(flat_drift, (s_start, s_end), x.reshape(-1).double().cpu().numpy(), method=method,
                         rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"solve_ivp failed: {solution.message}")
    return torch.from_numpy(solution.y[:, -1]).to(device=device, dtype=dtype).reshape(shape), int(solution.nfev)


def divergence(drift: Drift, x: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The drift v(x, s) and its exact divergence Σ_i ∂v_i/∂x_i per example, by one backward pass per dimension.

    Exact and cheap in 2D; in high dimensions one would use Hutchinson's trace estimator instead.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = drift(x, s)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for dim in range(x.shape[1]):
            (gradient,) = torch.autograd.grad(value[:, dim].sum(), x, retain_graph=dim < x.shape[1] - 1)
            total = total + gradient[:, dim]
    return value.detach(), total.detach()


def ode_log_likelihood(sde: SDE, score_fn: TimeScore, x0: torch.Tensor, s_min: float = 1e-3, rtol: float = 1e-6,
                       atol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """log p_{s_min}(x0) per example through the probability-flow ODE (Song et al. 2021, eq. 39; lesson 05, eq. 5).

    Integrates x and ∫ div v ds together from s_min to 1, then
    log p_{s_min}(x(s_min)) = log N(x(1); 0, prior_std² I) + ∫_{s_min}^1 div v(x(s), s) ds.
    Data must be [N, D] (the divergence is exact, D backward passes). Returns (log-likelihoods, evaluations).
    """
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape [N, D], got {tuple(x0.shape)}")
    drift = probability_flow_drift(sde, score_fn)
    count, dims = x0.shape

    def augmented(s: float, state: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(state[: count * dims]).reshape(count, dims)
        value, div = divergence(drift, x, float(s))
        return np.concatenate([value.reshape(-1).numpy(), div.numpy()])

    start = np.concatenate([x0.detach().double().cpu().reshape(-1).numpy(), np.zeros(count)])
    solution = solve_ivp(augmented, (s_min, 1.0), start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"solve_ivp failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1])
    x_end, integral = end[: count * dims].reshape(count, dims), end[count * dims:]
    variance = sde.prior_std() ** 2
    prior = -0.5 * (x_end**2).sum(1) / variance - 0.5 * dims * math.log(2 * math.pi * variance)
    return prior + integral, int(solution.nfev)
