"""Lesson 03: the MLP denoiser, the training loop, Algorithm 1 and Algorithm 2."""

import math

import pytest
import torch
from torch import nn

import minidiff
from minidiff.metrics import compare_to_data, mixture_log_likelihood
from minidiff.nets import MLPDenoiser, count_parameters, sinusoidal_embedding
from minidiff.oracles import GaussianData, mixture_eps_model
from minidiff.runtime import standard_normal
from minidiff.samplers import ddpm_sample
from minidiff.schedules import NoiseSchedule
from minidiff.toys import eight_gaussians_mixture, sample_toy, two_gaussians_mixture
from minidiff.train import EMA, ddpm_loss, fit, random_rows


def test_sinusoidal_embedding_values_and_errors() -> None:
    t = torch.tensor([0, 1, 500])
    embedding = sinusoidal_embedding(t, 8)
    assert embedding.shape == (3, 8)
    assert torch.allclose(embedding[1, 0], torch.sin(torch.tensor(1.0)))  # the fastest frequency is 1
    assert torch.allclose(embedding[2, 3], torch.sin(torch.tensor(500 * 10_000 ** (-3 / 4))))
    assert torch.allclose(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(t, 7)


def test_mlp_shapes_and_errors() -> None:
    model = MLPDenoiser(hidden=32, num_blocks=2)
    assert model(torch.zeros(5, 2), torch.arange(5)).shape == (5, 2)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        model(torch.zeros(5, 3), torch.arange(5))
    with pytest.raises(ValueError, match="one timestep per example"):
        model(torch.zeros(5, 2), torch.arange(4))


def test_ddpm_loss_of_the_exact_eps_model_is_the_irreducible_error() -> None:
    """For Gaussian data the optimal ε is known; its loss must match E Var[ε | x_t] computed analytically."""
    schedule = NoiseSchedule.linear(1000)
    data = GaussianData(schedule, mean=0.0, var=0.25)
    generator = torch.Generator().manual_seed(0)
    x0 = data.sample(200_000, dim=1, generator=generator)
    loss = ddpm_loss(lambda x, t: data.optimal_eps(x, t), schedule, x0, generator).item()
    # Var[ε | x_t] = 1 − (1 − ᾱ)/(ᾱ v + 1 − ᾱ) for Gaussian data; average over t uniform in 1..T
    a_bar = schedule.alpha_bars[1:]
    expected = (1 - (1 - a_bar) / (a_bar * 0.25 + 1 - a_bar)).mean().item()
    assert loss == pytest.approx(expected, rel=0.02)
    zero_loss = ddpm_loss(lambda x, t: torch.zeros_like(x), schedule, x0, generator).item()
    assert zero_loss == pytest.approx(1.0, rel=0.02) and loss < zero_loss


def test_fit_reduces_the_loss_and_keeps_an_ema() -> None:
    generator = minidiff.seed_everything(0)
    schedule = NoiseSchedule.linear(100, start=1e-3, end=0.2)  # the DDPM range rescaled to 100 steps
    data = sample_toy("two_moons", 4000, generator)
    model = MLPDenoiser(hidden=64, num_blocks=2)
    result = fit(model, lambda m, x: ddpm_loss(m, schedule, x), random_rows(data, 256, generator), steps=300,
                 lr=2e-3, progress=False, device=torch.device("cpu"))
    assert result.steps == 300 and not result.interrupted and result.seconds > 0
    assert sum(result.losses[-50:]) / 50 < 0.8 * sum(result.losses[:20]) / 20
    differences = [(a - b).abs().max().item() for a, b in
                   zip(result.ema.model.parameters(), model.parameters(), strict=True)]
    assert max(differences) > 0  # the EMA lags the raw weights
    assert len(result.smoothed_losses(10)) == 300


def test_ema_tracks_a_constant_exactly_and_averages_otherwise() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    ema = EMA(model, decay=0.5)
    nn.init.constant_(model.weight, 3.0)
    for _ in range(200):
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_fit_stops_on_a_non_finite_loss_with_a_clear_message() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(FloatingPointError, match=r"diverged.*learning rate"):
        fit(model, lambda m, x: m(x).sum() * float("nan"), lambda: torch.zeros(4, 2), steps=3, progress=False,
            device=torch.device("cpu"))


def test_interrupt_keeps_the_weights_trained_so_far() -> None:
    model = nn.Linear(2, 1)
    calls = {"n": 0}

    def next_batch() -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return torch.randn(8, 2)

    before = model.weight.detach().clone()
    result = fit(model, lambda m, x: (m(x) - 1).pow(2).mean(), next_batch, steps=100, progress=False,
                 device=torch.device("cpu"))
    assert result.interrupted and result.steps == 5
    assert not torch.equal(model.weight, before)


def test_fit_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        fit(nn.Linear(1, 1), lambda m, x: x, lambda: 0, steps=-1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit(nn.Linear(1, 1), lambda m, x: x, lambda: 0, steps=1, lr=0.0, progress=False)
    # values that used to pass a "< 0" check and then mislead: NaN, a zero or negative clipping norm, ...
    for options, name in (({"lr": float("nan")}, "lr must be finite"), ({"grad_clip": 0.0}, "grad_clip"),
                          ({"grad_clip": -1.0}, "grad_clip"), ({"weight_decay": float("nan")}, "weight_decay"),
                          ({"time_limit": float("nan")}, "time_limit"), ({"callback_every": 0}, "callback_every"),
                          ({"lr": True}, "lr must be a real number")):
        with pytest.raises(ValueError, match=name):
            fit(nn.Linear(1, 1), lambda m, x: x, lambda: 0, steps=1, progress=False, **options)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        random_rows(torch.zeros(4, 2), 2.0)
    with pytest.raises(ValueError, match="data is empty"):
        random_rows(torch.zeros(0, 2), 2)


def test_fit_accepts_a_device_name() -> None:
    model = nn.Linear(2, 1)
    result = fit(model, lambda m, x: (m(x) ** 2).mean(), random_rows(torch.randn(8, 2), 4), steps=2, device="cpu",
                 progress=False)
    assert result.steps == 2


def test_nan_settings_are_refused_by_samplers_guidance_and_langevin() -> None:
    from minidiff.guidance import classifier_free_guidance
    from minidiff.samplers import ddim_sample
    from minidiff.score import langevin

    schedule = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="eta must be finite"):
        ddim_sample(lambda x, t: x, schedule, torch.zeros(2, 2), steps=2, eta=float("nan"))
    model = nn.Linear(1, 1)
    model.null_class = 0
    with pytest.raises(ValueError, match="scale must be finite"):
        classifier_free_guidance(model, 1, float("nan"))
    with pytest.raises(ValueError, match="step_size must be finite"):
        langevin(lambda x: -x, torch.zeros(2, 2), float("nan"), 10)


def test_ancestral_sampler_with_the_exact_eps_samples_the_mixture() -> None:
    """Algorithm 2 driven by the exact ε of a mixture: the samples match fresh data within the metric's noise."""
    mixture, schedule = eight_gaussians_mixture(), NoiseSchedule.linear(1000)
    generator = torch.Generator().manual_seed(0)
    samples = ddpm_sample(mixture_eps_model(mixture, schedule), schedule, standard_normal((2000, 2), generator),
                          generator=generator)
    comparison = compare_to_data(samples, lambda n, g: mixture.sample(n, g), generator, repeats=10)
    assert comparison.ratio < 2.0, comparison
    # the exact log-likelihood is a much steadier judge than a two-sample distance
    data_ll = mixture_log_likelihood(mixture.sample(20_000, generator), mixture)
    assert abs(mixture_log_likelihood(samples, mixture) - data_ll) < 0.05


def test_ancestral_sampler_with_a_wrong_model_is_detected() -> None:
    """Teeth for the test above: sampling a different mixture is far from the data by the same metric."""
    mixture, other, schedule = eight_gaussians_mixture(), two_gaussians_mixture(), NoiseSchedule.linear(200)
    generator = torch.Generator().manual_seed(0)
    samples = ddpm_sample(mixture_eps_model(other, schedule), schedule, standard_normal((1500, 2), generator),
                          generator=generator)
    assert compare_to_data(samples, lambda n, g: mixture.sample(n, g), generator).ratio > 10


def test_sampler_trajectory_and_errors() -> None:
    schedule = NoiseSchedule.linear(20)
    x_T = standard_normal((3, 2), torch.Generator().manual_seed(0))
    path = [x_T]
    x = ddpm_sample(lambda x, t: torch.zeros_like(x), schedule, x_T, generator=torch.Generator().manual_seed(0),
                    callback=lambda state: path.append(state["x"]))
    assert len(path) == 21 and torch.equal(path[-1], x)
    with pytest.raises(ValueError, match="variance kind"):
        ddpm_sample(lambda x, t: x, schedule, x_T, variance="sigma")


def test_trained_mlp_samples_two_moons_within_twice_the_baseline() -> None:
    """End to end on CPU in ~15 s: Algorithm 1 then Algorithm 2 gives recognisable two moons."""
    generator = minidiff.seed_everything(0)
    schedule = NoiseSchedule.linear(200, start=5e-4, end=0.1)  # the DDPM range, rescaled to 200 steps
    data = sample_toy("two_moons", 20_000, generator)
    model = MLPDenoiser(hidden=128, num_blocks=3)
    result = fit(model, lambda m, x: ddpm_loss(m, schedule, x), random_rows(data, 256, generator), steps=1500,
                 lr=2e-3, progress=False, device=torch.device("cpu"), warmup_steps=50, cosine_decay=True)
    samples = ddpm_sample(result.ema.model, schedule, standard_normal((1000, 2), generator), generator=generator)
    comparison = compare_to_data(samples, lambda n, g: sample_toy("two_moons", n, g), generator,
                                 metric="sliced_wasserstein")
    assert math.isfinite(comparison.ratio) and comparison.ratio < 2.0, comparison


def test_random_rows_draws_the_same_rows_of_several_tensors() -> None:
    images, labels = torch.arange(10.0)[:, None].repeat(1, 3), torch.arange(10)
    batch_images, batch_labels = random_rows((images, labels), 6, torch.Generator().manual_seed(0))()
    assert torch.equal(batch_images[:, 0].long(), batch_labels)
    with pytest.raises(ValueError, match="same number of rows"):
        random_rows((images, labels[:5]), 2)
