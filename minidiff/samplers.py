"""Samplers that turn noise into data (lesson 03: DDPM's ancestral sampler; lesson 08: the fast ones).

Every sampler takes an :data:`~minidiff.contracts.EpsModel` ``eps_model(x_t, timesteps)``, a
:class:`~minidiff.schedules.NoiseSchedule` and the starting noise ``x_T`` (draw it with
:func:`minidiff.runtime.standard_normal`). The fast samplers also take ``steps`` and a ``spacing`` that picks
which of the T timesteps they visit (:func:`timestep_sequence`), and walk the pairs (t, t_next) down to 0.

The step each lesson derives is a function of its own (:func:`ddpm_step`, :func:`ddim_step`), which the
samplers call. Everything else is a wrapper of the ε-model or a callback, so no sampler grows a flag:

* guidance (lesson 09) and thresholding (:func:`thresholded`) wrap the ε-model;
* ``callback(state)`` sees every step as a dict with ``i`` (the step's index), ``t``, ``t_next``, ``x`` (the
  state after the step) and ``x0`` (the prediction x̂_0 made at t) — e.g. to record a trajectory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from minidiff.contracts import EpsModel
from minidiff.elbo import model_mean_variance
from minidiff.runtime import check_number, randn_like
from minidiff.schedules import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")
#: ``callback(state)``: called after every step with {"i", "t", "t_next", "x", "x0"}.
Callback = Callable[[dict[str, Any]], None]


def _timesteps(x: torch.Tensor, t: int) -> torch.Tensor:
    """The [B] tensor of one shared timestep t that an ε-model is called with."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _start(x_T: torch.Tensor) -> torch.Tensor:
    """Check the starting noise: a tensor, never a shape (a tuple here used to mean "draw it for me")."""
    if not isinstance(x_T, torch.Tensor):
        raise ValueError(f"x_T must be a tensor of starting noise, got {type(x_T).__name__}; draw one with "
                         "minidiff.runtime.standard_normal(shape, generator, device)")
    return x_T


def _finite(x: torch.Tensor, sampler: str) -> torch.Tensor:
    """Return a sampler's result, or stop with a clear error if it holds NaN or inf (never a silent wrong result)."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"{sampler} produced NaN or inf: the ε-model returned non-finite values, or a wrapper (guidance scale, "
            "thresholding) or the schedule pushed the state out of range. Check the model's output on x_T first.")
    return x


def _report(callback: Callback | None, schedule: NoiseSchedule, i: int, t: int, t_next: int, x_t: torch.Tensor,
            eps: torch.Tensor, x: torch.Tensor) -> None:
    """Call ``callback`` with the state after a step from ``x_t`` (where the model said ``eps``) to ``x``.

    x̂_0 is computed here, only when there is a callback, so that sampling without one does no extra work.
    """
    if callback is not None:
        callback({"i": i, "t": t, "t_next": t_next, "x": x, "x0": schedule.x0_from_eps(x_t, t, eps)})


# ---------------------------------------------------------------------------------------
# DDPM (lesson 03)
# ---------------------------------------------------------------------------------------


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, schedule: NoiseSchedule, z: torch.Tensor,
              variance: str = "beta") -> torch.Tensor:
    """One step of Algorithm 2 (Ho et al. 2020): x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) ε) / √α_t + σ_t z.

    σ_t² is β_t (``variance="beta"``) or β̃_t (``"beta_tilde"``); no noise is added at t = 1 (lesson 03,
    Exercise 3.2).
    """
    mean, var = model_mean_variance(schedule, x_t, _timesteps(x_t, t), eps, variance)
    return mean + var.sqrt() * z if t > 1 else mean


@torch.no_grad()
def ddpm_sample(eps_model: EpsModel, schedule: NoiseSchedule, x_T: torch.Tensor,
                generator: torch.Generator | None = None, variance: str = "beta",
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Algorithm 2 of Ho et al. (2020): :func:`ddpm_step` for t = T, …, 1, starting from ``x_T``."""
    x = _start(x_T)
    for i, t in enumerate(tqdm(range(schedule.T, 0, -1), disable=not progress, desc="DDPM sampling", leave=False)):
        eps, x_t = eps_model(x, _timesteps(x, t)).to(x.dtype), x
        x = ddpm_step(x, eps, t, schedule, randn_like(x, generator) if t > 1 else torch.zeros_like(x), variance)
        _report(callback, schedule, i, t, t - 1, x_t, eps, x)
    return _finite(x, "DDPM")


# ---------------------------------------------------------------------------------------
# Fast samplers (lesson 08)
# ---------------------------------------------------------------------------------------


def timestep_sequence(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The decreasing timesteps τ_S > … > τ_1 (each in 1..T) that a fast sampler visits, then it jumps to 0.

    * ``"leading"``: 1, 1 + k, 1 + 2k, … with k = T // steps (the DDIM paper's "linear" choice; never reaches T).
    * ``"trailing"``: T, T − k, T − 2k, … with k = T / steps rounded (starts at T, where x_T really is
      noise; recommended by Lin et al. 2024).
    * ``"linspace"``: ``steps`` points rounded from an even grid between 1 and T.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the schedule's T = {T} training timesteps")
    if spacing == "leading":
        sequence = [1 + i * (T // steps) for i in range(steps)]
    elif spacing == "trailing":
        sequence = [round(T - i * T / steps) for i in range(steps)]
    elif spacing == "linspace":
        sequence = torch.linspace(1, T, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return sorted(set(sequence), reverse=True)


def _pairs(schedule: NoiseSchedule, steps: int, spacing: str, label: str, progress: bool) -> Any:
    """(i, (t, t_next)) for the visited timesteps and then 0, behind an optional progress bar."""
    sequence = timestep_sequence(schedule.T, steps, spacing)
    return enumerate(tqdm(list(itertools.pairwise([*sequence, 0])), disable=not progress, desc=label, leave=False))


def threshold_x0(x0: torch.Tensor, clip: float | None = None, dynamic_percentile: float | None = None) -> torch.Tensor:
    """Keep a predicted x̂_0 in the data range: clip to [−clip, clip], or dynamic thresholding (Saharia et al.

    2022, §2.3): per image, s = max(1, the ``dynamic_percentile`` quantile of |x̂_0|), then x̂_0 ← clamp(x̂_0, −s, s)/s.
    """
    if dynamic_percentile is not None:
        if not 0.0 < dynamic_percentile <= 1.0:
            raise ValueError(f"dynamic_percentile must be in (0, 1], got {dynamic_percentile}")
        scale = torch.quantile(x0.abs().flatten(1).float(), dynamic_percentile, dim=1).clamp(min=1.0)
        scale = scale.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x0 = torch.maximum(torch.minimum(x0, scale), -scale) / scale
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        x0 = x0.clamp(-clip, clip)
    return x0


def thresholded(eps_model: EpsModel, schedule: NoiseSchedule, clip: float | None = None,
                dynamic_percentile: float | None = None) -> EpsModel:
    """An ε-model whose implied x̂_0 is kept in range by :func:`threshold_x0`.

    ε̂ is recomputed from the thresholded x̂_0, ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t), so that every sampler, which
    reads x̂_0 and ε̂ off the same model, sees the two consistent.
    """
    if clip is None and dynamic_percentile is None:
        raise ValueError("give clip, dynamic_percentile or both: otherwise there is nothing to threshold")

    def eps_in_range(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x0 = schedule.x0_from_eps(x, timesteps, eps_model(x, timesteps).to(x.dtype))
        return schedule.eps_from_x0(x, timesteps, threshold_x0(x0, clip, dynamic_percentile))
    return eps_in_range


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_next: float, eta: float,
              z: torch.Tensor) -> torch.Tensor:
    """One DDIM step (Song, Meng & Ermon 2021, eq. 12) from level ᾱ_t to ᾱ_next (lesson 08, Exercise 8.1):

    x_next = √ᾱ_next x̂_0 + √(1 − ᾱ_next − σ²) ε + σ z,  x̂_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t,
    σ = η √((1 − ᾱ_next)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_next).

    η = 0 is deterministic (an ODE solver); η = 1 with ᾱ_next = ᾱ_{t−1} is DDPM with σ_t² = β̃_t.
    """
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_next)) ** 0.5
    # max(…, 0): the root's argument is ≥ 0 in exact arithmetic, but can round to −1e-17 when ᾱ_next = 1.
    return alpha_bar_next**0.5 * x0 + max(1 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * eps + sigma * z


@torch.no_grad()
def ddim_sample(eps_model: EpsModel, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50,
                eta: float = 0.0, spacing: str = "trailing", generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM: :func:`ddim_step` over the pairs of :func:`timestep_sequence`, with ᾱ_0 = 1 at the last step."""
    check_number("eta", eta, 0.0)  # 0: deterministic DDIM, 1: DDPM-like
    x = _start(x_T)
    for i, (t, t_next) in _pairs(schedule, steps, spacing, f"DDIM η={eta}", progress):
        eps, x_t = eps_model(x, _timesteps(x, t)).to(x.dtype), x
        z = randn_like(x, generator) if eta > 0 and t_next > 0 else torch.zeros_like(x)
        x = ddim_step(x, eps, float(schedule.alpha_bars[t]), float(schedule.alpha_bars[t_next]), eta, z)
        _report(callback, schedule, i, t, t_next, x_t, eps, x)
    return _finite(x, "DDIM")


@torch.no_grad()
def pf_ode_sample(eps_model: EpsModel, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50,
                  method: str = "heun", spacing: str = "trailing", callback: Callback | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The probability-flow ODE in DDIM's variables (lesson 08), dx̄/dσ̄ = ε_θ(x, t), by Euler or Heun.

    Notation (variable → symbol): ``x_bar`` → x̄ = x/√ᾱ, ``sigma_bar`` → σ̄ = √(1 − ᾱ)/√ᾱ, ``slope`` →
    ε_θ(x_t, t), ``slope_next`` → ε_θ at the Euler guess (Heun's corrector; Karras et al. 2022, Algorithm 1).
    The last step, to σ̄ = 0 where no ε is defined, is always Euler. The result is x̄ at σ̄ = 0, which is
    x_0 itself because ᾱ_0 = 1.

    Heun's *first* step is Euler too. It starts at σ̄_T = √(1 − ᾱ_T)/√ᾱ_T, about 2·10⁴ for the clipped cosine
    schedule (ᾱ_T ≈ 2.4·10⁻⁹), and with few steps it jumps down to σ̄ of order 1. Euler's step is nearly exact
    there (x̄ ≈ σ̄ ε while the state is pure noise), but Heun's corrector multiplies the change of ε between the
    two ends, an O(1) number, by half that jump: with Gaussian data the endpoint is then off by 161 at 3 steps
    and by 4.9 at 10 (lesson 08). The price of the Euler step is a small first-order error, near 10⁻⁴, that
    flattens Heun's convergence beyond about 100 steps. Karras et al. avoid the problem by capping σ_max at 80
    instead, which changes the schedule.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")

    def sqrt_alpha_bar(t: int) -> float:
        return float(schedule.alpha_bars[t]) ** 0.5

    def sigma_bar(t: int) -> float:
        return float(1 - schedule.alpha_bars[t]) ** 0.5 / sqrt_alpha_bar(t)

    x_bar, x_T = None, _start(x_T)
    for i, (t, t_next) in _pairs(schedule, steps, spacing, f"PF-ODE {method}", progress):
        x_bar = x_T / sqrt_alpha_bar(t) if x_bar is None else x_bar
        x_t = x_bar * sqrt_alpha_bar(t)
        slope = eps_model(x_t, _timesteps(x_t, t)).to(x_t.dtype)
        d_sigma_bar = sigma_bar(t_next) - sigma_bar(t)
        x_bar_next = x_bar + d_sigma_bar * slope
        if method == "heun" and t_next > 0 and i > 0:  # i == 0: Euler from σ̄_T (see the docstring)
            x_guess = x_bar_next * sqrt_alpha_bar(t_next)
            slope_next = eps_model(x_guess, _timesteps(x_guess, t_next)).to(x_t.dtype)
            x_bar_next = x_bar + d_sigma_bar * 0.5 * (slope + slope_next)
        x_bar = x_bar_next
        _report(callback, schedule, i, t, t_next, x_t, slope, x_bar * sqrt_alpha_bar(t_next))
    return _finite(x_bar, "the PF-ODE solver")


@torch.no_grad()
def dpm_solver_pp_sample(eps_model: EpsModel, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20,
                         spacing: str = "trailing", callback: Callback | None = None,
                         progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver in λ = log(α/σ).

    With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), h_i = λ_{t_i} − λ_{t_{i−1}} and r_i = h_{i−1}/h_i:

    x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i}(e^{−h_i} − 1) D_i,
    D_i = (1 + 1/(2r_i)) x̂_0(t_{i−1}) − 1/(2r_i) x̂_0(t_{i−2})   (D_i = x̂_0(t_{i−1}) at the first step).

    Notation (variable → symbol): ``t`` → t_{i−1}, ``t_next`` → t_i, ``h`` → h_i, ``previous_h`` → h_{i−1},
    ``r`` → r_i, ``x0_multistep`` → D_i, ``previous_x0`` → x̂_0(t_{i−2}). One ε per step; the last step
    (to σ = 0) is first order and returns x̂_0 itself.
    """
    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        alpha, sigma = float(schedule.alpha_bars[t]) ** 0.5, float(1 - schedule.alpha_bars[t]) ** 0.5
        return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)

    x, previous_x0, previous_h = _start(x_T), None, None
    for i, (t, t_next) in _pairs(schedule, steps, spacing, "DPM-Solver++(2M)", progress):
        eps, x_t = eps_model(x, _timesteps(x, t)).to(x.dtype), x
        x0 = schedule.x0_from_eps(x, t, eps)
        _, sigma_t, lambda_t = alpha_sigma_lambda(t)
        alpha_next, sigma_next, lambda_next = alpha_sigma_lambda(t_next)
        if t_next == 0:
            x = x0  # σ_next = 0: the first-order update is exactly x̂_0
        else:
            h = lambda_next - lambda_t
            x0_multistep = x0
            if previous_x0 is not None:
                r = previous_h / h
                x0_multistep = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            x = (sigma_next / sigma_t) * x - alpha_next * math.expm1(-h) * x0_multistep
            previous_h = h
        previous_x0 = x0
        _report(callback, schedule, i, t, t_next, x_t, eps, x)
    return _finite(x, "DPM-Solver++(2M)")


@torch.no_grad()
def ddim_invert(eps_model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, steps: int = 50,
                spacing: str = "trailing", progress: bool = False) -> torch.Tensor:
    """Run deterministic DDIM backwards, x_0 → x_T: x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂, ε̂ taken at the lower step.

    The ODE is followed with the slope of where we are, not of where we land (which is unknown), so
    decoding the result with :func:`ddim_sample` (same steps, η = 0) gives x_0 back only approximately;
    the error shrinks as steps grow. At the very first step ε is taken at τ_1 on x_0 itself.
    """
    sequence = timestep_sequence(schedule.T, steps, spacing)[::-1]  # increasing
    x = x0
    for t_low, t in tqdm(list(itertools.pairwise([0, *sequence])), disable=not progress, desc="DDIM inversion",
                         leave=False):
        t_eps = t_low if t_low > 0 else sequence[0]  # the timestep whose ε we use: where we are
        eps = eps_model(x, _timesteps(x, t_eps)).to(x.dtype)
        x0_pred = schedule.x0_from_eps(x, t_low, eps) if t_low > 0 else x
        alpha_bar = float(schedule.alpha_bars[t])
        x = alpha_bar**0.5 * x0_pred + (1 - alpha_bar) ** 0.5 * eps
    return _finite(x, "DDIM inversion")


def slerp(z0: torch.Tensor, z1: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noises (Shoemake 1985): sin((1−w)θ)/sin θ · z0 + sin(wθ)/sin θ · z1.

    Gaussian noise in many dimensions lives near a sphere of radius √d; a straight line between two such
    points passes inside it (its middle has norm ≈ √(d/2)), which the model has never seen. Each example
    (the first dimension) gets its own angle θ.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    flat0, flat1 = z0.flatten(1), z1.flatten(1)
    cosine = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0)).view(-1, *([1] * (z0.ndim - 1)))
    weight = torch.as_tensor(weight, dtype=z0.dtype, device=z0.device)
    return (torch.sin((1 - weight) * theta) * z0 + torch.sin(weight * theta) * z1) / torch.sin(theta)
