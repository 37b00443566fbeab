"""Denoising networks (lessons 03 and 06). This module: the time embedding and the 2D MLP denoiser."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Embed timesteps as [sin(t ω_k), cos(t ω_k)] with ω_k = max_period^(−k/(dim/2)) (Vaswani et al. 2017, §3.5).

    ``t`` is a 1-D tensor of (integer or real) timesteps; the result has shape [len(t), dim]. Low k
    turn quickly with t and separate neighbouring steps; high k turn slowly and give the coarse position.
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim}")
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLPDenoiser(nn.Module):
    """ε_θ(x_t, t) for low-dimensional data: a residual MLP with the time embedding added in every block.

    Args:
        data_dim: size of one example (2 for the toys).
        hidden: width of the hidden layers.
        num_blocks: residual blocks, each SiLU → Linear → SiLU → Linear.
        time_dim: size of the sinusoidal embedding of t before its own small MLP.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, num_blocks: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.data_dim, self.time_dim = data_dim, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(num_blocks))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` ([B, data_dim]) at timesteps ``t`` ([B], the schedule's t)."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}] (one timestep per example), got {tuple(t.shape)}")
        time = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h + time)
        return self.output(h)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
