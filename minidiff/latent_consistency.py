"""Latent consistency models: lesson 11's text-to-image model in one to four calls (lesson 12, section 6).

A latent consistency model (LCM; Luo, Tan, Huang, Li & Zhao 2023) is consistency distillation (lesson 12,
section 4) with three changes, each a lesson of this course:

* it runs on the autoencoder's latents (lesson 11), so the student never sees a pixel;
* the teacher's ODE is the *guided* one (lesson 09): the step that makes the target uses
  ε̂ = ε(∅) + s (ε(c) − ε(∅)), so the student learns in one call what guided DDIM does in many;
* the student is conditioned on the caption (lesson 10), which its network reads exactly as the teacher does.

LCM-LoRA (Luo et al. 2023b) trains the student as a low-rank adapter of the teacher (lesson 13): the few-step
sampler is then a file of a few hundred kilobytes that switches the shipped model into a few-step one.

Notation as in :mod:`minidiff.distill`; the guidance scale s is lesson 09's (s = 1 + ω for Luo et al.'s ω).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff.autoencoder import Autoencoder
from minidiff.distill import Student, TargetNetwork, X0Model, consistency_loss, consistency_sample, x0_from_eps_model
from minidiff.guidance import classifier_free_guidance
from minidiff.pipeline import check_seed_and_steps
from minidiff.runtime import check_number, standard_normal
from minidiff.schedules import NoiseSchedule
from minidiff.text import tokenize

#: The settings of the shipped LCM-LoRA: lesson 11's guidance scale, lesson 12's 32-step grid and target decay.
LCM_SPEC: dict[str, Any] = {"scale": 3.0, "boundaries": 32, "target_decay": 0.95, "rank": 4}


def guided_teacher_x0(teacher: nn.Module, tokens: torch.Tensor, scale: float, schedule: NoiseSchedule) -> X0Model:
    """x̂_0 of the guided teacher for these captions: x̂_0 = (x_t − σ_t ε̂)/α_t with
    ε̂ = ε(x_t, t, ∅) + s (ε(x_t, t, c) − ε(x_t, t, ∅)) (lesson 09, eq. 4; lesson 12, eq. 9).

    A DDIM step is affine in ε̂, so one step with the guided ε̂ equals Luo et al.'s
    x̂ = x + (1 + ω) Φ(x, c) − ω Φ(x, ∅) (their eq. 9, Φ the step's increment) with s = 1 + ω; a test checks it.
    """
    check_number("scale", scale, 0.0)
    return x0_from_eps_model(classifier_free_guidance(teacher, tokens, scale), schedule)


def latent_consistency_loss(student: Student, target: TargetNetwork, teacher: nn.Module, schedule: NoiseSchedule,
                            latents: torch.Tensor, tokens: torch.Tensor, scale: float = LCM_SPEC["scale"],
                            boundaries: int = LCM_SPEC["boundaries"], huber_c: float | None = None) -> torch.Tensor:
    """One batch of latent consistency distillation (Luo et al. 2023, Algorithm 1; lesson 12, eq. 10):

    d(f_θ(z_{t_{n+1}}, t_{n+1}, c), f_θ⁻(ẑ_{t_n}, t_n, c)), with ẑ_{t_n} one DDIM step of the teacher guided at
    ``scale`` for caption c, on :func:`~minidiff.distill.student_grid` of ``boundaries`` steps.

    ``latents`` are the autoencoder's scaled latents; ``tokens`` their captions, one row each. Apart from the
    guided teacher and the condition, this is :func:`~minidiff.distill.consistency_loss` unchanged.
    """
    if tokens.shape[0] != latents.shape[0]:
        raise ValueError(f"tokens must have one row per latent ({latents.shape[0]}), got {tuple(tokens.shape)}")
    return consistency_loss(student, target, schedule, latents, boundaries,
                            guided_teacher_x0(teacher, tokens, scale, schedule), huber_c, condition=tokens)


class FewStepTextToImage:
    """caption → tokens → a latent consistency student (1–4 calls) → decoder → image: lesson 11's pipeline with
    its 50 guided DDIM steps (100 network calls) replaced by multistep consistency sampling.

    Args:
        student: a :class:`~minidiff.distill.Student` around a text-conditioned denoiser of the autoencoder's latents.
        autoencoder: the autoencoder whose latents the student's teacher learned.
    """

    def __init__(self, student: Student, autoencoder: Autoencoder) -> None:
        unet = student.net.config.unet
        if unet.in_channels != autoencoder.config.latent_channels:
            raise ValueError(f"the student works on {unet.in_channels} channels but the autoencoder's latents "
                             f"have {autoencoder.config.latent_channels}: they were not trained together")
        self.student, self.autoencoder = student.eval(), autoencoder.eval()
        self.latent_shape = (unet.in_channels, unet.image_size, unet.image_size)

    @torch.no_grad()
    def __call__(self, captions: str | Sequence[str], seed: int = 0, steps: int = 2) -> torch.Tensor:
        """Images [N, 3, 32, 32] in [−1, 1] for ``captions`` in ``steps`` network calls; a seed fixes them."""
        check_seed_and_steps(seed, steps, self.student.schedule.T)
        where = next(self.student.parameters()).device
        tokens = tokenize(captions, vocabulary=self.student.net.vocabulary).to(where)
        generator = torch.Generator().manual_seed(seed)
        noise = standard_normal((len(tokens), *self.latent_shape), generator, where)
        # the re-noising between calls comes from the same seed (on the device, as the samplers draw it)
        renoise = torch.Generator(where).manual_seed(seed + 1)
        latents = consistency_sample(self.student, self.student.schedule, noise, steps=steps, generator=renoise,
                                     condition=tokens)
        return self.autoencoder.decode(latents).clamp(-1.0, 1.0).cpu()


def load_latent_consistency(adapter: str | Path = "lcm_lora", device: torch.device | str | None = None,
                            directory: str | Path | None = None) -> FewStepTextToImage:
    """The shipped LCM-LoRA on lesson 11's ``latent_text_digits`` (both checked by sha256), as a few-step pipeline.

    ``directory`` is where the base model and autoencoder come from (default: the shipped ones); ``adapter`` a
    shipped adapter's name or a ``.safetensors`` path a recipe wrote.
    """
    from minidiff.lora import load_adapter  # lora and weights import the networks; keep this module light
    from minidiff.weights import pretrained, schedule_from_card

    base = pretrained("latent_text_digits", device, directory)
    load_adapter(base, adapter)
    spec = base.adapter_card.get("student")
    if not spec or spec.get("kind") != "latent_consistency":
        raise ValueError(f"adapter {adapter!r} is not a latent consistency student (its card has no "
                         "'student': {'kind': 'latent_consistency'} entry)")
    student = Student(base, schedule_from_card(base.card), spec["sigma_data"]).to(next(base.parameters()).device)
    student.card = base.adapter_card
    return FewStepTextToImage(student.eval(), pretrained("autoencoder", device, directory))
