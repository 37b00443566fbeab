"""Steering a sampler towards a class (lesson 09): classifier guidance and classifier-free guidance.

Both are *wrappers*: they take models and return a new ε-model ``eps(x_t, t)``, so every sampler of
lessons 03 and 08 accepts a guided model unchanged. The exact guidance of a labelled Gaussian mixture
(lesson 09, §4) is in :mod:`minidiff.oracles`.

Bayes' rule on scores (lesson 09, eq. 1): ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t). With the
ε ↔ score relation ε = −√(1 − ᾱ_t) ∇ log p(x_t), a guidance scale s gives

    classifier guidance:       ε̂ = ε(x_t) − s √(1 − ᾱ_t) ∇ log p_φ(y | x_t, t)      (Dhariwal & Nichol 2021)
    classifier-free guidance:  ε̂ = ε(x_t, ∅) + s (ε(x_t, y) − ε(x_t, ∅))            (Ho & Salimans 2022)

The two conventions for the scale, once and for all
---------------------------------------------------
minidiff's ``scale`` s multiplies the *whole* class term: s = 0 is unconditional, s = 1 is the plain
conditional model, s > 1 over-emphasises the class. Ho & Salimans write ε̂ = (1 + w) ε(x, y) − w ε(x, ∅),
so their w = s − 1 (their w = 0 is our s = 1). Diffusers' ``guidance_scale`` is our s. Convert with
:func:`scale_from_ho_salimans_w` and :func:`ho_salimans_w_from_scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from minidiff.contracts import EpsModel, NoisyClassifier
from minidiff.runtime import check_number
from minidiff.schedules import NoiseSchedule


def scale_from_ho_salimans_w(w: float) -> float:
    """Ho & Salimans' w (ε̂ = (1 + w) ε_c − w ε_u) as minidiff's scale s = 1 + w."""
    return 1.0 + w


def ho_salimans_w_from_scale(scale: float) -> float:
    """minidiff's scale s (ε̂ = ε_u + s (ε_c − ε_u)) as Ho & Salimans' w = s − 1."""
    return scale - 1.0


def _check_labels(labels: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Labels [B] (or one int for the whole batch), or any condition with one row per example ([B, L] tokens)."""
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape[0] != batch or labels.is_floating_point():
        raise ValueError(f"labels must be an int or an integer tensor with one row per example ([{batch}] class "
                         f"labels or [{batch}, L] caption tokens), got shape {tuple(labels.shape)} {labels.dtype}")
    return labels.long()


def classifier_free_guidance(model: nn.Module, labels: torch.Tensor | int, scale: float) -> EpsModel:
    """ε̂(x_t, t) = ε(x_t, t, ∅) + scale · (ε(x_t, t, y) − ε(x_t, t, ∅)) for a model with a null class.

    ``model(x, t, y)`` must accept ``y = model.null_class`` for "no label" (trained with label dropout,
    :func:`minidiff.train.conditional_ddpm_loss`). ``labels`` are class labels [B], or caption tokens [B, L] for
    a text-conditioned model (lesson 10), whose null caption is a row of ``null_class``. Both predictions come
    from one batched call.
    """
    check_number("scale", scale, 0.0)  # 0: unconditional, 1: conditional
    null_class = getattr(model, "null_class", None)
    if null_class is None:
        raise ValueError("classifier-free guidance needs a model with a null class (UNet(num_classes=...))")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = _check_labels(labels, x.shape[0], x.device)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        conditional, unconditional = both.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided


def classifier_log_likelihood_gradient(classifier: NoisyClassifier, x: torch.Tensor, t: torch.Tensor,
                                       labels: torch.Tensor) -> torch.Tensor:
    """∇_x log p(y | x_t, t) by autograd, with log p = log_softmax(classifier(x_t, t)) (works inside no_grad)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x, t).float(), dim=1)
        chosen = log_probs.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, x)
    return gradient


def classifier_guidance(eps_model: EpsModel, classifier: NoisyClassifier, schedule: NoiseSchedule,
                        labels: torch.Tensor | int, scale: float) -> EpsModel:
    """ε̂(x_t, t) = ε(x_t, t) − scale · √(1 − ᾱ_t) ∇ log p(y | x_t, t) (Dhariwal & Nichol 2021, Algorithm 2).

    ``classifier(x_t, t)`` must be trained on *noisy* inputs (lesson 09, §2): its gradient at x_t is only
    meaningful where it has seen data. The minus sign comes from ε = −√(1 − ᾱ_t) × score.
    """
    check_number("scale", scale, 0.0)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = _check_labels(labels, x.shape[0], x.device)
        eps = eps_model(x, t)
        if scale == 0:
            return eps
        gradient = classifier_log_likelihood_gradient(classifier, x, t, y).to(eps.dtype)
        noise_level = (1 - schedule.gather(schedule.alpha_bars, t, x)).sqrt()  # √(1 − ᾱ_t)
        return eps - scale * noise_level * gradient

    return guided
