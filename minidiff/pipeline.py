"""The course's finale (lesson 11): a tiny text-to-image model, caption in, picture out, on a laptop.

Every stage is a lesson: the caption is tokenised (10), read by the text encoder (10) inside a denoiser of
latents (11) that classifier-free guidance steers (09) while DDIM walks from noise to a latent (08, 01–03),
and the autoencoder's decoder turns that latent into pixels (11).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minidiff.autoencoder import Autoencoder
from minidiff.guidance import classifier_free_guidance
from minidiff.runtime import standard_normal
from minidiff.samplers import ddim_sample
from minidiff.schedules import NoiseSchedule
from minidiff.text import TextConditionedUNet, tokenize
from minidiff.weights import pretrained, schedule_from_card


def check_seed_and_steps(seed: int, steps: int, T: int) -> None:
    """Refuse, naming the argument, a ``seed`` that is not an int >= 0 or ``steps`` not an int in 1..``T``
    (a text-to-image pipeline's two integer arguments; bools are refused although Python counts them as ints)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..{T}, got {steps!r}")


class TextToImage:
    """caption → tokens → text encoder → latent DDIM with classifier-free guidance → decoder → image.

    Args:
        denoiser: a :class:`~minidiff.text.TextConditionedUNet` trained on the autoencoder's scaled latents.
        autoencoder: the :class:`~minidiff.autoencoder.Autoencoder` whose latents the denoiser learned.
        schedule: the denoiser's noise schedule.
    """

    def __init__(self, denoiser: TextConditionedUNet, autoencoder: Autoencoder, schedule: NoiseSchedule) -> None:
        unet = denoiser.config.unet
        if unet.in_channels != autoencoder.config.latent_channels:
            raise ValueError(f"the denoiser works on {unet.in_channels} channels but the autoencoder's latents "
                             f"have {autoencoder.config.latent_channels}: they were not trained together")
        self.denoiser, self.autoencoder, self.schedule = denoiser.eval(), autoencoder.eval(), schedule
        self.latent_shape = (unet.in_channels, unet.image_size, unet.image_size)

    @classmethod
    def pretrained(cls, device: torch.device | str | None = None, directory: str | Path | None = None) -> TextToImage:
        """The shipped ``latent_text_digits`` denoiser with the ``autoencoder`` it was trained on."""
        denoiser = pretrained("latent_text_digits", device, directory)
        return cls(denoiser, pretrained("autoencoder", device, directory), schedule_from_card(denoiser.card))

    @torch.no_grad()
    def __call__(self, captions: str | Sequence[str], seed: int = 0, steps: int = 20,
                 scale: float = 3.0) -> torch.Tensor:
        """Images [N, 3, 32, 32] in [−1, 1] for ``captions``; the same seed gives the same images."""
        check_seed_and_steps(seed, steps, self.schedule.T)
        if not (isinstance(scale, int | float) and scale >= 0 and scale == scale and scale != float("inf")):
            raise ValueError(f"scale must be a finite number >= 0 (0: ignore the caption), got {scale!r}")
        where = next(self.denoiser.parameters()).device
        # words → ids; an unknown word is an error (lesson 10); an adapter's new words are known (lesson 13)
        tokens = tokenize(captions, vocabulary=self.denoiser.vocabulary).to(where)
        noise = standard_normal((len(tokens), *self.latent_shape), torch.Generator().manual_seed(seed), where)
        guided = classifier_free_guidance(self.denoiser, tokens, scale)  # ε(∅) + s (ε(caption) − ε(∅))
        latents = ddim_sample(guided, self.schedule, noise, steps=steps)  # noise → latent, η = 0
        return self.autoencoder.decode(latents).clamp(-1.0, 1.0).cpu()  # latent → pixels
