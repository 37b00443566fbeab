"""Lesson 11: the autoencoder's KL term and latent scale, reconstructions, latent vs pixel cost, the pipeline."""

import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import minidiff
from minidiff.attributes import caption_report
from minidiff.autoencoder import (
    Autoencoder,
    autoencoder_loss,
    fit_latent_scale,
    gaussian_kl_to_standard,
    reconstruction_error,
)
from minidiff.data import CaptionedDigits
from minidiff.pipeline import TextToImage
from minidiff.schedules import NoiseSchedule
from minidiff.text import TextConditionedUNet, TextUNetConfig, tokenize
from minidiff.text_recipes import LATENT_UNET


@pytest.fixture(scope="module")
def pipeline() -> TextToImage:
    return TextToImage.pretrained(device="cpu")


def test_kl_to_the_standard_normal_matches_monte_carlo() -> None:
    mean = torch.tensor([0.0, 2.0, -0.5, 0.1], dtype=torch.float64)
    log_var = torch.tensor([0.0, 1.0, -2.0, -6.0], dtype=torch.float64)
    z = mean + (0.5 * log_var).exp() * torch.randn(500_000, 4, generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.float64)
    log_ratio = (-0.5 * (z - mean) ** 2 / log_var.exp() - 0.5 * log_var) - (-0.5 * z**2)  # the 2π terms cancel
    standard_error = log_ratio.std(0) / math.sqrt(len(z))
    assert ((gaussian_kl_to_standard(mean, log_var) - log_ratio.mean(0)).abs() < 4 * standard_error + 1e-4).all()


def test_the_shipped_latent_scale_gives_unit_variance_on_heldout_scenes() -> None:
    autoencoder = minidiff.pretrained("autoencoder", device="cpu")
    images, _, _ = CaptionedDigits("heldout").batch(400, torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = autoencoder.encode(images, torch.Generator().manual_seed(2), sample=True)
    assert latents.shape == (400, 4, 8, 8)
    assert abs(latents.std().item() - 1.0) < 0.05 and abs(latents.mean().item()) < 0.1


def test_fit_latent_scale_sets_the_scale_that_makes_the_latents_unit_variance() -> None:
    torch.manual_seed(0)
    autoencoder = Autoencoder(width=16)
    images, _, _ = CaptionedDigits("train").batch(64, torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = autoencoder.encode(images, torch.Generator().manual_seed(4), sample=True).std().item()
        scale = fit_latent_scale(autoencoder, images, torch.Generator().manual_seed(4))
        assert scale == pytest.approx(1 / raw, rel=1e-5)
        scaled = autoencoder.encode(images, torch.Generator().manual_seed(4), sample=True)
        assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
        # decode undoes the scale: decode(encode(x)) does not depend on it
        before = autoencoder(images)
        autoencoder.latent_scale.fill_(7.0)
        assert torch.allclose(autoencoder(images), before, atol=1e-5)


def test_reconstructions_are_close_and_stay_readable() -> None:
    autoencoder = minidiff.pretrained("autoencoder", device="cpu")
    judge = minidiff.pretrained("attribute_judge", device="cpu")
    images, _, scenes = CaptionedDigits("heldout", exclude_heldout_pairs=False).batch(300,
                                                                                     torch.Generator().manual_seed(5))
    assert reconstruction_error(autoencoder, images) < 0.05
    with torch.no_grad():
        rebuilt = autoencoder(images)
    assert caption_report(judge, rebuilt, scenes).caption_accuracy > 0.93
    # and the error is measured, not assumed: against the wrong originals the reconstructions are far off
    mismatched = ((rebuilt - images.roll(1, 0)) ** 2).mean().sqrt().item()
    assert mismatched > 5 * reconstruction_error(autoencoder, images)


def test_the_loss_is_l1_plus_beta_kl_per_pixel_value() -> None:
    torch.manual_seed(0)
    autoencoder = Autoencoder(width=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, log_var = autoencoder.posterior(x)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
        z = mean + (0.5 * log_var).exp() * noise
        l1 = (x - autoencoder.decoder(z)).abs().flatten(1).sum(1)
        kl = gaussian_kl_to_standard(mean, log_var).flatten(1).sum(1)
        expected = ((l1 + 0.5 * kl) / 3072).mean()
        got = autoencoder_loss(autoencoder, x, 0.5, torch.Generator().manual_seed(9))
    assert torch.allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="kl_weight"):
        autoencoder_loss(autoencoder, x, -1.0)


def test_a_latent_denoiser_call_costs_far_fewer_operations_than_a_pixel_one() -> None:
    pixel, latent = TextConditionedUNet(), TextConditionedUNet(TextUNetConfig(unet=LATENT_UNET))
    tokens = tokenize(["a red 3"])
    counts = []
    for model, shape in ((pixel, (3, 32, 32)), (latent, (4, 8, 8))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *shape), torch.tensor([500]), tokens)
        counts.append(counter.get_total_flops())
    assert counts[1] < 0.5 * counts[0]


def test_the_pipeline_is_deterministic_for_a_seed_and_draws_the_caption(pipeline: TextToImage) -> None:
    captions = ["a red 3 on the left", "a blue 7 on the right", "a green 0 on the left", "a yellow 8 on the right"]
    start = time.perf_counter()
    first = pipeline(captions, seed=3, steps=20)
    seconds = time.perf_counter() - start
    assert first.shape == (4, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, pipeline(captions, seed=3, steps=20))
    assert not torch.equal(first, pipeline(captions, seed=4, steps=20))
    judge = minidiff.pretrained("attribute_judge", device="cpu")
    scenes = CaptionedDigits("heldout", two_object_share=0.0).sample_scenes(12, torch.Generator().manual_seed(6))
    drawn = pipeline([s.caption() for s in scenes], seed=0, steps=20)
    assert caption_report(judge, drawn, scenes).caption_accuracy >= 0.75
    assert seconds < 30  # four captions on a CPU; the lesson reports the measured time


def test_the_pipeline_refuses_bad_requests(pipeline: TextToImage) -> None:
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        pipeline("a purple 3")
    for steps in (0, 1.5, 1001):
        with pytest.raises(ValueError, match="steps must be an int"):
            pipeline("a red 3", steps=steps)
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            pipeline("a red 3", scale=scale)
    with pytest.raises(ValueError, match="seed must be an int"):
        pipeline("a red 3", seed=-2)
    with pytest.raises(ValueError, match="not trained together"):
        TextToImage(pipeline.denoiser, Autoencoder(latent_channels=3), NoiseSchedule.linear(1000))
