"""Lesson 09: classifier and classifier-free guidance, checked exactly on a labelled 2D mixture."""

import pytest
import torch

import minidiff
from minidiff.data import load_mnist
from minidiff.guidance import (
    classifier_free_guidance,
    classifier_guidance,
    ho_salimans_w_from_scale,
    scale_from_ho_salimans_w,
)
from minidiff.metrics import judge_accuracy, within_class_spread
from minidiff.oracles import class_conditional_mixture, mixture_guidance_oracles, mixture_noisy_classifier
from minidiff.runtime import standard_normal
from minidiff.samplers import ddim_sample, ddpm_sample
from minidiff.schedules import NoiseSchedule
from minidiff.toys import GaussianMixture
from minidiff.weights import schedule_from_card

MEANS = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
MIXTURE = GaussianMixture(torch.tensor([0.5, 0.5], dtype=torch.float64), MEANS,
                          0.6**2 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
LABELS = torch.tensor([0, 1])
SCHEDULE = NoiseSchedule.cosine(200)


class ExactConditionalModel(torch.nn.Module):
    """ε(x, t, y) of the labelled mixture, with class 2 as the null class: the ideal CFG-trained network."""

    null_class = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        unconditional, conditional = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
        out = torch.empty_like(x)
        for label in y.unique().tolist():
            rows = y == label
            model = unconditional if label == self.null_class else conditional(label)
            out[rows] = model(x[rows], t[rows])
        return out


def probe_points() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    return x, torch.full((64,), 60)


def test_scale_conventions_convert_both_ways() -> None:
    assert scale_from_ho_salimans_w(0.0) == 1.0 and ho_salimans_w_from_scale(1.0) == 0.0
    assert ho_salimans_w_from_scale(scale_from_ho_salimans_w(2.5)) == 2.5


def test_exact_classifier_free_equals_exact_classifier_guidance_at_every_scale() -> None:
    x, t = probe_points()
    unconditional, _ = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
    classifier = mixture_noisy_classifier(MIXTURE, LABELS, SCHEDULE)
    for scale in (0.0, 0.5, 1.0, 3.0, 7.0):
        free = classifier_free_guidance(ExactConditionalModel(), 1, scale)(x, t)
        with_classifier = classifier_guidance(unconditional, classifier, SCHEDULE, 1, scale)(x, t)
        assert torch.allclose(free, with_classifier, atol=1e-6), scale


def test_scale_one_gives_the_conditional_and_zero_the_unconditional_model() -> None:
    """Independent of the guidance code: the exact ε of p(x | y) comes from the class's own components."""
    x, t = probe_points()
    unconditional, conditional = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
    classifier = mixture_noisy_classifier(MIXTURE, LABELS, SCHEDULE)
    for label in (0, 1):
        assert torch.allclose(classifier_guidance(unconditional, classifier, SCHEDULE, label, 1.0)(x, t),
                              conditional(label)(x, t), atol=1e-6)
        assert torch.allclose(classifier_free_guidance(ExactConditionalModel(), label, 1.0)(x, t),
                              conditional(label)(x, t), atol=1e-10)
    assert torch.allclose(classifier_guidance(unconditional, classifier, SCHEDULE, 1, 0.0)(x, t), unconditional(x, t))
    # a wrong sign or a missing √(1 − ᾱ) would break the scale-1 identity above: show that the check sees it
    flipped = classifier_guidance(unconditional, classifier, SCHEDULE, 1, 1.0)(x, t)
    assert not torch.allclose(2 * unconditional(x, t) - flipped, conditional(1)(x, t), atol=1e-3)


def test_guided_sampling_at_scale_one_samples_the_class() -> None:
    unconditional, _ = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
    classifier = mixture_noisy_classifier(MIXTURE, LABELS, SCHEDULE)
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    samples = ddpm_sample(classifier_guidance(unconditional, classifier, SCHEDULE, 1, 1.0), SCHEDULE, x_T=x_T,
                          generator=generator)
    target = class_conditional_mixture(MIXTURE, LABELS, 1)
    assert torch.allclose(samples.mean(0), target.means[0], atol=0.04)
    assert torch.allclose(samples.std(0), torch.tensor([0.6, 0.6], dtype=torch.float64), atol=0.03)
    free = ddim_sample(classifier_free_guidance(ExactConditionalModel(), 0, 1.0), SCHEDULE, x_T=x_T, steps=100)
    assert torch.allclose(free.mean(0), class_conditional_mixture(MIXTURE, LABELS, 0).means[0], atol=0.04)


def tilted_mean(gamma: float, label: int) -> torch.Tensor:
    """Mean of p(x) p(y | x)^γ, normalised on a grid (independent of any sampler)."""
    axis = torch.linspace(-6, 6, 481, dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], 1)
    log_density = MIXTURE.log_prob(points) + gamma * MIXTURE.responsibilities(points)[:, label].log()
    weights = torch.softmax(log_density, 0)
    return (weights[:, None] * points).sum(0)


def exact_guidance_setup(seed: int, count: int):
    """Classifier guidance of class 1 with the exact oracles (as a function of γ), a generator and x_T."""
    unconditional, _ = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
    classifier = mixture_noisy_classifier(MIXTURE, LABELS, SCHEDULE)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(count, 2, generator=generator, dtype=torch.float64)
    return (lambda gamma: classifier_guidance(unconditional, classifier, SCHEDULE, 1, gamma)), generator, x_T


def test_strong_guidance_does_not_sample_the_tilted_density() -> None:
    """At γ = 1 guided samples match p(x | y); at γ = 3 they land far past the tilted density's mean."""
    guided, generator, x_T = exact_guidance_setup(seed=2, count=6000)
    gaps = {}
    for gamma in (1.0, 3.0):
        samples = ddpm_sample(guided(gamma), SCHEDULE, x_T=x_T, generator=generator)
        gaps[gamma] = (samples.mean(0)[0] - tilted_mean(gamma, 1)[0]).item()
    standard_error = 0.6 / 6000**0.5
    assert abs(gaps[1.0]) < 5 * standard_error, gaps
    assert gaps[3.0] > 0.15, gaps  # measured 0.23: guidance overshoots the tilted density


def test_strong_guidance_depends_on_the_sampler() -> None:
    """For a true score, DDPM and deterministic DDIM over all T steps sample the same distribution: they agree at
    γ = 1. The guided ε at γ = 3 is not the score of one diffusion, so the two samplers land apart (measured
    means 1.34 and 1.63 with 20,000 samples), far beyond their standard errors."""
    guided, generator, x_T = exact_guidance_setup(seed=3, count=4000)
    gaps = {}
    for gamma in (1.0, 3.0):
        stochastic = ddpm_sample(guided(gamma), SCHEDULE, x_T=x_T, generator=generator)
        deterministic = ddim_sample(guided(gamma), SCHEDULE, x_T=x_T, steps=SCHEDULE.T)
        gaps[gamma] = (deterministic.mean(0)[0] - stochastic.mean(0)[0]).item()
    standard_error = (2 * 0.6**2 / 4000) ** 0.5
    assert abs(gaps[1.0]) < 5 * standard_error, gaps
    assert gaps[3.0] > 0.2, gaps


def test_guidance_rejects_bad_arguments() -> None:
    unconditional, _ = mixture_guidance_oracles(MIXTURE, LABELS, SCHEDULE)
    classifier = mixture_noisy_classifier(MIXTURE, LABELS, SCHEDULE)
    x, t = probe_points()
    with pytest.raises(ValueError, match="scale must be >= 0"):
        classifier_free_guidance(ExactConditionalModel(), 1, -1.0)
    with pytest.raises(ValueError, match="null class"):
        classifier_free_guidance(torch.nn.Linear(2, 2), 1, 2.0)
    with pytest.raises(ValueError, match="labels must be"):
        classifier_guidance(unconditional, classifier, SCHEDULE, torch.tensor([0, 1]), 2.0)(x, t)
    with pytest.raises(ValueError, match="one class per component"):
        mixture_noisy_classifier(MIXTURE, torch.tensor([0, 1, 1]), SCHEDULE)


def test_shipped_conditional_model_draws_the_requested_digits() -> None:
    """The shipped mnist_cond with classifier-free guidance at scale 2: the judge reads the requested class."""
    model = minidiff.pretrained("mnist_cond", device="cpu")
    judge = minidiff.pretrained("judge", device="cpu")
    requested = torch.arange(20) % 10
    x_T = standard_normal((20, 1, 28, 28), torch.Generator().manual_seed(0))
    samples = ddim_sample(classifier_free_guidance(model, requested, 2.0), schedule_from_card(model.card), x_T,
                          steps=20)
    assert judge_accuracy(judge, samples, requested) >= 0.9


def test_within_class_spread_drops_for_copies() -> None:
    judge = minidiff.pretrained("judge", device="cpu")
    images, labels = load_mnist("heldout")
    real = within_class_spread(judge, images[:300], labels[:300])
    copies = within_class_spread(judge, images[:1].repeat(10, 1, 1, 1), labels[:1].repeat(10))
    assert real > 0 and copies < 1e-6 * real
