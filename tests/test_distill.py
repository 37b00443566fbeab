"""Lesson 12: distillation and consistency models, checked against the exact flow map of a 2D mixture.

The PF-ODE of Gaussian-mixture data has an exact score at every noise level, so its flow map (x_T ↦ the x_0 at
the end of its trajectory) is computed here by scipy's adaptive Runge–Kutta in the variance-exploding variables
x̄ = x/√ᾱ, σ̄ = √(1 − ᾱ)/√ᾱ, where dx̄/dσ̄ = −σ̄ ∇ log p_σ̄(x̄) and p_σ̄ is the data convolved with N(0, σ̄² I):
nothing of minidiff's samplers is used for the reference. Planted bugs that these tests catch (tried once
each): a consistency target taken at t_{n+1} instead of after the teacher's step; a boundary c_skip(0) = 0.9;
a progressive target that forgets the (σ_next/σ_t) x_t term.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.integrate import solve_ivp

from minidiff.distill import (
    Student,
    TargetNetwork,
    consistency_coefficients,
    consistency_loss,
    consistency_sample,
    load_student,
    progressive_distillation_loss,
    progressive_target,
    student_card,
    student_grid,
    without_dropout,
    x0_from_eps_model,
)
from minidiff.metrics import mixture_log_likelihood
from minidiff.nets import MLPDenoiser
from minidiff.oracles import mixture_eps_model
from minidiff.samplers import ddim_sample, ddim_step, timestep_sequence
from minidiff.schedules import NoiseSchedule
from minidiff.toys import eight_gaussians_mixture
from minidiff.train import fit

SCHEDULE = NoiseSchedule.linear(1000)
MIXTURE = eight_gaussians_mixture()


def exact_flow_map(x_t: torch.Tensor, t: int) -> torch.Tensor:
    """x_0 at the end of the PF-ODE trajectory through x_t (scipy RK45 at rtol 1e-9, in u = log σ̄)."""
    alpha_bar = float(SCHEDULE.alpha_bars[t])
    sigma_bar = math.sqrt((1 - alpha_bar) / alpha_bar)
    n = x_t.shape[0]

    def slope(u: float, state: torch.Tensor) -> torch.Tensor:  # dx̄/du = σ̄ dx̄/dσ̄ = −σ̄² ∇ log p_σ̄
        level = math.exp(u)
        score = MIXTURE.convolved(level**2).score(torch.from_numpy(state.reshape(n, 2))).numpy()
        return (-(level**2) * score).ravel()

    # stop at σ̄ = 1e-5: the remaining move is below 1e-8 for components of standard deviation 0.15
    solution = solve_ivp(slope, (math.log(sigma_bar), math.log(1e-5)),
                         (x_t.double() / math.sqrt(alpha_bar)).numpy().ravel(), rtol=1e-9, atol=1e-9)
    return torch.from_numpy(solution.y[:, -1].reshape(n, 2)).float()


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).norm(dim=1).mean().item()


def round_mixture_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact ε of MIXTURE's data with every row at its own t, in one pass (the eight components are round,
    s = 0.15): q_t = Σ_k π_k N(√ᾱ_t μ_k, v_t I) with v_t = s² ᾱ_t + 1 − ᾱ_t, so
    ε = −√(1 − ᾱ_t) ∇log q_t = √(1 − ᾱ_t) Σ_k p(k | x_t) (x_t − √ᾱ_t μ_k) / v_t.

    minidiff's oracle loops over the distinct t of a batch, which made the students' training about twice as
    slow; ``test_the_one_pass_teacher_is_minidiffs_oracle`` checks that the two agree.
    """
    alpha_bar = SCHEDULE.alpha_bars.to(torch.float64)[t.long()][:, None, None]  # [N, 1, 1]
    variance = 0.15**2 * alpha_bar + 1 - alpha_bar
    residual = x.double()[:, None, :] - alpha_bar.sqrt() * MIXTURE.means.double()[None]  # [N, K, 2]
    log_weights = MIXTURE.weights.double().log()[None] - (residual**2).sum(-1) / (2 * variance[:, :, 0])
    posterior = torch.softmax(log_weights, dim=1)[..., None]
    return ((1 - alpha_bar[:, 0]).sqrt() * (posterior * residual).sum(1) / variance[:, 0]).to(x.dtype)


def test_the_one_pass_teacher_is_minidiffs_oracle() -> None:
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    t = torch.randint(0, 1001, (400,), generator=torch.Generator().manual_seed(6))
    assert torch.allclose(round_mixture_eps(x, t), mixture_eps_model(MIXTURE, SCHEDULE)(x, t), atol=1e-10)


@pytest.fixture(scope="module")
def exact_teacher():
    return round_mixture_eps, x0_from_eps_model(round_mixture_eps, SCHEDULE)


@pytest.fixture(scope="module")
def start_and_map():
    x_T = torch.randn(600, 2, generator=torch.Generator().manual_seed(1))
    return x_T, exact_flow_map(x_T, SCHEDULE.T)


def draw_mixture(batch: int = 256):
    generator = torch.Generator().manual_seed(2)
    return lambda: MIXTURE.sample(batch, generator).float()


def consistency_trainer(teacher_x0, decay: float):
    """The loss of consistency distillation (with ``teacher_x0``) or training (None) on a 32-step grid; its target
    network is made from the student at the first call, once."""
    holder = {}

    def loss(net, x0):
        if "target" not in holder:
            holder["target"] = TargetNetwork(net, decay=decay)
        return consistency_loss(net, holder["target"], SCHEDULE, x0, 32, teacher_x0, huber_c=0.01)
    return loss


def train_student(loss, steps: int, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    student = Student(MLPDenoiser(hidden=128, num_blocks=3), SCHEDULE)
    result = fit(student, lambda net, x0: loss(net, x0), draw_mixture(), steps, lr=1e-3, ema_decay=0.999,
                 progress=False, warmup_steps=100, cosine_decay=True)
    return result.ema_model()


# ---------------------------------------------------------------------------------------
# The pieces, exactly
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 50, 64, 256, 1000])
def test_student_grid_is_lesson_08s_trailing_spacing(steps):
    assert student_grid(1000, steps).tolist() == [*timestep_sequence(1000, steps, "trailing"), 0]


def test_boundary_condition_holds_for_any_network():
    """f(x, 0) = x exactly, whatever the (here untrained, random) network says."""
    torch.manual_seed(0)
    student = Student(MLPDenoiser(), SCHEDULE)
    x = torch.randn(64, 2)
    assert torch.equal(student.x0(x, torch.zeros(64, dtype=torch.long)), x)
    c_skip, c_out = consistency_coefficients(torch.tensor([0.0, 1e-3, 1e3]))
    assert c_skip[0] == 1 and c_out[0] == 0
    # far from the boundary the network alone predicts x_0 (at scale σ_data) and the input is not passed through
    assert c_skip[2] < 1e-6 and c_out[2] == pytest.approx(0.5, rel=1e-6)


def test_a_copied_teacher_starts_right_at_low_noise(exact_teacher):
    """With the teacher's ε inside, x̂_0 = c_skip x̄ − c_out ε is within O(σ̄²) of the teacher's (x_t − σ ε)/α."""
    eps_model, teacher_x0 = exact_teacher
    student = Student(lambda x, t: eps_model(x.double(), t).float(), SCHEDULE)
    x0 = MIXTURE.sample(200, torch.Generator().manual_seed(0)).float()
    for t, bound in ((1, 1e-3), (20, 0.05)):
        timesteps = torch.full((200,), t)
        x_t = SCHEDULE.q_sample(x0, timesteps, torch.randn_like(x0))
        assert mean_distance(student.x0(x_t, timesteps), teacher_x0(x_t.double(), timesteps)) < bound


def test_progressive_target_reproduces_two_teacher_ddim_steps(exact_teacher):
    """One DDIM step of the student that predicts x̃ lands exactly where two DDIM steps of the teacher land
    (checked with lesson 08's own ddim_step, ε form)."""
    eps_model, teacher_x0 = exact_teacher
    x0 = MIXTURE.sample(100, torch.Generator().manual_seed(0))
    for t, t_next in ((1000, 500), (500, 250), (250, 0), (40, 20)):
        timesteps = torch.full((100,), t)
        x_t = SCHEDULE.q_sample(x0, timesteps, torch.randn_like(x0))
        target = progressive_target(teacher_x0, x_t, timesteps, torch.full((100,), t_next), SCHEDULE)
        a = [float(SCHEDULE.alpha_bars[s]) for s in (t, (t + t_next) // 2, t_next)]
        zero = torch.zeros_like(x_t)
        x_mid = ddim_step(x_t, eps_model(x_t, timesteps), a[0], a[1], 0.0, zero)
        teacher_two = ddim_step(x_mid, eps_model(x_mid, torch.full((100,), (t + t_next) // 2)), a[1], a[2], 0.0, zero)
        student_eps = (x_t - a[0] ** 0.5 * target) / (1 - a[0]) ** 0.5
        student_one = ddim_step(x_t, student_eps, a[0], a[2], 0.0, zero)
        assert torch.allclose(student_one, teacher_two, atol=1e-8), (t, t_next)


def test_student_ddim_step_is_its_own_x0_step():
    """DDIM with a Student (read as an ε-model) lands on α_next x̂_0 + σ_next ε̂: at the last step, on x̂_0."""
    torch.manual_seed(0)
    student = Student(MLPDenoiser(), SCHEDULE).eval()
    x_T = torch.randn(32, 2)
    with torch.no_grad():
        one_step = ddim_sample(student, SCHEDULE, x_T, steps=1)
        assert torch.allclose(one_step, student.x0(x_T, torch.full((32,), SCHEDULE.T)), atol=1e-4)


# ---------------------------------------------------------------------------------------
# Trained on the mixture: the students approach what they should
# ---------------------------------------------------------------------------------------


def test_consistency_distillation_learns_the_exact_flow_map(exact_teacher, start_and_map):
    """One call of a consistency-distilled MLP lands near the exact ODE endpoint of x_T (1,000 steps, N = 32);
    DDIM needs 4–8 calls of the *exact* ε for that. Multistep sampling then improves the sample quality."""
    _, teacher_x0 = exact_teacher
    x_T, reference = start_and_map
    student = train_student(consistency_trainer(teacher_x0, decay=0.95), 1500)
    with torch.no_grad():
        one_call = consistency_sample(student, SCHEDULE, x_T, steps=1)
    error = mean_distance(one_call, reference)
    ddim_error = {n: mean_distance(ddim_sample(exact_teacher[0], SCHEDULE, x_T.double(), steps=n), reference)
                  for n in (1, 4)}
    print(f"consistency distillation, 1 call: mean distance {error:.3f} to the exact map; exact DDIM {ddim_error}")
    assert ddim_error[1] > 1.5  # one DDIM step from pure noise only reaches the data mean
    assert error < 0.4 < ddim_error[4]
    likelihood = {n: mixture_log_likelihood(consistency_sample(student, SCHEDULE, x_T, steps=n,
                                                               generator=torch.Generator().manual_seed(3)), MIXTURE)
                  for n in (1, 4)}
    print("mean log-likelihood of the samples under the mixture:", likelihood)
    assert likelihood[4] > likelihood[1]


def test_consistency_training_without_a_teacher_learns_the_map(start_and_map):
    """Consistency *training* (no teacher: the same ε at the neighbouring level) gets there too, more slowly."""
    x_T, reference = start_and_map
    student = train_student(consistency_trainer(None, decay=0.0), 1000)
    with torch.no_grad():
        error = mean_distance(consistency_sample(student, SCHEDULE, x_T, steps=1), reference)
    baseline = mean_distance(torch.zeros_like(reference), reference)  # the data mean, what DDIM-1 returns
    print(f"consistency training, 1 call: {error:.3f} (the data mean: {baseline:.3f})")
    assert error < 0.7 * baseline


def test_one_progressive_round_halves_the_steps(exact_teacher, start_and_map):
    """A 2-step student of the exact 4-step DDIM teacher lands where the teacher does (its cost: the small gap),
    and so beats 2-step DDIM of the exact ε by far."""
    eps_model, teacher_x0 = exact_teacher
    x_T, reference = start_and_map
    student = train_student(lambda net, x0: progressive_distillation_loss(net, teacher_x0, SCHEDULE, x0, 2), 800)
    with torch.no_grad():
        two = ddim_sample(student, SCHEDULE, x_T, steps=2)
    teacher_four = ddim_sample(eps_model, SCHEDULE, x_T.double(), steps=4)
    ddim_two = ddim_sample(eps_model, SCHEDULE, x_T.double(), steps=2)
    gap, errors = mean_distance(two, teacher_four), [mean_distance(x, reference) for x in (two, teacher_four, ddim_two)]
    print(f"student-2 vs teacher-4: {gap:.4f}; to the exact map: student {errors[0]:.3f}, teacher-4 {errors[1]:.3f}, "
          f"DDIM-2 {errors[2]:.3f}")
    assert gap < 0.05
    assert errors[0] < 0.5 * errors[2]


def test_shipped_students_draw_every_digit_in_one_to_four_calls():
    """The shipped students on CPU: recognisable digits of every class in 1 (consistency) and 4 (progressive)
    calls, where 1-step DDIM of their teacher draws one blurred average (1,000-sample figures: their cards)."""
    from minidiff.distill_recipes import evaluation_noise, judge_figures
    from minidiff.weights import pretrained

    judge, teacher = pretrained("judge", device="cpu"), pretrained("mnist_ddpm", device="cpu")
    # 400 noises: at 200 the rarest class's share carries ±2% of sampling noise (the shipped 4-step student drew
    # 2.5% of one class in the first 200 of the table's noises, 6.0% in the first 400 and 6.9% in all 1,000)
    noise = evaluation_noise(400, torch.device("cpu"))
    with torch.no_grad():
        consistency = load_student("mnist_consistency", device="cpu")
        progressive = load_student("mnist_progressive", device="cpu")
        figures = {"consistency, 1 call": judge_figures(consistency_sample(consistency, SCHEDULE, noise), judge),
                   "progressive, 4 steps": judge_figures(ddim_sample(progressive, SCHEDULE, noise, steps=4), judge),
                   "DDIM, 1 step": judge_figures(ddim_sample(teacher, SCHEDULE, noise, steps=1), judge)}
    print(figures)
    assert progressive.card["student"]["steps"] == 4
    assert consistency.card["student"]["kind"] == "consistency_distillation"
    for name in ("consistency, 1 call", "progressive, 4 steps"):
        assert figures[name]["mean_confidence"] > 0.9 and figures[name]["min_class_share"] >= 0.03, name
        assert figures[name]["fid_ratio"] < 0.1 * figures["DDIM, 1 step"]["fid_ratio"], name
    assert figures["DDIM, 1 step"]["min_class_share"] < 0.03


def test_a_student_without_dropout_is_the_network_it_samples_as():
    """The distilled student trains with dropout off (a deterministic target): in training mode it must then
    compute exactly what it computes in eval mode, while the teacher's copy with dropout does not."""
    from minidiff.nets import UNet, UNetConfig

    torch.manual_seed(0)
    teacher = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_resolutions=(),
                              dropout=0.3, image_size=8))
    with torch.no_grad():  # a trained-like network: the zero-initialised output convolutions would hide dropout
        for parameter in teacher.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    student = without_dropout(copy.deepcopy(teacher)).train()
    evaluated = copy.deepcopy(student).eval()(x, t)
    assert torch.equal(student(x, t), evaluated)
    assert not torch.allclose(copy.deepcopy(teacher).train()(x, t), evaluated)  # the copy with dropout differs
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in teacher.modules())  # teacher untouched
    with pytest.raises(TypeError, match=r"net must be an nn\.Module"):
        without_dropout(lambda x, t: x)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_argument_named(tmp_path):
    student = Student(MLPDenoiser(), SCHEDULE)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"must be in 0\.\.1000"):
        student.x0(x, torch.full((4,), 1001))
    with pytest.raises(ValueError, match="integer timesteps"):
        student.x0(x, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[4\]"):
        student.x0(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.T/2"):
        progressive_distillation_loss(student, student.x0, SCHEDULE, x, 501)
    with pytest.raises(ValueError, match="boundaries must be an int"):
        consistency_loss(student, TargetNetwork(student), SCHEDULE, x, 0)
    with pytest.raises(ValueError, match="decay must be < 1"):
        TargetNetwork(student, decay=1.0)
    with pytest.raises(ValueError, match="timesteps must decrease from T = 1000"):
        consistency_sample(student, SCHEDULE, x, timesteps=[500, 250])
    with pytest.raises(ValueError, match="timesteps must decrease"):
        consistency_sample(student, SCHEDULE, x, timesteps=[1000, 400, 600])
    with pytest.raises(ValueError, match="kind must be"):
        student_card("distilled", 4, "mnist_ddpm")
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.T"):
        student_grid(1000, 0)
    with pytest.raises(ValueError, match="not a distilled student"):
        load_student("mnist_ddpm")
    from minidiff.distill_recipes import train_mnist_progressive

    with pytest.raises(ValueError, match="final_steps must be 1, 2 or 4"):
        train_mnist_progressive(tmp_path, final_steps=3)  # refused before anything loads
    with pytest.raises(ValueError, match="continue_from must be a progressive student"):
        train_mnist_progressive(tmp_path, continue_from="mnist_consistency", progress=False)
    with pytest.raises(FileNotFoundError, match="continue_from: no file"):
        train_mnist_progressive(tmp_path, continue_from=tmp_path / "nothing.safetensors", progress=False)


def test_a_progressive_chain_continues_from_the_shipped_student(tmp_path) -> None:
    """Fast mode: two more rounds (2 → 1 step) after the shipped 4-step student, whose rounds the new card keeps."""
    from minidiff.distill_recipes import train_mnist_progressive

    shipped = load_student("mnist_progressive", device="cpu").card
    # the shipped card also lists the 2- and 1-step rounds once continued from it: a new continuation replaces them
    own = [entry for entry in shipped["rounds"] if entry["steps"] >= 4]
    assert [entry["steps"] for entry in own] == [16, 8, 4]
    card = train_mnist_progressive(tmp_path, progress=False, continue_from="mnist_progressive")
    assert [entry["steps"] for entry in card["rounds"]] == [16, 8, 4, 2, 1]
    assert card["rounds"][:3] == own
    assert all(entry["continued_from"] == "mnist_progressive" for entry in card["rounds"][3:])
    assert card["rounds"][-1]["cumulative_train_seconds"] >= own[-1]["cumulative_train_seconds"]
    assert (tmp_path / "mnist_progressive_2.safetensors").exists()
    two_step = train_mnist_progressive(tmp_path, progress=False,
                                       continue_from=tmp_path / "mnist_progressive_2.safetensors")
    assert [entry["steps"] for entry in two_step["rounds"]] == [entry["steps"] for entry in card["rounds"]]
    assert two_step["rounds"][-1]["continued_from"] == "mnist_progressive_2"  # a path: that file's chain goes on
