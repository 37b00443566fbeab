"""Lesson 12, section 6: latent consistency models, checked against an exactly solvable guided ODE.

On lesson 09's two overlapping Gaussians (one class each) the guided score
(1 − s) ∇log p_σ̄(x̄) + s ∇log p_σ̄(x̄ | c) is exact at every noise level, so the *guided* PF-ODE's flow map is
computed here by scipy's adaptive Runge–Kutta in the variance-exploding variables (dx̄/dσ̄ = −σ̄ × that score),
independently of minidiff's samplers and of classifier-free guidance's code. A consistency student trained with
:func:`latent_consistency_loss` must land on that map in one call. Planted bugs these tests catch (tried once
each): the loss's teacher guided at scale 1 instead of s (the student then learns the conditional map: 0.619
from the guided map against 0.060); the guided ε written as ε(c) + s (ε(c) − ε(∅)) (the affine identity then
fails by 2e-3 at t = 999 and more below).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.integrate import solve_ivp
from torch import nn

from minidiff.distill import Student, TargetNetwork, consistency_sample, ddim_x0_step
from minidiff.latent_consistency import (
    FewStepTextToImage,
    guided_teacher_x0,
    latent_consistency_loss,
    load_latent_consistency,
)
from minidiff.lora import load_adapter_card
from minidiff.nets import MLPDenoiser, sinusoidal_embedding
from minidiff.oracles import class_conditional_mixture, mixture_eps_model
from minidiff.samplers import ddim_step
from minidiff.schedules import NoiseSchedule
from minidiff.toys import GaussianMixture
from minidiff.train import fit

SCHEDULE = NoiseSchedule.linear(1000)
# lesson 09's two classes: they overlap, so guidance moves the ODE's endpoints far (its tilted-density table)
MIXTURE = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                          0.36 * torch.eye(2).repeat(2, 1, 1))
CLASSES = torch.tensor([0, 1])
SCALE = 3.0


class ExactLabelledTeacher(nn.Module):
    """ε(x_t, t, y) exact for p(x | y), and for p(x) at y = null_class: a teacher trained to perfection.

    Written out for these two isotropic components, every row at its own t in one pass:
    q_t(x | k) = N(√ᾱ_t μ_k, v_t I) with v_t = 0.36 ᾱ_t + 1 − ᾱ_t, and
    ε = √(1 − ᾱ_t) Σ_k p(k | x_t, y) (x_t − √ᾱ_t μ_k) / v_t,
    where p(k | x_t, y) is 1 for the label's own component and the posterior over both at the null label.
    (minidiff's oracle loops over the distinct t of a batch, which made this test's training 2.3× slower;
    ``test_the_exact_teacher_is_minidiffs_oracle`` checks the two agree.)
    """

    null_class = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha_bar = SCHEDULE.alpha_bars.to(torch.float64)[t.long()][:, None, None]  # [N, 1, 1]
        variance = 0.36 * alpha_bar + 1 - alpha_bar
        residual = x.double()[:, None, :] - alpha_bar.sqrt() * MIXTURE.means.double()[None]  # [N, K, 2]
        log_weights = MIXTURE.weights.double().log()[None] - (residual**2).sum(-1) / (2 * variance[:, :, 0])
        own = nn.functional.one_hot(y.clamp(max=1), 2).bool()  # the label's component (clamped away at null)
        log_weights = torch.where((y == self.null_class)[:, None] | own, log_weights, -math.inf)
        posterior = torch.softmax(log_weights, dim=1)[..., None]
        return ((1 - alpha_bar[:, 0]).sqrt() * (posterior * residual).sum(1) / variance[:, 0]).to(x.dtype)


class LabelledMLP(MLPDenoiser):
    """The 2D MLP of lesson 03 with a label embedding added to its time embedding: ε_θ(x_t, t, y)."""

    def __init__(self) -> None:
        super().__init__(hidden=128, num_blocks=3)
        self.label = nn.Embedding(3, 128)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(sinusoidal_embedding(t, self.time_dim)) + self.label(y)
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h + time)
        return self.output(h)


def guided_flow_map(x_T: torch.Tensor, label: int, scale: float) -> torch.Tensor:
    """x_0 at the end of the guided PF-ODE through x_T (scipy RK45, rtol 1e-8, in u = log σ̄)."""
    alpha_bar = float(SCHEDULE.alpha_bars[-1])
    sigma_bar = math.sqrt((1 - alpha_bar) / alpha_bar)
    conditional = class_conditional_mixture(MIXTURE, CLASSES, label)
    n = x_T.shape[0]

    def slope(u: float, state) -> object:  # dx̄/du = σ̄ dx̄/dσ̄ = −σ̄² × the guided score
        variance = math.exp(2 * u)
        x = torch.from_numpy(state.reshape(n, 2))
        score = ((1 - scale) * MIXTURE.convolved(variance).score(x)
                 + scale * conditional.convolved(variance).score(x))
        return (-variance * score).numpy().ravel()

    solution = solve_ivp(slope, (math.log(sigma_bar), math.log(1e-5)),
                         (x_T.double() / math.sqrt(alpha_bar)).numpy().ravel(), rtol=1e-8, atol=1e-8)
    return torch.from_numpy(solution.y[:, -1].reshape(n, 2)).float()


def labelled_draws(batch: int = 256):
    generator = torch.Generator().manual_seed(2)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        points, components = MIXTURE.sample(batch, generator, return_labels=True)
        return points, CLASSES[components]
    return draw


def train_guided_student(scale: float, steps: int = 1500) -> Student:
    torch.manual_seed(0)
    teacher = ExactLabelledTeacher()
    student = Student(LabelledMLP(), SCHEDULE)
    holder: dict[str, TargetNetwork] = {}

    def loss(net: Student, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        holder.setdefault("target", TargetNetwork(net, decay=0.95))
        return latent_consistency_loss(net, holder["target"], teacher, SCHEDULE, batch[0], batch[1], scale=scale,
                                       boundaries=32, huber_c=0.01)
    return fit(student, loss, labelled_draws(), steps, lr=1e-3, ema_decay=0.999, progress=False,
               warmup_steps=100, cosine_decay=True).ema_model()


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).norm(dim=1).mean().item()


# ---------------------------------------------------------------------------------------
# The pieces, exactly
# ---------------------------------------------------------------------------------------


def test_the_exact_teacher_is_minidiffs_oracle() -> None:
    """The test's one-pass teacher against :func:`mixture_eps_model` of the conditional and full mixtures."""
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.5
    t = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(6))
    labels = torch.arange(300) % 3
    oracles = [mixture_eps_model(class_conditional_mixture(MIXTURE, CLASSES, c), SCHEDULE) for c in (0, 1)]
    oracles.append(mixture_eps_model(MIXTURE, SCHEDULE))
    ours = ExactLabelledTeacher()(x, t, labels)
    for label, oracle in enumerate(oracles):
        rows = labels == label
        assert torch.allclose(ours[rows], oracle(x[rows], t[rows]), atol=1e-10), label


def test_one_guided_ddim_step_is_luo_et_als_combination_of_two_unguided_steps() -> None:
    """x̂ = x + (1 + ω) Φ(x, c) − ω Φ(x, ∅) with Φ one plain DDIM step's increment and s = 1 + ω."""
    teacher = ExactLabelledTeacher()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(64) % 2
    for t, t_next in ((999, 968), (500, 469), (40, 9)):
        steps = torch.full((64,), t)
        a_t, a_next = float(SCHEDULE.alpha_bars[t]), float(SCHEDULE.alpha_bars[t_next])
        conditional = ddim_step(x, teacher(x, steps, labels), a_t, a_next, 0.0, torch.zeros_like(x)) - x
        unconditional = ddim_step(x, teacher(x, steps, torch.full_like(labels, 2)), a_t, a_next, 0.0,
                                  torch.zeros_like(x)) - x
        omega = SCALE - 1
        luo = x + (1 + omega) * conditional - omega * unconditional
        x0 = guided_teacher_x0(teacher, labels, SCALE, SCHEDULE)(x, steps)
        ours = ddim_x0_step(x, x0, a_t**0.5, (1 - a_t) ** 0.5, a_next**0.5, (1 - a_next) ** 0.5)
        assert torch.allclose(ours, luo, atol=1e-9), (t, (ours - luo).abs().max())


def test_the_boundary_condition_holds_with_a_condition() -> None:
    student = Student(LabelledMLP(), SCHEDULE)
    x = torch.randn(16, 2)
    labels = torch.arange(16) % 3
    assert torch.equal(student.x0(x, torch.zeros(16, dtype=torch.long), labels), x)
    # and the condition reaches the network: two labels give two answers at high noise
    late = torch.full((16,), 900)
    assert not torch.allclose(student.x0(x, late, torch.zeros_like(labels)), student.x0(x, late, labels))


# ---------------------------------------------------------------------------------------
# Trained on the mixture: one call lands on the guided ODE's endpoint
# ---------------------------------------------------------------------------------------


def test_latent_consistency_distillation_learns_the_guided_flow_map() -> None:
    """One call of the student lands near the exact endpoint of the guided (s = 3) PF-ODE, far closer than
    the conditional (s = 1) map that an unguided teacher would have taught."""
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(400) % 2
    guided = torch.empty_like(x_T)
    conditional = torch.empty_like(x_T)
    for label in (0, 1):
        rows = labels == label
        guided[rows] = guided_flow_map(x_T[rows], label, SCALE)
        conditional[rows] = guided_flow_map(x_T[rows], label, 1.0)
    gap = mean_distance(guided, conditional)
    student = train_guided_student(SCALE)
    with torch.no_grad():
        one_call = consistency_sample(student, SCHEDULE, x_T, steps=1, condition=labels)
    error = mean_distance(one_call, guided)
    print(f"guided consistency, 1 call: {error:.3f} from the guided map; guided vs conditional map: {gap:.3f}")
    assert gap > 0.3  # guidance at s = 3 moves the endpoints far
    assert error < 0.3 * gap
    # and the student's samples carry the tilt: their mean sits as far out as the guided map's
    # (lesson 09's DDIM column: 1.63 at s = 3 against 1.00 unguided)
    side = 2 * labels.float() - 1
    outward = {name: (x[:, 0] * side).mean().item() for name, x in
               (("student", one_call), ("guided", guided), ("conditional", conditional))}
    print("mean distance outward along x:", outward)
    assert abs(outward["student"] - outward["guided"]) < 0.1 and outward["conditional"] < 1.1


# ---------------------------------------------------------------------------------------
# The shipped LCM-LoRA and its recipe
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> FewStepTextToImage:
    return load_latent_consistency(device="cpu")


def test_shipped_lcm_lora_card_is_complete_and_says_what_was_measured() -> None:
    card = load_adapter_card("lcm_lora")
    for key in ("recipe", "steps", "train_seconds", "device", "metrics", "sha256", "adapter", "seed", "student"):
        assert key in card, f"lcm_lora.json lacks {key!r}"
    assert card["recipe"] == "python -m minidiff.recipes lcm_lora" and not card["fast_mode"]
    assert card["adapter"]["base"]["name"] == "latent_text_digits" and card["adapter"]["rank"] == 4
    assert card["student"]["kind"] == "latent_consistency" and card["student"]["scale"] == SCALE
    assert card["file_bytes"] < 400_000
    metrics = card["metrics"]
    # the H100 measurement of lesson 12 §6 (500 captions per kind): one call beats the teacher's 2-step DDIM
    assert metrics["LCM_1"]["one_object_caption_accuracy"] > 0.8 > metrics["DDIM_2"]["one_object_caption_accuracy"]


def test_shipped_lcm_lora_follows_captions_in_one_call_on_the_cpu(shipped: FewStepTextToImage) -> None:
    """A fresh CPU measurement (60 captions, another seed than the card's): one call draws the right digit in
    the right colour for most one-object captions, and the seed fixes the images."""
    from minidiff.text_recipes import evaluate_prompt_following
    from minidiff.weights import pretrained

    judge = pretrained("attribute_judge", device="cpu")
    reports = evaluate_prompt_following(lambda captions, g: shipped(captions, seed=7, steps=1), judge, 60,
                                        torch.Generator().manual_seed(11))
    assert reports["one_object"].caption_accuracy > 0.65, reports["one_object"]
    images = shipped(["a red 3", "a blue 8"], seed=3, steps=2)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(images, shipped(["a red 3", "a blue 8"], seed=3, steps=2))


def test_lcm_lora_recipe_runs_in_fast_mode_and_loads_back(tmp_path: Path) -> None:
    from minidiff.distill_recipes import DISTILL_RECIPES

    card = DISTILL_RECIPES["lcm_lora"](tmp_path, progress=False)
    assert card["fast_mode"] and card["recipe"].endswith("--fast") and card["adapter"]["rank"] == 4
    assert set(card["metrics"]) == {f"{kind}_{n}" for kind in ("LCM", "DDIM") for n in (1, 2, 4)}
    pipeline = load_latent_consistency(tmp_path / "lcm_lora.safetensors", device="cpu")
    assert pipeline(["a green 5"], seed=0, steps=1).shape == (1, 3, 32, 32)
    # an adapter of the right base that is not a consistency student is refused, not sampled as one
    card_path = tmp_path / "lcm_lora.json"
    card["student"]["kind"] = "progressive"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="is not a latent consistency student"):
        load_latent_consistency(tmp_path / "lcm_lora.safetensors", device="cpu")


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_argument_named(shipped: FewStepTextToImage) -> None:
    student = Student(LabelledMLP(), SCHEDULE)
    target = TargetNetwork(student, 0.95)
    x0 = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"tokens must have one row per latent \(8\)"):
        latent_consistency_loss(student, target, ExactLabelledTeacher(), SCHEDULE, x0, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="scale must be"):
        guided_teacher_x0(ExactLabelledTeacher(), torch.zeros(8, dtype=torch.long), -1.0, SCHEDULE)
    with pytest.raises(ValueError, match=r"condition must have one row per sample \(8\)"):
        consistency_sample(student, SCHEDULE, x0, condition=torch.zeros(3, dtype=torch.long))
    for steps in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000"):
            shipped(["a red 3"], steps=steps)
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            shipped(["a red 3"], seed=seed)
    with pytest.raises(ValueError, match="base"):  # lesson 13's style adapter belongs to the pixel model
        load_latent_consistency("lora_style", device="cpu")
    with pytest.raises(ValueError, match="channels"):
        FewStepTextToImage(shipped.student, _wrong_autoencoder())


def _wrong_autoencoder():
    from minidiff.autoencoder import Autoencoder, AutoencoderConfig

    return Autoencoder(AutoencoderConfig(latent_channels=3))

