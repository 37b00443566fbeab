"""Samplers that turn noise into data (lesson 03: DDPM's ancestral sampler; lesson 08 adds the fast ones).

Every sampler takes an ε-model ``eps_model(x_t, t)`` (t: 1-D int64 tensor of the paper's timesteps), a
:class:`~minidiff.schedules.NoiseSchedule`, and either a ``shape`` to draw x_T ~ N(0, I) with
``generator`` or a given ``x_T``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from minidiff.elbo import EpsModel, model_mean_variance
from minidiff.runtime import randn_like
from minidiff.schedules import NoiseSchedule


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
