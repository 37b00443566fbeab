"""Samplers that turn noise into data (lesson 03: DDPM's ancestral sampler; lesson 08: the fast ones).

Every sampler takes an ε-model ``eps_model(x_t, t)`` (t: 1-D int64 tensor of the paper's timesteps), a
:class:`~minidiff.schedules.NoiseSchedule`, and either a ``shape`` to draw x_T ~ N(0, I) with
``generator`` or a given ``x_T``. The fast samplers also take ``steps`` and a ``spacing`` that picks which
of the T timesteps they visit (:func:`timestep_sequence`); each can clip or dynamically threshold its
x̂_0 predictions, return its trajectory and show a progress bar. Guidance (lesson 09) wraps the ε-model,
so every sampler accepts a guided model unchanged.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from minidiff.elbo import EpsModel, model_mean_variance
from minidiff.runtime import randn_like
from minidiff.schedules import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def initial_noise(shape: tuple[int, ...] | None, x_T: torch.Tensor | None, generator: torch.Generator | None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """x_T: the given tensor, or N(0, I) noise of ``shape`` on ``device`` (exactly one of shape, x_T)."""
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape (to draw x_T ~ N(0, I)) or x_T")
    if x_T is not None:
        return x_T
    return randn_like(torch.empty(shape, device=device or "cpu"), generator)


@torch.no_grad()
def ddpm_sample(eps_model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...] | None = None,
                x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                variance: str = "beta", device: torch.device | str | None = None,
                return_trajectory: bool = False, progress: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Algorithm 2 of Ho et al. (2020): x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t)) / √α_t + σ_t z, t = T..1.

    σ_t² is β_t (``variance="beta"``) or β̃_t (``"beta_tilde"``); no noise is added at the last step.
    With ``return_trajectory`` also returns [x_T, x_{T−1}, …, x_0] (on the CPU).
    """
    x = initial_noise(shape, x_T, generator, device)
    trajectory = [x.cpu()] if return_trajectory else []
    batch = x.shape[0]
    for t in tqdm(range(schedule.T, 0, -1), disable=not progress, desc="DDPM sampling", leave=False):
        steps = torch.full((batch,), t, dtype=torch.long, device=x.device)
        mean, var = model_mean_variance(schedule, x, steps, eps_model(x, steps).to(x.dtype), variance)
        x = mean + var.sqrt() * randn_like(x, generator) if t > 1 else mean
        if return_trajectory:
            trajectory.append(x.cpu())
    return (x, trajectory) if return_trajectory else x


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


def _predict(eps_model: EpsModel, schedule: NoiseSchedule, x: torch.Tensor, t: int, clip: float | None,
             dynamic_percentile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) at timestep t; when x̂_0 is clipped, ε̂ is recomputed from it so that the two stay consistent."""
    steps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps = eps_model(x, steps).to(x.dtype)
    x0 = schedule.x0_from_eps(x, t, eps)
    if clip is not None or dynamic_percentile is not None:
        x0 = threshold_x0(x0, clip, dynamic_percentile)
        eps = schedule.eps_from_x0(x, t, x0)
    return x0, eps


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alpha_bars[t])


@torch.no_grad()
def ddim_sample(eps_model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...] | None = None,
                x_T: torch.Tensor | None = None, steps: int = 50, eta: float = 0.0, spacing: str = "trailing",
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                clip_x0: float | None = None, dynamic_threshold: float | None = None,
                return_trajectory: bool = False, progress: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12), from τ_i = t to τ_{i−1} = s (ᾱ_s = 1 at the last step):

    x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z,   σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s).

    η = 0 is deterministic (an ODE solver); η = 1 over all T steps is DDPM with σ_t² = β̃_t.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    sequence = timestep_sequence(schedule.T, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)
    trajectory = [x.cpu()] if return_trajectory else []
    for index, t in enumerate(tqdm(sequence, disable=not progress, desc=f"DDIM η={eta}", leave=False)):
        s = sequence[index + 1] if index + 1 < len(sequence) else 0
        alpha_bar_t, alpha_bar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        x0, eps = _predict(eps_model, schedule, x, t, clip_x0, dynamic_threshold)
        sigma = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5
        x = alpha_bar_s ** 0.5 * x0 + max(1 - alpha_bar_s - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if return_trajectory:
            trajectory.append(x.cpu())
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def pf_ode_sample(eps_model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...] | None = None,
                  x_T: torch.Tensor | None = None, steps: int = 50, method: str = "heun", spacing: str = "trailing",
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  clip_x0: float | None = None, dynamic_threshold: float | None = None,
                  return_trajectory: bool = False, progress: bool = False,
                  ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """The probability-flow ODE in DDIM's variables (lesson 08): with x̄ = x/√ᾱ and σ̄ = √(1 − ᾱ)/√ᾱ,

    dx̄/dσ̄ = ε_θ(x, t),

    solved by Euler (one ε per step) or Heun (Euler, then the trapezoid of the two slopes; two ε per step,
    Karras et al. 2022, Algorithm 1). The last step, to σ̄ = 0 where no ε is defined, is always Euler.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    sequence = timestep_sequence(schedule.T, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)
    trajectory = [x.cpu()] if return_trajectory else []

    def sigma_bar(t: int) -> float:
        return ((1 - _alpha_bar(schedule, t)) / _alpha_bar(schedule, t)) ** 0.5

    x_bar = x / _alpha_bar(schedule, sequence[0]) ** 0.5
    for index, t in enumerate(tqdm(sequence, disable=not progress, desc=f"PF-ODE {method}", leave=False)):
        s = sequence[index + 1] if index + 1 < len(sequence) else 0
        x_t = x_bar * _alpha_bar(schedule, t) ** 0.5
        slope = _predict(eps_model, schedule, x_t, t, clip_x0, dynamic_threshold)[1]
        step = sigma_bar(s) - sigma_bar(t)
        x_bar_next = x_bar + step * slope
        if method == "heun" and s > 0:
            x_s = x_bar_next * _alpha_bar(schedule, s) ** 0.5
            slope_next = _predict(eps_model, schedule, x_s, s, clip_x0, dynamic_threshold)[1]
            x_bar_next = x_bar + step * 0.5 * (slope + slope_next)
        x_bar = x_bar_next
        if return_trajectory:
            trajectory.append((x_bar * _alpha_bar(schedule, s) ** 0.5).cpu())
    return (x_bar, trajectory) if return_trajectory else x_bar


@torch.no_grad()
def dpm_solver_pp_sample(eps_model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...] | None = None,
                         x_T: torch.Tensor | None = None, steps: int = 20, spacing: str = "trailing",
                         generator: torch.Generator | None = None, device: torch.device | str | None = None,
                         clip_x0: float | None = None, dynamic_threshold: float | None = None,
                         return_trajectory: bool = False, progress: bool = False,
                         ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver in λ = log(α/σ).

    With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), h_i = λ_{t_i} − λ_{t_{i−1}} and r_i = h_{i−1}/h_i:

    x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i}(e^{−h_i} − 1) D_i,
    D_i = (1 + 1/(2r_i)) x̂_0(t_{i−1}) − 1/(2r_i) x̂_0(t_{i−2})   (D_i = x̂_0(t_{i−1}) at the first step).

    One ε per step, re-using the previous step's x̂_0; the last step (to σ = 0) is first order and
    returns x̂_0 itself.
    """
    sequence = timestep_sequence(schedule.T, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)
    trajectory = [x.cpu()] if return_trajectory else []

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        alpha, sigma = _alpha_bar(schedule, t) ** 0.5, (1 - _alpha_bar(schedule, t)) ** 0.5
        return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)

    previous_x0, previous_h = None, None
    for index, t in enumerate(tqdm(sequence, disable=not progress, desc="DPM-Solver++(2M)", leave=False)):
        s = sequence[index + 1] if index + 1 < len(sequence) else 0
        x0 = _predict(eps_model, schedule, x, t, clip_x0, dynamic_threshold)[0]
        _, sigma_t, lambda_t = alpha_sigma_lambda(t)
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(s)
        if s == 0:
            x = x0  # σ_s = 0: the first-order update is exactly x̂_0
        else:
            h = lambda_s - lambda_t
            data = x0
            if previous_x0 is not None:
                ratio = previous_h / h
                data = (1 + 1 / (2 * ratio)) * x0 - (1 / (2 * ratio)) * previous_x0
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * data
            previous_h = h
        previous_x0 = x0
        if return_trajectory:
            trajectory.append(x.cpu())
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def ddim_invert(eps_model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, steps: int = 50,
                spacing: str = "trailing", progress: bool = False) -> torch.Tensor:
    """Run deterministic DDIM backwards, x_0 → x_T: x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂, ε̂ taken at the lower step.

    The ODE is followed with the slope of where we are, not of where we land (which is unknown), so
    decoding the result with :func:`ddim_sample` (same steps, η = 0) gives x_0 back only approximately;
    the error shrinks as steps grow. At the very first step ε is taken at τ_1 on x_0 itself.
    """
    sequence = timestep_sequence(schedule.T, steps, spacing)[::-1]  # increasing
    x, s = x0, 0
    for t in tqdm(sequence, disable=not progress, desc="DDIM inversion", leave=False):
        where = s if s > 0 else sequence[0]
        where_steps = torch.full((x.shape[0],), where, dtype=torch.long, device=x.device)
        eps = eps_model(x, where_steps).to(x.dtype)
        x0_pred = schedule.x0_from_eps(x, s, eps) if s > 0 else x
        x = _alpha_bar(schedule, t) ** 0.5 * x0_pred + (1 - _alpha_bar(schedule, t)) ** 0.5 * eps
        s = t
    return x


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
