"""The training loop every lesson uses, and the DDPM loss (lesson 03, Algorithm 1).

``fit`` is deliberately plain: sample a batch, compute a loss, step AdamW, update an EMA copy of the
weights. What it adds over a bare loop is what a notebook needs: a progress bar with the loss, a loss
history, a clear stop on a non-finite loss, and Ctrl-C / "interrupt kernel" keeping the weights
trained so far.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.runtime import device as default_device
from minidiff.runtime import randn_like
from minidiff.schedules import NoiseSchedule

Batch = Any


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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach(), 1.0 - decay)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)


@dataclass
class TrainResult:
    """What ``fit`` returns: the loss of every step, the EMA model, and how the run ended."""

    losses: list[float] = field(default_factory=list)
    ema: EMA | None = None
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def steps(self) -> int:
        """Number of optimisation steps taken."""
        return len(self.losses)

    def smoothed_losses(self, window: int = 50) -> list[float]:
        """Running mean of the loss over ``window`` steps (for plotting)."""
        out, total = [], 0.0
        for index, loss in enumerate(self.losses):
            total += loss - (self.losses[index - window] if index >= window else 0.0)
            out.append(total / min(index + 1, window))
        return out


def _to_device(batch: Batch, target: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(target, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(item, target) for item in batch)
    return batch


def fit(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], next_batch: Callable[[], Batch],
        steps: int, lr: float = 1e-3, weight_decay: float = 0.0, ema_decay: float | None = 0.999,
        grad_clip: float | None = 1.0, device: torch.device | None = None, bf16: bool = False,
        progress: bool = True, warmup_steps: int = 0, cosine_decay: bool = False,
        result: TrainResult | None = None) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on ``loss_fn(model, next_batch())``.

    Args:
        next_batch: returns one batch (tensors are moved to the device here).
        ema_decay: keep an EMA of the weights with this decay (None: no EMA).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        bf16: autocast the forward pass to bfloat16 (CUDA only; ignored elsewhere).
        warmup_steps, cosine_decay: a linear warm-up, then optionally a cosine decay of the learning rate to 0.
        result: continue a previous run (its loss history and EMA are extended).

    Interrupting (Ctrl-C, or "interrupt the kernel" in Jupyter) stops cleanly: the model keeps the
    weights trained so far and the result says ``interrupted=True``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    target = device or default_device()
    model.to(target).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cosine_decay:
            progress_fraction = (step - warmup_steps) / max(1, steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * progress_fraction))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    result = result or TrainResult()
    if ema_decay is not None and result.ema is None:
        result.ema = EMA(model, ema_decay)
    if result.ema is not None:
        result.ema.model.to(target)
    use_bf16 = bf16 and target.type == "cuda"
    start = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="training", leave=True)
    try:
        for step in bar:
            batch = _to_device(next_batch(), target)
            with torch.autocast(device_type=target.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"the loss became {loss_value} at step {result.steps}: training diverged. Lower the learning "
                    f"rate (now {lr}), keep gradient clipping on, or check the data for NaNs.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            if result.ema is not None:
                result.ema.update(model)
            result.losses.append(loss_value)
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(result.losses[-25:]) / len(result.losses[-25:]):.4f}")
    except KeyboardInterrupt:
        result.interrupted = True
        print(f"training interrupted after {result.steps} steps: the model keeps the weights trained so far")
    finally:
        bar.close()
        result.seconds += time.perf_counter() - start
        model.eval()
    return result


def ddpm_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
              generator: torch.Generator | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1 of Ho et al. (2020): L_simple = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², t ~ U{1..T}.

    The mean over every dimension is used (a constant factor away from the sum in the paper). ``t`` and
    ``noise`` are drawn here unless given (giving them makes the loss deterministic, e.g. to check it).
    """
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator, device=x0.device)
    if noise is None:
        noise = randn_like(x0, generator)
    prediction = model(schedule.q_sample(x0, t, noise), t)
    return ((noise - prediction.float()) ** 2).mean()


def random_rows(data: torch.Tensor, batch_size: int,
                generator: torch.Generator | None = None) -> Callable[[], torch.Tensor]:
    """A ``next_batch`` for ``fit``: each call returns ``batch_size`` rows of ``data`` drawn with replacement."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def next_batch() -> torch.Tensor:
        index = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        return data[index.to(data.device)]

    return next_batch
