"""Scores, score matching and Langevin dynamics (lesson 04).

The score of a density p is s(x) = ∇_x log p(x). It needs no normalising constant, and it is what a
diffusion model learns: ε_θ(x_t, t) = −√(1 − ᾱ_t) ∇ log q_t(x_t) (lesson 04, eq. 6; see
``NoiseSchedule.score_from_eps`` / ``eps_from_score``). A score model here is a
:data:`~minidiff.contracts.LevelScore` ``score(x)`` of one density, or a :data:`~minidiff.contracts.SigmaScore`
``score(x, σ)`` of the data at noise level σ; all losses return a scalar to minimise. The exact scores of
mixtures live in :mod:`minidiff.oracles`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from minidiff.contracts import EpsModel, LevelScore, SigmaScore
from minidiff.runtime import check_number, randn_like


def gaussian_score(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    """∇_x log N(x; mean, var · I) = −(x − mean) / var."""
    var = torch.as_tensor(var)
    if (var <= 0).any():
        raise ValueError("gaussian_score needs var > 0")
    return -(x - mean) / var


# ---------------------------------------------------------------------------------------
# Score matching losses
# ---------------------------------------------------------------------------------------


def explicit_score_matching_loss(score_model: LevelScore, x: torch.Tensor, true_score: torch.Tensor) -> torch.Tensor:
    """½ E ‖s_θ(x) − ∇ log p(x)‖² (lesson 04, eq. 2): only possible when the true score is known."""
    if true_score.shape != x.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, true_score {tuple(true_score.shape)}")
    return 0.5 * ((score_model(x) - true_score) ** 2).sum(-1).mean()


def denoising_score_matching_loss(score_model: LevelScore, x: torch.Tensor, sigma: float,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """½ E ‖s_θ(x + σz) + z/σ‖² (Vincent 2011; lesson 04, eq. 4).

    Its minimiser is the score of the *noised* data p_σ = p ∗ N(0, σ² I), because E[−z/σ | x̃] = ∇ log p_σ(x̃);
    it differs from the explicit loss against ∇ log p_σ by a constant that does not depend on θ.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    z = randn_like(x, generator)
    return 0.5 * ((score_model(x + sigma * z) + z / sigma) ** 2).sum(-1).mean()


def sliced_score_matching_loss(score_model: LevelScore, x: torch.Tensor, generator: torch.Generator | None = None,
                               num_projections: int = 1) -> torch.Tensor:
    """E_v E_x [ vᵀ ∇_x(vᵀ s_θ(x)) + ½ (vᵀ s_θ(x))² ], v ~ N(0, I) (Song et al. 2019; lesson 04, eq. 6).

    Equal to the explicit loss minus ½ E‖∇ log p‖² (a constant) after integration by parts, and needs
    neither the true score nor the full Jacobian: one Jacobian-vector product per projection.
    """
    x = x.detach().requires_grad_(True)
    total = x.new_zeros(())
    for _ in range(num_projections):
        v = randn_like(x, generator)
        projected = (score_model(x) * v).sum(-1)
        (gradient,) = torch.autograd.grad(projected.sum(), x, create_graph=True)
        total = total + ((gradient * v).sum(-1) + 0.5 * projected**2).mean()
    return total / num_projections


# ---------------------------------------------------------------------------------------
# Sampling with scores
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def langevin(score_fn: LevelScore, x_init: torch.Tensor, step_size: float, steps: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Unadjusted Langevin dynamics: x ← x + η ∇ log p(x) + √(2η) z (lesson 04, §3).

    For small η and many steps the iterates follow p. ``x_init`` is not modified.
    """
    check_number("step_size", step_size, 0.0, above=True)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x = x_init.clone()
    for _ in range(steps):
        z = randn_like(x, generator)
        x = x + step_size * score_fn(x) + (2 * step_size) ** 0.5 * z
    return x


@torch.no_grad()
def annealed_langevin(score_fn: SigmaScore, x_init: torch.Tensor,
                      sigmas: Sequence[float], steps_per_level: int, step_scale: float,
                      generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; lesson 04, §3).

    For each noise level σ_i from largest to smallest, run ``steps_per_level`` Langevin steps on
    p_{σ_i} with step size η_i = step_scale · σ_i² / σ_L², so that the signal-to-noise of each step is
    the same at every level. ``score_fn(x, sigma)`` is the score of the data convolved with N(0, σ² I).
    """
    sigmas = [float(s) for s in sigmas]
    if any(b > a for a, b in itertools.pairwise(sigmas)) or min(sigmas) <= 0:
        raise ValueError("sigmas must be positive and decreasing (largest noise first)")
    x = x_init.clone()
    for sigma in tqdm(sigmas, disable=not progress, desc="annealed Langevin", leave=False):
        step_size = step_scale * sigma**2 / sigmas[-1] ** 2
        x = langevin(lambda points, s=sigma: score_fn(points, s), x, step_size, steps_per_level, generator)
    return x


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> list[float]:
    """σ_1 > … > σ_L spaced geometrically from sigma_max to sigma_min (NCSN's ladder)."""
    if not sigma_max > sigma_min > 0 or num_levels < 2:
        raise ValueError("need sigma_max > sigma_min > 0 and num_levels >= 2")
    return torch.logspace(torch.log10(torch.tensor(sigma_max)), torch.log10(torch.tensor(sigma_min)),
                          num_levels, dtype=torch.float64).tolist()


class NoiseConditionalScore:
    """s_θ(x, σ_i) = −net(x, i) / σ_i for a ladder of noise levels σ_1 > … > σ_L (NCSN; lesson 04, eq. 5).

    ``net(x, i)`` is an ε-model whose timesteps are the level indices i (e.g. :class:`~minidiff.nets.MLPDenoiser`).
    Writing the score as −net/σ makes the σ²-weighted denoising loss (Song & Ermon 2019, eq. 6)
    ½ σ² ‖s_θ(x + σz, σ) + z/σ‖² = ½ ‖net(x + σz, i) − z‖²: the network predicts the noise, as in DDPM.
    """

    def __init__(self, net: EpsModel, sigmas: Sequence[float]) -> None:
        self.net = net
        self.sigmas = torch.as_tensor(list(sigmas), dtype=torch.float32)
        if (self.sigmas.diff() >= 0).any() or (self.sigmas <= 0).any():
            raise ValueError("sigmas must be positive and strictly decreasing")

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising score matching at a random level per example, weighted by σ²: ½ E ‖net(x + σz, i) − z‖²."""
        where = generator.device if generator is not None else x.device
        levels = torch.randint(0, len(self.sigmas), (x.shape[0],), generator=generator, device=where).to(x.device)
        if self.sigmas.device != x.device:  # moved once, not on every step (a recorded CUDA graph cannot copy it)
            self.sigmas = self.sigmas.to(x.device)
        sigma = self.sigmas[levels][:, None]
        z = randn_like(x, generator)
        return 0.5 * ((self.net(x + sigma * z, levels) - z) ** 2).sum(-1).mean()

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The score at noise level ``sigma``, which must be one of the ladder's levels."""
        matches = torch.isclose(self.sigmas.cpu(), torch.tensor(float(sigma)), rtol=1e-5).nonzero()
        if len(matches) == 0:
            raise ValueError(f"sigma={sigma} is not one of this model's noise levels")
        level = torch.full((x.shape[0],), int(matches[0]), device=x.device)
        return -self.net(x.float(), level).to(x.dtype) / float(sigma)
