"""The exponential moving average of a network's weights that every lesson samples with (lesson 03, lesson 07).

Polyak and Juditsky (1992) averaged the iterates of stochastic gradient descent; diffusion models keep an
exponential average, θ_ema ← d θ_ema + (1 − d) θ, and sample with it: the raw weights jitter with every
noisy step, the average does not (Ho et al. 2020 use d = 0.9999; the course's short runs use 0.999).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An exponential moving average of a model's weights: θ_ema ← d θ_ema + (1 − d) θ (Polyak averaging).

    ``ema.model`` is a full copy of the network that holds the averaged weights; sample with it.
    Early on the decay is warmed up as min(d, (1 + n)/(10 + n)) so that the average is not stuck
    on the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._weight: torch.Tensor | None = None

    def advance(self) -> None:
        """Count one update and set this update's blend weight 1 − decay (a device tensor a CUDA graph can read)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        where = next(self.model.parameters()).device
        if self._weight is None or self._weight.device != where:
            self._weight = torch.zeros((), device=where)
        self._weight.fill_(1.0 - decay)

    @torch.no_grad()
    def blend(self, model: nn.Module) -> None:
        """θ_ema ← θ_ema + (1 − d)(θ − θ_ema) with the weight set by :meth:`advance`; buffers are copied."""
        averaged = list(self.model.parameters())
        # fused calls over all tensors instead of a loop: on a GPU each loop step would be a kernel launch
        step = torch._foreach_sub([p.detach() for p in model.parameters()], averaged)
        torch._foreach_mul_(step, self._weight)
        torch._foreach_add_(averaged, step)
        for averaged_buffer, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged_buffer.copy_(current)

    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average (:meth:`advance` then :meth:`blend`)."""
        self.advance()
        self.blend(model)
