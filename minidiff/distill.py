"""Distillation and consistency models: sampling in one to four network calls (lesson 12).

A trained ε-model is a slow sampler only because its ODE (lesson 08) is curved: large steps cut the corners.
This module trains *students* that take the large steps correctly:

* :func:`progressive_distillation_loss` — Salimans & Ho (2022): one student step matches two DDIM steps of
  its teacher; repeat with the student as the new teacher to halve the number of steps again.
* :func:`consistency_loss` — Song, Dhariwal, Chen & Sutskever (2023): a consistency function f(x_t, t) maps
  every point of an ODE trajectory to the trajectory's end x_0. Consistency *distillation* builds the target
  from one ODE step of a teacher; consistency *training* from the same noise at the neighbouring level, with no
  teacher at all. :func:`consistency_sample` is their multistep sampler.

Both students are a :class:`Student`: an x̂_0-predictor x̂_0 = c_skip(t) x̄_t + c_out(t) F(x_t, t) built around
any ε-network, which is also an :data:`~minidiff.contracts.EpsModel`, so every sampler of lesson 08 runs it.

Notation (lesson 12): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), x̄_t = x_t/α_t and σ̄_t = σ_t/α_t (DDIM's variables, in
which x̄_t = x_0 + σ̄_t ε); t = 0 means clean data, where σ̄_0 = 0.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from minidiff.contracts import EpsModel
from minidiff.runtime import check_number, randn_like
from minidiff.samplers import _finite, _start, timestep_sequence
from minidiff.schedules import NoiseSchedule

#: x̂_0(x_t, timesteps): a model's prediction of the clean data (t may be 0, where x̂_0 = x_0 = x_t).
X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: σ_data of the consistency parameterisation: the standard deviation of MNIST scaled to [−1, 1] is about 0.6.
SIGMA_DATA = 0.5


def _levels(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) per example, shaped to broadcast against ``like``; t may be 0 (α_0 = 1, σ_0 = 0)."""
    return (schedule.gather(schedule.sqrt_alpha_bars, t, like, lowest=0),
            schedule.gather(schedule.sqrt_one_minus_alpha_bars, t, like, lowest=0))


def consistency_coefficients(sigma_bar: torch.Tensor, sigma_data: float = SIGMA_DATA
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(σ̄) = σ_d²/(σ̄² + σ_d²) and c_out(σ̄) = σ̄ σ_d/√(σ̄² + σ_d²) (Karras et al. 2022, Table 1;
    Song et al. 2023, Appendix C with σ_min = 0; lesson 12, eq. 5).

    c_skip(0) = 1 and c_out(0) = 0: the boundary condition f(x, 0) = x holds for *any* network, so it never has
    to be learned. At large σ̄, c_skip → 0 and the network predicts x_0 itself (times σ_d).
    """
    sigma_bar = torch.as_tensor(sigma_bar, dtype=torch.float64)
    if (sigma_bar < 0).any():
        raise ValueError("sigma_bar must be >= 0")
    check_number("sigma_data", sigma_data, 0.0, above=True)
    c_skip = sigma_data**2 / (sigma_bar**2 + sigma_data**2)
    c_out = sigma_bar * sigma_data / (sigma_bar**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class Student(nn.Module):
    """A few-step student: x̂_0 = c_skip(t) x̄_t − c_out(t) ε_net(x_t, t), and an ε-model through x̂_0.

    ``net`` is any ε-network ``net(x_t, timesteps)`` (e.g. a copy of the teacher's U-Net). Its output enters
    with a minus sign because at low noise c_skip ≈ 1 and c_out ≈ σ̄, so x̂_0 ≈ x̄_t − σ̄_t ε = (x_t − σ_t ε)/α_t:
    a copy of the teacher starts out right where noise is low, and training mainly teaches it the high-noise
    end, where an ε-model's x̂_0 = (x_t − σ_t ε)/α_t divides its error by α_T ≈ 0.006 (lesson 12, §2).

    Calling the student returns ε̂ = (x_t − α_t x̂_0)/σ_t, so DDIM with the student reproduces its x̂_0 steps.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.net, self.schedule, self.sigma_data = net, schedule, float(sigma_data)
        alpha, sigma = schedule.sqrt_alpha_bars, schedule.sqrt_one_minus_alpha_bars
        c_skip, c_out = consistency_coefficients(sigma / alpha, sigma_data)
        where = next((p.device for p in net.parameters()), torch.device("cpu")) if isinstance(net, nn.Module) else None
        for name, table in {"alpha": alpha, "sigma": sigma, "c_skip": c_skip, "c_out": c_out}.items():
            # float32 buffers that follow the network to its device; rebuilt from the schedule, never stored
            self.register_buffer(name, table.float().to(where), persistent=False)

    def _check(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.shape != (x_t.shape[0],):
            raise ValueError(f"timesteps must have shape [{x_t.shape[0]}] (one per example), "
                             f"got {tuple(timesteps.shape)}")
        return self.schedule.check_timesteps(timesteps, lowest=0)  # integers in 0..T (t = 0: the boundary)

    def _table(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[timesteps].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def x0(self, x_t: torch.Tensor, timesteps: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        """x̂_0 = c_skip(t) x_t/α_t − c_out(t) ε_net(x_t, t) (lesson 12, eq. 5); exactly x_t at t = 0.

        ``condition`` (e.g. caption tokens, lesson 12 §6) is passed on to the network: ``net(x_t, t, *condition)``.
        """
        timesteps = self._check(x_t, timesteps)
        x_bar = x_t / self._table(self.alpha, timesteps, x_t)
        out = self.net(x_t, timesteps, *condition).to(x_t.dtype)
        return self._table(self.c_skip, timesteps, x_t) * x_bar - self._table(self.c_out, timesteps, x_t) * out

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − α_t x̂_0)/σ_t: the student read as an ε-model (defined for t ≥ 1)."""
        x0 = self.x0(x_t, timesteps, *condition)
        return (x_t - self._table(self.alpha, timesteps, x_t) * x0) / self._table(self.sigma, timesteps, x_t)


def without_dropout(net: nn.Module) -> nn.Module:
    """Sets every ``nn.Dropout`` of ``net`` to p = 0 (in place) and returns ``net`` (lesson 12, §2).

    A distillation target is a deterministic function of x_t: the teacher's two DDIM steps. A student trained
    with dropout regresses its *average over dropout masks* onto that target, yet samples with dropout off, a
    network it was never fitted as; and the target has no label noise for dropout to guard against. So the
    student's copy of the teacher distils with dropout off (the teacher was trained with it, against noisy ε).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return net


def x0_from_eps_model(eps_model: EpsModel, schedule: NoiseSchedule) -> X0Model:
    """The x̂_0-model of an ε-model: x̂_0 = (x_t − σ_t ε̂)/α_t (lesson 02), and x̂_0 = x_t at t = 0.

    The ε-model runs in full precision even inside a bfloat16 autocast: dividing by α_T ≈ 0.006 would turn
    bfloat16's three significant digits of ε into an error of about 0.5 in x̂_0 (lesson 12, §2).
    """
    def x0(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = _levels(schedule, timesteps, x_t)
        with torch.autocast(x_t.device.type, enabled=False):
            full = x_t.to(torch.promote_types(x_t.dtype, torch.float32))
            eps = eps_model(full, timesteps.clamp(min=1)).to(x_t.dtype)  # at t = 0, s = 0: ε is not used
        return (x_t - s * eps) / a
    return x0


def ddim_x0_step(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                 alpha_next: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step written with x̂_0: x_next = α_next x̂_0 + σ_next (x_t − α_t x̂_0)/σ_t.

    The ε̂ implied by x̂_0 is carried over unchanged (lesson 08, eq. 1 with η = 0); at σ_next = 0 it returns x̂_0.
    """
    return alpha_next * x0 + sigma_next * (x_t - alpha_t * x0) / sigma_t


def _grid_point(j: torch.Tensor, T: int, steps: int) -> torch.Tensor:
    """round(j T/steps): point j of a ``steps``-step grid (computed on j's device, rounding half to even)."""
    return torch.round(j.double() * T / steps).long()


def student_grid(T: int, steps: int) -> torch.Tensor:
    """The timesteps a ``steps``-step student visits, then 0: round(j T/steps) for j = steps, …, 1, 0.

    These are lesson 08's "trailing" timesteps (a test checks it), so DDIM with ``spacing="trailing"`` samples a
    student exactly where it was trained.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..T = {T}, got {steps!r}")
    return _grid_point(torch.arange(steps, -1, -1), T, steps)


def _pick_pairs(T: int, steps: int, batch: int, where: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t_next) of ``batch`` random steps of :func:`student_grid`, computed on the device from a random j
    (no table is copied from the host, so a recorded CUDA graph step can draw them)."""
    j = torch.randint(1, steps + 1, (batch,), device=where)
    return _grid_point(j, T, steps), _grid_point(j - 1, T, steps)


def progressive_target(teacher_x0: X0Model, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                       schedule: NoiseSchedule) -> torch.Tensor:
    """The x̃ of Salimans & Ho (2022, Algorithm 2; lesson 12, eq. 3): one DDIM step of the student from t with
    x̂_0 = x̃ lands where two DDIM steps of the teacher (t → t_mid → t_next, t_mid halfway) land:

    x̃ = (x_next − (σ_next/σ_t) x_t) / (α_next − (σ_next/σ_t) α_t).

    At t_next = 0 (σ_next = 0) this is the teacher's x_0 itself.
    """
    t_mid = (t + t_next) // 2
    (alpha_t, sigma_t), (alpha_mid, sigma_mid), (alpha_next, sigma_next) = (
        _levels(schedule, at, x_t) for at in (t, t_mid, t_next))
    with torch.no_grad():
        x_mid = ddim_x0_step(x_t, teacher_x0(x_t, t).to(x_t.dtype), alpha_t, sigma_t, alpha_mid, sigma_mid)
        x_next = ddim_x0_step(x_mid, teacher_x0(x_mid, t_mid).to(x_t.dtype), alpha_mid, sigma_mid, alpha_next,
                              sigma_next)
    ratio = sigma_next / sigma_t
    return (x_next - ratio * x_t) / (alpha_next - ratio * alpha_t)


def progressive_distillation_loss(student: Student, teacher_x0: X0Model, schedule: NoiseSchedule, x0: torch.Tensor,
                                  steps: int) -> torch.Tensor:
    """One batch of Salimans & Ho's loss for a ``steps``-step student of a 2·``steps``-step teacher:

    max(SNR_t, 1) ‖x̃ − x̂_0,student(x_t, t)‖² (their "truncated SNR" weighting), t on :func:`student_grid`.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= schedule.T // 2:
        raise ValueError(f"steps must be an int in 1..T/2 = {schedule.T // 2} (the teacher takes twice as many), "
                         f"got {steps!r}")
    t, t_next = _pick_pairs(schedule.T, steps, x0.shape[0], x0.device)
    x_t = schedule.q_sample(x0, t, torch.randn_like(x0))
    target = progressive_target(teacher_x0, x_t, t, t_next, schedule)
    weight = schedule.gather(schedule.snr, t, x0).float().clamp(min=1.0)
    return (weight * (student.x0(x_t, t).float() - target.float()) ** 2).mean()


class TargetNetwork:
    """θ⁻ of a consistency model: an exponential moving average of the student, θ⁻ ← μ θ⁻ + (1 − μ) θ.

    :meth:`update` runs at the start of every loss (after the previous optimiser step), so the whole training
    step stays one recordable function. μ = 0 is Song & Dhariwal's (2023) choice θ⁻ = stop-gradient(θ).
    """

    def __init__(self, student: Student, decay: float = 0.95) -> None:
        check_number("decay", decay, 0.0)
        if decay >= 1:
            raise ValueError(f"decay must be < 1 (1 would freeze the target at its start), got {decay}")
        self.model, self.decay = copy.deepcopy(student).eval().requires_grad_(False), float(decay)

    @torch.no_grad()
    def update(self, student: Student) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ (moving the target to the student's device first if needed)."""
        ours, theirs = list(self.model.parameters()), list(student.parameters())
        if ours[0].device != theirs[0].device:
            self.model.to(theirs[0].device)
            ours = list(self.model.parameters())
        torch._foreach_lerp_(ours, theirs, 1.0 - self.decay)


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """√(‖d‖² + c²) − c per example (Song & Dhariwal 2023, §3.3): ‖d‖²/2c near 0, ‖d‖ far away."""
    squared = difference.flatten(1).float().pow(2).sum(1)
    return (squared + c * c).sqrt() - c


def _condition_args(condition: torch.Tensor | None, rows: int, per: str) -> tuple[torch.Tensor, ...]:
    """The extra arguments ``(condition,)`` for the student's calls, or ``()`` without one; a condition must have
    one row per ``per`` (of which there are ``rows``)."""
    if condition is None:
        return ()
    if condition.shape[0] != rows:
        raise ValueError(f"condition must have one row per {per} ({rows}), got {tuple(condition.shape)}")
    return (condition,)


def consistency_loss(student: Student, target: TargetNetwork, schedule: NoiseSchedule, x0: torch.Tensor,
                     boundaries: int, teacher_x0: X0Model | None = None, huber_c: float | None = None,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
    """One batch of consistency distillation (with ``teacher_x0``) or training (without), Song et al. 2023:

    d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n)) with t_n on :func:`student_grid` (``boundaries`` steps).

    * distillation: x̂_{t_n} is one deterministic DDIM step of the teacher from x_{t_{n+1}} (Algorithm 2);
    * training: x̂_{t_n} = α_{t_n} x_0 + σ_{t_n} ε with the same x_0 and ε that made x_{t_{n+1}} (Algorithm 3):
      the one-sample estimate of the ODE step, exact as the steps shrink (their Theorem 2).

    d is the pseudo-Huber distance with c = 0.00054 √d unless ``huber_c`` is given (Song & Dhariwal 2023).
    ``condition`` (labels or caption tokens, one row per example) goes to the student and its target network
    both; a conditional teacher reads it through ``teacher_x0`` (:func:`minidiff.latent_consistency`).
    """
    extra = _condition_args(condition, x0.shape[0], "example")
    if not isinstance(boundaries, int) or isinstance(boundaries, bool) or not 1 <= boundaries <= schedule.T:
        raise ValueError(f"boundaries must be an int in 1..T = {schedule.T}, got {boundaries!r}")
    target.update(student)
    t, t_next = _pick_pairs(schedule.T, boundaries, x0.shape[0], x0.device)
    (alpha_t, sigma_t), (alpha_next, sigma_next) = _levels(schedule, t, x0), _levels(schedule, t_next, x0)
    noise = torch.randn_like(x0)
    x_t = alpha_t * x0 + sigma_t * noise
    with torch.no_grad():
        if teacher_x0 is not None:
            x_next = ddim_x0_step(x_t, teacher_x0(x_t, t).to(x0.dtype), alpha_t, sigma_t, alpha_next, sigma_next)
        else:
            x_next = alpha_next * x0 + sigma_next * noise
        goal = target.model.x0(x_next, t_next, *extra)
    c = huber_c if huber_c is not None else 0.00054 * x0[0].numel() ** 0.5
    return pseudo_huber(student.x0(x_t, t, *extra) - goal, c).mean()


@torch.no_grad()
def consistency_sample(student: Student, schedule: NoiseSchedule, x_T: torch.Tensor,
                       timesteps: Sequence[int] | None = None, steps: int = 1,
                       generator: torch.Generator | None = None, condition: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; lesson 12, eq. 8).

    x̂_0 = f(x_T, T); then for each further t: x_t = α_t x̂_0 + σ_t z with fresh noise z, and x̂_0 = f(x_t, t).
    ``timesteps`` (decreasing, the first = T) default to :func:`student_grid` of ``steps``; ``condition``
    (labels or caption tokens, one row per sample) is passed to the student at every call.
    """
    x = _start(x_T)
    extra = _condition_args(condition, x.shape[0], "sample")
    timesteps = list(timesteps) if timesteps is not None else timestep_sequence(schedule.T, steps, "trailing")
    if not timesteps or timesteps[0] != schedule.T or any(a <= b for a, b in itertools.pairwise(timesteps)):
        raise ValueError(f"timesteps must decrease from T = {schedule.T} and stay >= 1, got {timesteps}")
    x0 = None
    for t in timesteps:
        if x0 is not None:
            alpha, sigma = float(schedule.sqrt_alpha_bars[t]), float(schedule.sqrt_one_minus_alpha_bars[t])
            x = alpha * x0 + sigma * randn_like(x0, generator)
        x0 = student.x0(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), *extra)
    return _finite(x0, "consistency sampling")


def student_card(kind: str, steps: int, teacher: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card fields that rebuild a :class:`Student` around its stored network (see :func:`load_student`)."""
    if kind not in ("progressive", "consistency_distillation", "consistency_training"):
        raise ValueError(f"kind must be progressive, consistency_distillation or consistency_training, got {kind!r}")
    return {"student": {"kind": kind, "steps": steps, "teacher": teacher, "sigma_data": SIGMA_DATA}} | (extra or {})


def load_student(name: str, device: torch.device | str | None = None, directory: Any = None) -> Student:
    """A shipped (or recipe-made) student: its network from :func:`minidiff.pretrained`, wrapped as a
    :class:`Student` on the schedule and σ_data its card records. ``student.card`` is the card."""
    from minidiff.weights import pretrained, schedule_from_card  # weights imports the networks; keep this light

    net = pretrained(name, device, directory)
    if "student" not in net.card:
        raise ValueError(f"{name!r} is not a distilled student (its card has no 'student' entry)")
    student = Student(net, schedule_from_card(net.card), net.card["student"]["sigma_data"]).to(
        next(net.parameters()).device).eval()
    student.card = net.card
    return student
