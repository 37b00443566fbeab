"""Lesson 14: flow matching, checked against independent computations on 2D mixtures.

Planted bugs these tests catch (tried once each): the conditional velocity x_0 − ε instead of ε − x_0; Heun's
corrector slope taken at τ instead of τ_next; E[ε | x_τ] divided by α instead of σ in the exact velocity.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from minidiff.contracts import eps_from_velocity
from minidiff.flow import (
    TimeScaled,
    cosine_path,
    euler_sample,
    flow_matching_loss,
    heun_sample,
    linear_path,
    logit_normal_times,
    mixture_velocity,
    reflow_pairs,
    score_from_velocity,
    straightness,
    x0_and_eps_from_velocity,
)
from minidiff.metrics import mixture_log_likelihood
from minidiff.nets import MLPDenoiser
from minidiff.oracles import mixture_eps_model
from minidiff.schedules import NoiseSchedule
from minidiff.toys import eight_gaussians_mixture, two_gaussians_mixture
from minidiff.train import fit

MIXTURE = eight_gaussians_mixture()


def test_exact_velocity_matches_a_monte_carlo_estimate():
    """E[ε − x_0 | x_τ] by self-normalised importance sampling over 400,000 data draws (weights N(x_τ; (1−τ)x_0, τ²I))
    agrees with the closed form, which goes through each component's Gaussian posterior."""
    generator = torch.Generator().manual_seed(0)
    data = MIXTURE.sample(400_000, generator)
    velocity = mixture_velocity(MIXTURE)
    for tau in (0.3, 0.6, 0.9):
        x = MIXTURE.sample(5, generator) * (1 - tau) + tau * torch.randn(5, 2, generator=generator, dtype=torch.float64)
        exact = velocity(x, torch.full((5,), tau, dtype=torch.float64))
        for row in range(5):
            log_weights = -((x[row] - (1 - tau) * data) ** 2).sum(1) / (2 * tau**2)
            weights = torch.softmax(log_weights, 0)
            eps = (x[row] - (1 - tau) * data) / tau
            estimate = (weights[:, None] * (eps - data)).sum(0)
            assert torch.allclose(exact[row], estimate, atol=0.03), (tau, row, exact[row], estimate)


def test_velocity_converts_to_lesson_04s_exact_epsilon_and_score():
    """The exact velocity read as a VP ε-model (contracts.eps_from_velocity) is the mixture's exact ε (lesson 04),
    and score_from_velocity is the score of the data convolved with noise, rescaled: two independent routes."""
    schedule = NoiseSchedule.linear(1000)
    velocity = mixture_velocity(MIXTURE)
    generator = torch.Generator().manual_seed(1)
    for t in (50, 300, 700, 1000):
        x_t = torch.randn(64, 2, generator=generator, dtype=torch.float64) * 2
        timesteps = torch.full((64,), t)
        assert torch.allclose(eps_from_velocity(velocity, schedule)(x_t, timesteps),
                              mixture_eps_model(MIXTURE, schedule)(x_t, timesteps), atol=1e-9), t
    for tau in (0.2, 0.5, 0.8):
        x = torch.randn(64, 2, generator=generator, dtype=torch.float64) * 2
        taus = torch.full((64,), tau, dtype=torch.float64)
        # x_τ/(1 − τ) = x_0 + (τ/(1 − τ)) ε: the data convolved with variance (τ/(1 − τ))², then the chain rule
        expected = MIXTURE.convolved((tau / (1 - tau)) ** 2).score(x / (1 - tau)) / (1 - tau)
        assert torch.allclose(score_from_velocity(x, velocity(x, taus), taus), expected, atol=1e-9), tau


def test_x0_and_eps_round_trip_on_both_paths():
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(32, 3, generator=generator), torch.randn(32, 3, generator=generator)
    tau = torch.rand(32, generator=generator) * 0.98 + 0.01
    for path in (linear_path(), cosine_path()):
        x, u = path.sample(x0, eps, tau), path.conditional_velocity(x0, eps, tau)
        got_x0, got_eps = x0_and_eps_from_velocity(x, u, tau, path)
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4), path.name
    # the linear path's velocity is the straight line's: ε − x_0
    assert torch.allclose(linear_path().conditional_velocity(x0, eps, tau), eps - x0)


def test_conditional_and_marginal_losses_differ_by_a_model_independent_constant():
    """L_CFM(θ) − L_FM(θ) is the same for two unrelated models (Lipman et al. 2023, Theorem 2), so both losses
    have the same minimiser; the losses themselves differ between the models by far more."""
    generator = torch.Generator().manual_seed(3)
    n, levels = 40_000, torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    x0, eps = MIXTURE.sample(n, generator), torch.randn(n, 2, generator=generator, dtype=torch.float64)
    tau = levels[torch.randint(0, len(levels), (n,), generator=generator)]
    path = linear_path()
    x, conditional = path.sample(x0, eps, tau), path.conditional_velocity(x0, eps, tau)
    marginal = mixture_velocity(MIXTURE)(x, tau)
    gaps, losses = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = TimeScaled(MLPDenoiser(hidden=32, num_blocks=1))
        with torch.no_grad():  # the second model: another network, scaled and shifted, so the losses differ a lot
            prediction = model(x.float(), tau.float()).double() * (1 + 2 * seed) + seed
        conditional_loss = ((prediction - conditional) ** 2).sum(1).mean().item()
        marginal_loss = ((prediction - marginal) ** 2).sum(1).mean().item()
        gaps.append(conditional_loss - marginal_loss)
        losses.append(conditional_loss)
    print(f"L_CFM − L_FM: {gaps[0]:.4f} and {gaps[1]:.4f}; L_CFM: {losses[0]:.3f} and {losses[1]:.3f}")
    assert abs(gaps[0] - gaps[1]) < 0.03 < abs(losses[0] - losses[1]) / 10
    assert gaps[0] > 0  # the conditional target carries the irreducible variance of ε − x_0 given x_τ


def test_euler_is_first_order_and_heun_second_on_the_exact_field():
    """Endpoint errors against a 4,096-step Heun solve of the exact field of a smooth two-component mixture."""
    mixture = two_gaussians_mixture(separation=2.0, std=0.5)
    velocity = mixture_velocity(mixture)
    x1 = torch.randn(200, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = heun_sample(velocity, x1, steps=4096)

    def error(sampler, steps: int) -> float:
        return (sampler(velocity, x1, steps=steps) - reference).norm(dim=1).mean().item()

    for sampler, order in ((euler_sample, 1), (heun_sample, 2)):
        errors = [error(sampler, steps) for steps in (16, 32, 64)]
        slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
        print(sampler.__name__, [f"{e:.2e}" for e in errors], [f"{s:.2f}" for s in slopes])
        assert all(abs(s - order) < 0.3 for s in slopes), (sampler.__name__, slopes)


@pytest.fixture(scope="module")
def trained_flow():
    """An MLP velocity model of the eight-Gaussian mixture (1,500 steps of conditional flow matching, ~5 s)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    model = TimeScaled(MLPDenoiser(hidden=128, num_blocks=3))
    fit(model, lambda net, x0: flow_matching_loss(net, x0, times=logit_normal_times),
        lambda: MIXTURE.sample(256, generator).float(), 1500, lr=1e-3, ema_decay=0.999, progress=False,
        warmup_steps=100, cosine_decay=True, device="cpu")
    return model.eval()


def test_a_trained_model_approaches_the_exact_velocity_and_density(trained_flow):
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    exact = mixture_velocity(MIXTURE)
    with torch.no_grad():
        samples = euler_sample(trained_flow, x1, steps=100)
        exact_samples = euler_sample(exact, x1.double(), steps=100)
        tau = torch.full((2000,), 0.5)
        x = linear_path().sample(MIXTURE.sample(2000).float(), torch.randn(2000, 2), tau)
        relative = ((trained_flow(x, tau) - exact(x, tau)).norm(dim=1).mean()
                    / exact(x, tau).norm(dim=1).mean()).item()
    model_ll, exact_ll = mixture_log_likelihood(samples, MIXTURE), mixture_log_likelihood(exact_samples, MIXTURE)
    print(f"relative velocity error at τ = 0.5: {relative:.3f}; log-likelihood {model_ll:.2f} (exact field "
          f"{exact_ll:.2f})")
    assert relative < 0.15
    assert model_ll > exact_ll - 1.0


def test_reflow_straightens_paths_and_improves_one_step_samples(trained_flow):
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(20_000, 2, generator=generator)
    samples, paired_noise = reflow_pairs(trained_flow, noise, steps=100)
    torch.manual_seed(1)
    second = TimeScaled(MLPDenoiser(hidden=128, num_blocks=3))
    second.load_state_dict(trained_flow.state_dict())  # reflow fine-tunes the first model on its own pairs

    def pairs():
        rows = torch.randint(0, len(noise), (256,), generator=generator)
        return samples[rows], paired_noise[rows]

    fit(second, lambda net, batch: flow_matching_loss(net, batch[0], noise=batch[1]), pairs, 1500, lr=5e-4,
        ema_decay=0.999, progress=False, warmup_steps=100, cosine_decay=True, device="cpu")
    test_noise = torch.randn(2000, 2, generator=generator)
    with torch.no_grad():
        before, after = straightness(trained_flow, test_noise), straightness(second.eval(), test_noise)
        one_step = {name: mixture_log_likelihood(euler_sample(model, test_noise, steps=1), MIXTURE)
                    for name, model in (("first", trained_flow), ("reflowed", second))}
    print(f"straightness {before:.4f} -> {after:.4f}; 1-step log-likelihood {one_step}")
    assert after < 0.5 * before
    assert one_step["reflowed"] > one_step["first"] + 5


def test_shipped_flow_model_draws_digits_in_eight_steps():
    from minidiff.distill_recipes import evaluation_noise, judge_figures
    from minidiff.flow_recipes import load_flow
    from minidiff.weights import pretrained

    flow, judge = load_flow(device="cpu"), pretrained("judge", device="cpu")
    figures = judge_figures(euler_sample(flow, evaluation_noise(200, torch.device("cpu")), steps=8), judge)
    print(figures)
    assert figures["mean_confidence"] > 0.9 and figures["min_class_share"] >= 0.03
    assert flow.card["flow"]["path"] == "linear" and flow.card["steps"] == 8000


def test_bad_inputs_are_refused_with_the_argument_named():
    from minidiff.flow_recipes import load_flow

    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        euler_sample(lambda x, t: x, x, steps=0)
    with pytest.raises(ValueError, match="shift"):
        heun_sample(lambda x, t: x, x, steps=4, shift=0.0)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        flow_matching_loss(lambda x, t: x, x, noise=torch.randn(4, 3))
    with pytest.raises(ValueError, match="tau in"):
        mixture_velocity(MIXTURE)(x, torch.zeros(4))
    with pytest.raises(ValueError, match="std"):
        logit_normal_times(4, std=0.0)
    with pytest.raises(ValueError, match="not a flow-matching model"):
        load_flow("mnist_ddpm")
    with pytest.raises(ValueError, match="x_T must be a tensor"):
        euler_sample(lambda x, t: x, (4, 2))


# ---------------------------------------------------------------------------------------
# v-prediction (lesson 14, eqs. 7 and 8)
# ---------------------------------------------------------------------------------------

def test_v_prediction_is_flow_matching_on_the_cosine_path() -> None:
    """On x_τ = cos(πτ/2) x_0 + sin(πτ/2) ε, dx_τ/dτ = (π/2)(cos ε − sin x_0) = (π/2) v: the path's analytic
    derivative (minidiff.flow) against the schedule's v (minidiff.schedules), at the same noise levels."""
    from minidiff.flow import cosine_path

    schedule = NoiseSchedule.cosine(1000)
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 100, 500, 900, 990])
    x0 = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    alpha = schedule.alpha_bars[t].double().sqrt()
    tau = torch.arccos(alpha) * 2 / math.pi  # cos(πτ/2) = √ᾱ_t
    path = cosine_path()
    torch.testing.assert_close(path.sample(x0, eps, tau), schedule.q_sample(x0, t, eps), atol=1e-9, rtol=1e-9)
    v = schedule.v_from_eps(schedule.q_sample(x0, t, eps), t, eps)
    torch.testing.assert_close(path.conditional_velocity(x0, eps, tau), math.pi / 2 * v, atol=1e-6, rtol=1e-6)


def test_the_v_loss_is_the_eps_loss_weighted_by_one_over_alpha_bar() -> None:
    """‖v − v̂‖² = ‖ε − ε̂‖²/ᾱ_t with ε̂ = eps_from_v(v̂): at each t, for an arbitrary (random) network."""
    from minidiff.contracts import eps_from_v
    from minidiff.nets import MLPDenoiser
    from minidiff.train import ddpm_loss

    schedule = NoiseSchedule.linear(1000)
    torch.manual_seed(0)
    network = MLPDenoiser(hidden=32, num_blocks=1)
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 2, generator=generator), torch.randn(64, 2, generator=generator)
    with torch.no_grad():
        for step in (1, 50, 400, 999):
            t = torch.full((64,), step)
            v_loss = ddpm_loss(network, schedule, x0, t=t, noise=noise, target="v")
            eps_loss = ddpm_loss(eps_from_v(network, schedule), schedule, x0, t=t, noise=noise)
            assert v_loss.item() == pytest.approx(eps_loss.item() / schedule.alpha_bars[step].item(), rel=1e-4)
            x0_loss = ddpm_loss(network, schedule, x0, t=t, noise=noise, target="x0")
            by_hand = ((network(schedule.q_sample(x0, t, noise), t) - x0) ** 2).mean()
            assert x0_loss.item() == pytest.approx(by_hand.item())
    with pytest.raises(ValueError, match="target must be one of"):
        ddpm_loss(network, schedule, x0, target="noise")


def test_at_the_cosine_schedules_end_v_prediction_stays_sane_where_eps_prediction_blows_up() -> None:
    """The clipped cosine schedule ends at ᾱ_T ≈ 2.4·10⁻⁹: an ε-model's x̂_0 = (x − √(1 − ᾱ) ε̂)/√ᾱ multiplies its
    error by 1/√ᾱ_T ≈ 2·10⁴ at DDIM's first step, while a v-model's x̂_0 = √ᾱ x − √(1 − ᾱ) v̂ is bounded
    (lesson 14, section 7). Same MLP, same data, unclipped DDIM with 50 steps."""
    from minidiff.contracts import eps_from_v
    from minidiff.nets import MLPDenoiser
    from minidiff.samplers import ddim_sample
    from minidiff.toys import eight_gaussians_mixture
    from minidiff.train import ddpm_loss, fit

    mixture, schedule = eight_gaussians_mixture(), NoiseSchedule.cosine(1000)
    generator = torch.Generator().manual_seed(0)
    scores = {}
    for target, steps in (("eps", 400), ("v", 3000)):  # ε fails by far after 400 steps already (CI time)
        torch.manual_seed(0)
        result = fit(MLPDenoiser(hidden=128, num_blocks=3),
                     lambda net, x, target=target: ddpm_loss(net, schedule, x, target=target),
                     lambda: mixture.sample(256, generator).float(), steps, lr=1e-3, ema_decay=0.999, progress=False,
                     warmup_steps=50, cosine_decay=True, device="cpu")
        model = result.ema.model if target == "eps" else eps_from_v(result.ema.model, schedule)
        with torch.no_grad():
            samples = ddim_sample(model, schedule, torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)),
                                  steps=50)
        scores[target] = mixture_log_likelihood(samples, mixture)
    data = mixture_log_likelihood(mixture.sample(20_000, generator), mixture)
    assert scores["v"] > data - 2.0, (scores, data)  # measured: -2.35 against the data's -1.12
    assert scores["eps"] < data - 100, (scores, data)  # measured: about -48,000 (-5,500 after 1,000 steps)
