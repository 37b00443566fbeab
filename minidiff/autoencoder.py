"""Perceptual compression (lesson 11): a small KL-regularised autoencoder, the first stage of latent diffusion.

Rombach et al. (2022) split image generation in two. An autoencoder removes the imperceptible detail once
and for all, mapping a 3×32×32 image to a 4×8×8 latent (f = 4, 12 times fewer numbers); a diffusion model
then learns the semantics in that small space. The encoder outputs a diagonal Gaussian q(z | x) = N(μ, σ²);
training minimises

    L = E_q ‖x − D(z)‖₁ + β · KL(q(z | x) ‖ N(0, I))                                  (lesson 11, eq. 1)

with a small β: the KL term only keeps the latent space tame (no arbitrarily large or sharp codes), it is not a
VAE's full prior. The latents are then multiplied by a scale factor measured on data so that they have unit
variance, the range the diffusion schedules of lessons 01–10 assume (LDM's "scale_factor").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minidiff.runtime import randn_like


def gaussian_kl_to_standard(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²) elementwise (lesson 11, eq. 2; lesson 02's KL with
    the second Gaussian standard)."""
    return 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var)


class _Block(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, with a skip (lesson 06's residual block without the time embedding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                    nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything that builds an :class:`Autoencoder`: image channels, latent channels, width, downsamplings."""

    in_channels: int = 3
    latent_channels: int = 4
    width: int = 64
    downsamplings: int = 2


class Autoencoder(nn.Module):
    """x [B, 3, 32, 32] ↔ z [B, 4, 8, 8]: a convolutional encoder to a diagonal Gaussian, and a decoder.

    ``latent_scale`` (a buffer, saved with the weights) multiplies the latents so that they have unit variance
    on the training data; :meth:`encode` returns scaled latents and :meth:`decode` expects them.
    """

    def __init__(self, config: AutoencoderConfig | None = None, **fields: Any) -> None:
        super().__init__()
        self.config = config = replace(config or AutoencoderConfig(), **fields)
        width = config.width
        encoder: list[nn.Module] = [nn.Conv2d(config.in_channels, width, 3, padding=1), _Block(width)]
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1), _Block(width)]
        for _ in range(config.downsamplings):
            encoder += [nn.Conv2d(width, width, 3, stride=2, padding=1), _Block(width)]
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1),
                        _Block(width)]
        encoder += [nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 2 * config.latent_channels, 3, padding=1)]
        decoder += [nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, config.in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x) as (mean, log-variance), each [B, latent_channels, H/f, W/f], in unscaled latent units."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must have shape [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2**self.config.downsamplings
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"image sides must be divisible by {factor}, got {tuple(x.shape[2:])}")
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite early in training

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Scaled latents of ``x``: the posterior mean (or a sample of q(z | x)) times ``latent_scale``."""
        mean, log_var = self.posterior(x)
        z = mean + (0.5 * log_var).exp() * randn_like(mean, generator) if sample else mean
        return z * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from scaled latents ``z``."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must have shape [B, {self.config.latent_channels}, h, w], got {tuple(z.shape)}")
        return self.decoder(z / self.latent_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) with the posterior mean: the reconstruction."""
        return self.decode(self.encode(x))


def autoencoder_loss(autoencoder: Autoencoder, x: torch.Tensor, kl_weight: float = 1e-3,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Lesson 11, eq. 1 per image, divided by the number of pixel values: (‖x − D(z)‖₁ + β KL) / (C·H·W),
    with z ~ q(z | x) by reparameterisation (Kingma & Welling 2014)."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    mean, log_var = autoencoder.posterior(x)
    z = mean + (0.5 * log_var).exp() * randn_like(mean, generator)
    reconstruction = autoencoder.decoder(z)
    per_image = (x - reconstruction).abs().flatten(1).sum(1) + kl_weight * gaussian_kl_to_standard(
        mean, log_var).flatten(1).sum(1)
    return per_image.mean() / x[0].numel()


@torch.no_grad()
def encode_pool(autoencoder: Autoencoder, images: torch.Tensor, generator: torch.Generator | None = None,
                batch_size: int = 5000) -> torch.Tensor:
    """Sampled, scaled latents of a whole pool of ``images``, encoded once in batches of ``batch_size`` on the
    autoencoder's device (lesson 11: a latent model's training never sees a pixel)."""
    where = autoencoder.latent_scale.device
    return torch.cat([autoencoder.encode(images[i:i + batch_size].to(where), generator, sample=True)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def fit_latent_scale(autoencoder: Autoencoder, images: torch.Tensor, generator: torch.Generator | None = None,
                     batch_size: int = 1000) -> float:
    """Set ``latent_scale`` = 1 / std of sampled latents of ``images`` (Rombach et al. 2022, §G) and return it."""
    autoencoder.latent_scale.fill_(1.0)
    scale = 1.0 / encode_pool(autoencoder, images, generator, batch_size).float().std().item()
    autoencoder.latent_scale.fill_(scale)
    return scale


@torch.no_grad()
def reconstruction_error(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Root-mean-square error of decode(encode(x)) over ``images``, in the [−1, 1] pixel units."""
    where = autoencoder.latent_scale.device
    total = sum(F.mse_loss(autoencoder(images[i:i + batch_size].to(where)), images[i:i + batch_size].to(where),
                           reduction="sum").item() for i in range(0, len(images), batch_size))
    return (total / images.numel()) ** 0.5
