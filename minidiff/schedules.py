"""Noise schedules and the forward process q (lesson 01).

Timestep convention, used everywhere in minidiff
-------------------------------------------------
We follow the DDPM paper: the data is x_0 and the noisy variables are x_1, …, x_T.
Every per-timestep table of a :class:`NoiseSchedule` has length ``T + 1`` and is indexed
by the paper's t directly, so ``schedule.alpha_bars[t]`` *is* ᾱ_t. Entry 0 describes the
clean data: β_0 = 0, α_0 = 1, ᾱ_0 = 1 (no noise yet). Valid t is therefore

* 0..T for :meth:`NoiseSchedule.q_sample` (t = 0 returns x_0 itself),
* 1..T for everything that involves a step x_{t-1} → x_t or its reverse.

A batch of timesteps is a 1-D integer tensor with one entry per example (or a plain int
shared by the batch). All tables are kept in float64 and cast to the data's dtype and
device when used.
"""

from __future__ import annotations

import math

import torch

Timesteps = int | torch.Tensor


# ---------------------------------------------------------------------------------------
# Beta schedules (lesson 01, section "Choosing the schedule")
# ---------------------------------------------------------------------------------------


def _check_num_steps(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an int >= 1, got {T!r}")


def linear_betas(T: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """β_1..β_T spaced linearly from ``start`` to ``end`` (Ho et al. 2020, §4: 1e-4 to 0.02 for T = 1000).

    The defaults are meant for T = 1000; for other T, scale both ends by 1000/T to keep
    the same total amount of noise.
    """
    _check_num_steps(T)
    for name, value in (("start", start), ("end", end)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be a beta in (0, 1), got {value}")
    if start > end:
        raise ValueError(f"start ({start}) must not exceed end ({end}): betas grow with t")
    return torch.linspace(start, end, T, dtype=torch.float64)


def betas_from_alpha_bars(alpha_bars: torch.Tensor, max_beta: float = 0.999) -> torch.Tensor:
    """Invert ᾱ_t = Π_{s≤t} (1 − β_s): β_t = 1 − ᾱ_t / ᾱ_{t−1}, clipped to ``max_beta``.

    ``alpha_bars`` holds ᾱ_1..ᾱ_T (ᾱ_0 = 1 is implied). Clipping avoids β_T = 1, which
    would make the last step destroy the signal completely and α_T = 0 (Nichol & Dhariwal 2021, §3.2).
    """
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
    alpha_bars = torch.as_tensor(alpha_bars, dtype=torch.float64)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    return (1.0 - alpha_bars / previous).clamp(min=1e-12, max=max_beta)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2).

    The small offset ``s`` keeps β_1 from being vanishingly small; the betas are then read
    off ᾱ with :func:`betas_from_alpha_bars`.
    """
    _check_num_steps(T)
    if s < 0:
        raise ValueError(f"s (the cosine offset) must be >= 0, got {s}")
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    return betas_from_alpha_bars(f[1:] / f[0], max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """The sigmoid schedule (Jabri et al. 2022; Chen 2023, Algorithm 1) on ᾱ, read back as betas.

    ᾱ(τ) = (σ(end/τ_s) − σ((τ(end − start) + start)/τ_s)) / (σ(end/τ_s) − σ(start/τ_s)) for τ = t/T,
    where τ_s is ``tau``: larger ``tau`` gives a flatter, more linear-in-time decay.
    """
    _check_num_steps(T)
    if not start < end:
        raise ValueError(f"start ({start}) must be smaller than end ({end})")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    times = torch.arange(1, T + 1, dtype=torch.float64) / T
    top = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    bottom = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    alpha_bars = (top - torch.sigmoid((times * (end - start) + start) / tau)) / (top - bottom)
    return betas_from_alpha_bars(alpha_bars.clamp(min=1e-12), max_beta)


# ---------------------------------------------------------------------------------------
# The forward process
# ---------------------------------------------------------------------------------------


class NoiseSchedule:
    """The forward process q defined by β_1..β_T, with every quantity that later lessons need.

    Tables (length T + 1, indexed by the paper's t, entry 0 = clean data; see the module doc):

    * ``betas``       β_t, the variance added at step t (β_0 = 0)
    * ``alphas``      α_t = 1 − β_t
    * ``alpha_bars``  ᾱ_t = Π_{s=1}^t α_s, the signal kept after t steps (ᾱ_0 = 1)
    * ``snr``         ᾱ_t / (1 − ᾱ_t), the signal-to-noise ratio of q(x_t | x_0) (∞ at t = 0)
    * ``posterior_variances``  β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) (variance of q(x_{t−1} | x_t, x_0), lesson 02 §2)
    * ``posterior_x0_coefs``, ``posterior_xt_coefs``: μ̃_t = coef_x0 · x_0 + coef_xt · x_t
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor of β_1..β_T, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            raise ValueError("betas must be finite")
        if (betas <= 0).any() or (betas >= 1).any():
            bad = betas[(betas <= 0) | (betas >= 1)][0].item()
            raise ValueError(f"every beta must lie strictly inside (0, 1); found {bad}")
        self.T = betas.numel()
        alpha_bar_T = float(torch.prod(1.0 - betas))
        if alpha_bar_T < 1e-30:  # float32 (samples, networks) cannot represent √ᾱ_T and 1/√ᾱ_T any more
            raise ValueError(f"this schedule's ᾱ_T = {alpha_bar_T:.3g} underflows float32 arithmetic (x̂_0 = x_t/√ᾱ_t "
                             "becomes inf, then NaN): use smaller betas or fewer steps (ᾱ_T ≥ 1e-30)")
        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([zero, betas])
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        with torch.no_grad():
            self.snr = self.alpha_bars / (1.0 - self.alpha_bars)  # ∞ at t = 0, on purpose
        # α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t), kept as tables: the distilled and flow models of lessons 12 and 14
        # gather them per example on the device (σ_t from 1 − ᾱ_t in float64, exact near t = 0)
        self.sqrt_alpha_bars, self.sqrt_one_minus_alpha_bars = self.alpha_bars.sqrt(), (1.0 - self.alpha_bars).sqrt()
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.alpha_bars_prev = previous  # ᾱ_{t−1}, with ᾱ_{−1} := 1 so that entry 0 is harmless
        # q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (derived in lesson 02). At t = 1, β̃_1 = 0:
        # given x_0 there is nothing left to guess about x_0.
        one_minus = 1.0 - self.alpha_bars
        one_minus_safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
        self.posterior_variances = torch.where(one_minus > 0, self.betas * (1.0 - previous) / one_minus_safe,
                                               torch.zeros_like(one_minus))
        self.posterior_x0_coefs = torch.where(one_minus > 0, previous.sqrt() * self.betas / one_minus_safe,
                                              torch.ones_like(one_minus))
        self.posterior_xt_coefs = torch.where(one_minus > 0, self.alphas.sqrt() * (1.0 - previous) / one_minus_safe,
                                              torch.zeros_like(one_minus))

    @classmethod
    def linear(cls, T: int = 1000, start: float = 1e-4, end: float = 0.02) -> NoiseSchedule:
        """A schedule from :func:`linear_betas`."""
        return cls(linear_betas(T, start, end))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """A schedule from :func:`cosine_betas`."""
        return cls(cosine_betas(T, s, max_beta))

    @classmethod
    def sigmoid(cls, T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> NoiseSchedule:
        """A schedule from :func:`sigmoid_betas`."""
        return cls(sigmoid_betas(T, start, end, tau))

    @classmethod
    def from_spec(cls, spec: dict) -> NoiseSchedule:
        """The schedule a weight card records, e.g. ``{"kind": "linear", "T": 1000}`` (kind: linear/cosine/sigmoid)."""
        kinds = {"linear": cls.linear, "cosine": cls.cosine, "sigmoid": cls.sigmoid}
        if not isinstance(spec, dict) or spec.get("kind") not in kinds or "T" not in spec:
            raise ValueError(f"a schedule spec is {{'kind': one of {sorted(kinds)}, 'T': int}}, got {spec!r}")
        return kinds[spec["kind"]](spec["T"])

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.T}, beta_1={self.betas[1].item():.3g}, beta_T={self.betas[-1].item():.3g}, "
                f"alpha_bar_T={self.alpha_bars[-1].item():.3g})")

    # -- indexing -----------------------------------------------------------------------

    def check_timesteps(self, t: Timesteps, lowest: int = 1) -> torch.Tensor:
        """Return ``t`` as an int64 tensor after checking that every entry is in ``lowest``..T."""
        if isinstance(t, bool) or (not isinstance(t, int | torch.Tensor)):
            raise ValueError(f"t must be an int or an integer tensor of timesteps, got {type(t).__name__}")
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps (the paper's t), got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or a 1-D batch of timesteps, got shape {tuple(t.shape)}")
        # Checking needs the values on the host; while a CUDA graph records a step it cannot read them (the same
        # code was checked in the eager warm-up steps before the recording, see minidiff.graphs).
        recording = t.is_cuda and torch.cuda.is_current_stream_capturing()
        if t.numel() and not recording and (t.min() < lowest or t.max() > self.T):
            bad = t[(t < lowest) | (t > self.T)].flatten()[0].item()
            raise ValueError(f"timestep t must be in {lowest}..{self.T} for this schedule, got {bad}")
        return t.long()

    def _table_on(self, table: torch.Tensor, where: torch.device) -> torch.Tensor:
        """``table`` on device ``where``, copied once and kept: a copy on every call would cost a host round trip
        per training step (and cannot be recorded in a CUDA graph)."""
        if table.device == where:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (table.data_ptr(), str(where))
        if key not in cache:
            cache[key] = table.to(where)
        return cache[key]

    def gather(self, table: torch.Tensor, t: Timesteps, like: torch.Tensor, lowest: int = 1) -> torch.Tensor:
        """Pick ``table[t]`` for each example and shape it to broadcast against ``like`` ([B, 1, 1, …]).

        ``like`` supplies the batch size, dtype and device. A scalar t is shared by the whole batch.
        """
        t = self.check_timesteps(t, lowest)
        if t.ndim == 1:
            if like.ndim == 0 or like.shape[0] != t.shape[0]:
                raise ValueError(f"t has {t.shape[0]} timesteps but x has batch shape {tuple(like.shape[:1])}: "
                                 "give one timestep per example (or a single int)")
            values = self._table_on(table, t.device)[t].to(device=like.device, dtype=like.dtype)
            return values.reshape(-1, *([1] * (like.ndim - 1)))
        return table[t].to(device=like.device, dtype=like.dtype)

    # -- the forward process ------------------------------------------------------------

    def q_step(self, x_prev: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """One forward step, q(x_t | x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t I), by reparameterisation (lesson 01, eq. 1).

        x_t = √α_t x_{t−1} + √β_t ε with ε = ``noise`` ~ N(0, I); t in 1..T.
        """
        _check_same_shape(x_prev=x_prev, noise=noise)
        sqrt_alpha = self.gather(self.alphas, t, x_prev).sqrt()
        sqrt_beta = self.gather(self.betas, t, x_prev).sqrt()
        return sqrt_alpha * x_prev + sqrt_beta * noise

    def q_mean_variance(self, x0: torch.Tensor, t: Timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean √ᾱ_t x_0 and variance (1 − ᾱ_t) of the closed form q(x_t | x_0) (lesson 01, eq. 3); t in 0..T."""
        alpha_bar = self.gather(self.alpha_bars, t, x0, lowest=0)
        return alpha_bar.sqrt() * x0, (1.0 - alpha_bar).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """Jump straight to step t: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a sample of q(x_t | x_0) (lesson 01, eq. 3).

        t in 0..T (t = 0 returns x_0). ``noise`` is ε ~ N(0, I) with the shape of ``x0``.
        """
        _check_same_shape(x0=x0, noise=noise)
        for name, tensor in (("x0", x0), ("noise", noise)):
            if not tensor.is_floating_point():  # an integer ᾱ_t would round to 0 or 1: pure noise, silently
                raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}; scale 8-bit images to "
                                 "[-1, 1] first, e.g. x0 = images.float() / 127.5 - 1")
        alpha_bar = self.gather(self.alpha_bars, t, x0, lowest=0)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise

    def q_mean_variance_between(self, x_s: torch.Tensor, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_s) for s < t: mean √(ᾱ_t/ᾱ_s) x_s, variance 1 − ᾱ_t/ᾱ_s (lesson 01, eq. 3b).

        The jump between two noise levels that DDIM and every strided sampler use (lesson 08); s = 0 gives (3).
        """
        s, t = int(self.check_timesteps(s, lowest=0)), int(self.check_timesteps(t, lowest=0))
        if not s < t:
            raise ValueError(f"q(x_t | x_s) needs s < t, got s={s}, t={t}")
        ratio = float(self.alpha_bars[t] / self.alpha_bars[s])
        return ratio**0.5 * x_s, torch.full_like(x_s, 1.0 - ratio)

    # -- the posterior q(x_{t−1} | x_t, x_0) (derived in lesson 02) -----------------------

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """μ̃_t(x_t, x_0) = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t (Ho et al. 2020, eq. 7)."""
        _check_same_shape(x0=x0, x_t=x_t)
        return (self.gather(self.posterior_x0_coefs, t, x_t) * x0
                + self.gather(self.posterior_xt_coefs, t, x_t) * x_t)

    # -- conversions between what a network can predict (lessons 01, 02, 04) ---------------

    def x0_from_eps(self, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t: the closed form solved for x_0."""
        _check_same_shape(x_t=x_t, eps=eps)
        alpha_bar = self.gather(self.alpha_bars, t, x_t)
        return (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: Timesteps, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t): the closed form solved for ε."""
        _check_same_shape(x_t=x_t, x0=x0)
        alpha_bar = self.gather(self.alpha_bars, t, x_t)
        return (x_t - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()

    def v_from_eps(self, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """The velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4), from ε and x_t."""
        x0 = self.x0_from_eps(x_t, t, eps)
        alpha_bar = self.gather(self.alpha_bars, t, x_t)
        return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0

    def eps_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v, the inverse of :meth:`v_from_eps`."""
        _check_same_shape(x_t=x_t, v=v)
        alpha_bar = self.gather(self.alpha_bars, t, x_t)
        return (1.0 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v

    def x0_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        _check_same_shape(x_t=x_t, v=v)
        alpha_bar = self.gather(self.alpha_bars, t, x_t)
        return alpha_bar.sqrt() * x_t - (1.0 - alpha_bar).sqrt() * v

    def score_from_eps(self, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """∇ log q(x_t | x_0) = −ε / √(1 − ᾱ_t); with a network's ε̂ it estimates the score of q_t (lesson 04)."""
        _check_same_shape(x_t=x_t, eps=eps)
        return -eps / (1.0 - self.gather(self.alpha_bars, t, x_t)).sqrt()

    def eps_from_score(self, x_t: torch.Tensor, t: Timesteps, score: torch.Tensor) -> torch.Tensor:
        """ε = −√(1 − ᾱ_t) ∇ log q_t(x_t), the inverse of :meth:`score_from_eps`."""
        _check_same_shape(x_t=x_t, score=score)
        return -(1.0 - self.gather(self.alpha_bars, t, x_t)).sqrt() * score

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """t ~ Uniform{1, …, T}, one per example (Algorithm 1, line 3), drawn on the generator's device."""
        draw_on = generator.device if generator is not None else device
        return torch.randint(1, self.T + 1, (batch_size,), generator=generator, device=draw_on).to(device)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the arguments when tensors that must match in shape do not."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {described} must have the same shape")
