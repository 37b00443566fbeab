"""The kinds of model a sampler can be handed, each declared once, and the adapters between them.

Every later lesson (text-conditioned, latent, distilled, LoRA-adapted and flow-matching models) reaches
the samplers through one of these kinds. Conditioning (a label, a caption, a guidance scale) is never a
sampler argument: it is closed over by a wrapper that returns a plain model of the same kind, as
:mod:`minidiff.guidance` does.

========================  =========================================  ==================================
kind                      call                                       used by
========================  =========================================  ==================================
:data:`EpsModel`          ``eps_model(x_t, timesteps) -> ε̂``         :mod:`samplers`, :mod:`elbo`, training
:data:`TimeScore`         ``score(x, s) -> ∇ log p_s(x)``, s ∈ [0, 1]  :mod:`sde` (reverse SDE, PF-ODE)
:data:`LevelScore`        ``score(x) -> ∇ log p(x)``, one noise level  :mod:`score` (Langevin, losses)
:data:`SigmaScore`        ``score(x, σ) -> ∇ log (p ∗ N(0, σ²))(x)``   :mod:`score` (annealed Langevin)
:data:`VelocityModel`     ``velocity(x_τ, τ) -> v̂``, τ ∈ [0, 1]       lesson 14 (flow matching)
:data:`NoisyClassifier`   ``classifier(x_t, timesteps) -> logits``   :mod:`guidance`
========================  =========================================  ==================================

``timesteps`` is a 1-D tensor with one entry per example, in the paper's t = 1..T of a
:class:`~minidiff.schedules.NoiseSchedule`. The discrete samplers pass integers; :func:`score_from_eps`
passes the real number t = s·T (a network's sinusoidal embedding accepts any real t, an exact oracle
refuses it).

Adapters (each a closure returning the other kind):

* :func:`score_from_eps`: ε-model → continuous-time score, −ε(x, sT)/√(1 − ᾱ(s)) (lesson 05).
* :func:`eps_from_score`: continuous-time score → ε-model, −√(1 − ᾱ_t) score(x, t/T) (lesson 04, eq. 6).
* :func:`at_level`: continuous-time score → the score of one level, for Langevin at that level.
* :func:`eps_from_v`: a v-prediction network (Salimans & Ho 2022) → ε-model;
* :func:`eps_from_velocity`: a velocity model of the straight path x_τ = (1 − τ) x_0 + τ ε → ε-model of a
  variance-preserving schedule, by rescaling x_t and mapping t to τ (lesson 14).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for the annotations: contracts must not depend on the modules that use them
    from minidiff.schedules import NoiseSchedule
    from minidiff.sde import VPSDE

#: ε_θ(x_t, timesteps): the noise in x_t; ``timesteps`` [B] holds the paper's t (1..T) of each example.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ∇ log p_s(x) at continuous time s ∈ [0, 1], a float shared by the batch (lesson 05).
TimeScore = Callable[[torch.Tensor, float], torch.Tensor]
#: ∇ log p(x) of one fixed density, e.g. the data at one noise level (lesson 04).
LevelScore = Callable[[torch.Tensor], torch.Tensor]
#: ∇ log (p ∗ N(0, σ² I))(x): the score of the data convolved with noise of standard deviation σ (NCSN).
SigmaScore = Callable[[torch.Tensor, float], torch.Tensor]
#: v_θ(x_τ, τ): the velocity dx/dτ of a probability path at τ ∈ [0, 1] (τ = 0 data, τ = 1 noise), [B] reals.
VelocityModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: log p_φ(y | x_t, timesteps) up to a constant: class logits [B, classes] of a classifier of noisy inputs.
NoisyClassifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_from_eps(eps_model: EpsModel, sde: VPSDE) -> TimeScore:
    """The score of a VP diffusion from an ε-model trained on its discrete schedule: −ε_θ(x, sT)/√(1 − ᾱ(s)).

    Lesson 04, eq. 9 in continuous time. The network receives the real timestep sT.
    """
    def score(x: torch.Tensor, s: float) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), s * sde.T, device=x.device, dtype=torch.float32)
        return -eps_model(x, timesteps).to(x.dtype) / sde.marginal_std(s)
    return score


def eps_from_score(score: TimeScore, schedule: NoiseSchedule) -> EpsModel:
    """An ε-model from a continuous-time score of the same VP process: ε = −√(1 − ᾱ_t) score(x_t, t/T).

    Examples that share a timestep are scored together (a :data:`TimeScore` takes one s per call).
    """
    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return per_timestep(x, timesteps, lambda t, rows: -float(1 - schedule.alpha_bars[t]) ** 0.5
                            * score(rows, t / schedule.T))
    return eps


def at_level(score: TimeScore, s: float) -> LevelScore:
    """The score of the single density p_s, for Langevin dynamics at that level: x ↦ score(x, s)."""
    return lambda x: score(x, s)


def eps_from_v(v_model: EpsModel, schedule: NoiseSchedule) -> EpsModel:
    """Read a v-prediction network (trained with ``ddpm_loss(..., target="v")``) as an ε-model:
    ε̂ = √(1 − ᾱ_t) x_t + √ᾱ_t v̂ (:meth:`NoiseSchedule.eps_from_v`), so every sampler of lesson 08 runs it."""
    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return schedule.eps_from_v(x, timesteps, v_model(x, timesteps).to(x.dtype))
    return eps


def eps_from_velocity(velocity_model: VelocityModel, schedule: NoiseSchedule) -> EpsModel:
    """Read a straight-path velocity model as an ε-model of a VP schedule (lesson 14).

    A VP sample x_t = a x_0 + b ε (a = √ᾱ_t, b = √(1 − ᾱ_t)) divided by a + b is a point of the straight
    path x_τ = (1 − τ) x_0 + τ ε at τ = b/(a + b). There v = ε − x_0 and x_τ = (1 − τ) x_0 + τ ε, so
    ε = x_τ + (1 − τ) v.
    """
    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = schedule.gather(schedule.alpha_bars, timesteps, x).sqrt()
        b = (1 - schedule.gather(schedule.alpha_bars, timesteps, x)).sqrt()
        tau = b / (a + b)
        x_tau = x / (a + b)
        return x_tau + (1 - tau) * velocity_model(x_tau, tau.flatten()).to(x.dtype)
    return eps


def per_timestep(x: torch.Tensor, timesteps: torch.Tensor,
                 value_at: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``value_at(t, rows)`` for each distinct integer timestep t of the batch, reassembled in batch order
    (one row per example; the rows may have any shape, e.g. class logits).

    The exact oracles describe one marginal q_t at a time; samplers call them with one t per batch, so this
    loop usually runs once. Real-valued timesteps are refused: an oracle has no q_t between the schedule's steps.
    """
    if timesteps.is_floating_point():
        if not torch.equal(timesteps, timesteps.round()):
            raise ValueError("this model is exact only at the schedule's integer timesteps; got real-valued ones")
        timesteps = timesteps.long()
    out = None
    for value in torch.unique(timesteps):
        rows = timesteps == value
        result = value_at(int(value), x[rows]).to(x.dtype)
        if out is None:  # the first result gives the output's shape: like x for ε or a score, [B, K] for logits
            out = x.new_empty((x.shape[0], *result.shape[1:]))
        out[rows] = result
    return out
