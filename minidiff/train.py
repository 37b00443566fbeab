"""The training loop every lesson uses, and the DDPM loss (lesson 03, Algorithm 1).

``fit`` is deliberately plain: sample a batch, compute a loss, step AdamW, update an EMA copy of the
weights. What it adds over a bare loop is what a notebook needs: a progress bar with the loss, a loss
history, a clear stop on a non-finite loss, and Ctrl-C / "interrupt kernel" keeping the weights
trained so far.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff import distributed
from minidiff.contracts import EpsModel
from minidiff.ema import EMA
from minidiff.graphs import WARMUP_STEPS, CapturedTrainStep, CaptureError
from minidiff.mixed_precision import Bfloat16Weights
from minidiff.runtime import check_number, randn_like
from minidiff.runtime import device as default_device
from minidiff.schedules import NoiseSchedule

Batch = Any


@dataclass
class TrainResult:
    """What ``fit`` returns: the loss of every step, the EMA model, and how the run ended."""

    losses: list[float] = field(default_factory=list)
    ema: EMA | None = None
    seconds: float = 0.0
    interrupted: bool = False
    timed_out: bool = False

    def ema_model(self) -> nn.Module:
        """A copy of the EMA network ready to sample with and to save: float32, contiguous memory, eval mode.

        A copy, so that calling this from a ``fit`` callback cannot move the weights a recorded CUDA graph writes.
        """
        if self.ema is None:
            raise ValueError("this run kept no EMA (fit(ema_decay=None)); use the trained model itself")
        return copy.deepcopy(self.ema.model).float().to(memory_format=torch.contiguous_format).eval()

    @property
    def steps(self) -> int:
        """Number of optimisation steps taken."""
        return len(self.losses)

    def smoothed_losses(self, window: int = 50) -> list[float]:
        """Running mean of the loss over ``window`` steps (for plotting)."""
        out, total = [], 0.0
        for index, loss in enumerate(self.losses):
            total += loss - (self.losses[index - window] if index >= window else 0.0)
            out.append(total / min(index + 1, window))
        return out


def _to_device(batch: Batch, target: torch.device, channels_last: bool = False) -> Batch:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(target, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.ndim == 4 else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(item, target, channels_last) for item in batch)
    return batch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, cosine_decay: bool = False) -> float:
    """The learning-rate factor at ``step``: a linear warm-up over ``warmup_steps``, then 1 or a cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cosine_decay:
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return 1.0


@dataclass
class SpeedSettings:
    """The device-specific knobs of ``fit``, which change speed and never the maths (beyond float rounding).

    * ``bf16``: autocast the forward pass to bfloat16 (CUDA only);
    * ``channels_last``: NHWC convolution weights and image batches (CUDA only; tensor-core friendly);
    * fused AdamW on CUDA: the whole update in a few kernels (small networks are launch-bound on a GPU).
    """

    target: torch.device
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        on_cuda = self.target.type == "cuda"
        self.bf16, self.channels_last = self.bf16 and on_cuda, self.channels_last and on_cuda

    def prepare(self, model: nn.Module, lr: float, weight_decay: float,
                capturable: bool = False) -> torch.optim.Optimizer:
        """Move ``model`` to the device in training mode and return its AdamW optimiser.

        ``capturable``: the optimiser a CUDA graph can record: its learning rate and step count live in device
        tensors, so changing them between replays needs no new recording.
        """
        model.to(self.target).train()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if capturable:
            return torch.optim.AdamW(model.parameters(), lr=torch.tensor(lr, device=self.target),
                                     weight_decay=weight_decay, fused=True, capturable=True)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=self.target.type == "cuda")

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward pass (a no-op unless bf16 is on)."""
        # no weight-cast cache: a CUDA graph must recompute the casts on every replay, and eager loses little
        return torch.autocast(device_type=self.target.type, dtype=torch.bfloat16, enabled=self.bf16,
                              cache_enabled=False)


def _check_losses(values: list[float], first_step: int, lr: float) -> None:
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss became {value} at step {first_step + offset}: training diverged. Lower the learning "
                f"rate (now {lr}), keep gradient clipping on, or check the data for NaNs.")


def _set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # in place: a recorded CUDA graph reads this very tensor
        else:
            group["lr"] = value


def fit(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], next_batch: Callable[[], Batch],
        steps: int, lr: float = 1e-3, weight_decay: float = 0.0, ema_decay: float | None = 0.999,
        grad_clip: float | None = 1.0, device: torch.device | str | None = None, bf16: bool = False,
        progress: bool = True, warmup_steps: int = 0, cosine_decay: bool = False,
        result: TrainResult | None = None, channels_last: bool = False,
        time_limit: float | None = None, callback: Callable[[TrainResult], None] | None = None,
        callback_every: int = 100, cuda_graph: bool | None = None, bf16_weights: bool = False) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on ``loss_fn(model, next_batch())`` (Algorithm 1's loop).

    Args:
        next_batch: returns one batch (tensors are moved to the device here).
        ema_decay: keep an EMA of the weights with this decay (None: no EMA).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        bf16, channels_last: speed knobs for CUDA, ignored elsewhere (:class:`SpeedSettings`).
        warmup_steps, cosine_decay: the learning-rate schedule (:func:`warmup_cosine`).
        result: continue a previous run of the same model (its loss history and EMA are extended).
        time_limit: stop after this many seconds even if fewer than ``steps`` were taken (the learning-rate
            schedule is still laid out over ``steps``); ``result.timed_out`` then says so.
        callback: called as ``callback(result)`` every ``callback_every`` steps and at the end, e.g. to redraw a
            live loss curve in a notebook; a callback that returns True stops the training there.
        cuda_graph: record the whole step (forward, backward, clipping, AdamW, EMA) as a CUDA graph and replay
            it (:mod:`minidiff.graphs`). ``None`` (the default): on when training on CUDA, falling back to eager
            steps with a warning if the step cannot be recorded; ``True``: insist; ``False``: eager. On the
            graph path the loss is read back every 25 steps, so a diverged run stops up to 25 steps late.
        bf16_weights: run the forward and backward passes on a bfloat16 copy of the weights and let AdamW and the
            EMA update float32 master weights (:mod:`minidiff.mixed_precision`); ``model`` keeps the master
            weights. It replaces ``bf16``'s autocast, which casts the weights again in every pass. Works on any
            device (on a CPU it is slow: it is there for the tests); off by default until the benchmark has
            measured it on a GPU.

    Under ``torchrun`` (a process group set up by :func:`~minidiff.distributed.init_from_env`), each rank trains
    the model wrapped in DistributedDataParallel on the batches its own ``next_batch`` draws: the gradients, hence
    the weights and the EMA, are the same on every rank; the recorded losses are the ranks' average; only rank 0
    shows progress; a time limit or a callback that stops one rank stops all. Steps are eager there (no CUDA graph).

    Interrupting (Ctrl-C, or "interrupt the kernel" in Jupyter) stops cleanly: the model keeps the
    weights trained so far and the result says ``interrupted=True``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    check_number("lr", lr, 0.0, above=True)
    check_number("weight_decay", weight_decay, 0.0)
    if grad_clip is not None:  # 0 would zero every update and a negative norm would flip it: refuse both
        check_number("grad_clip", grad_clip, 0.0, above=True)
    if time_limit is not None:
        check_number("time_limit", time_limit, 0.0, above=True)
    if not isinstance(callback_every, int) or isinstance(callback_every, bool) or callback_every < 1:
        raise ValueError(f"callback_every must be an int >= 1, got {callback_every!r}")
    if cuda_graph not in (None, True, False):
        raise ValueError(f"cuda_graph must be None (automatic), True or False, got {cuda_graph!r}")
    if not isinstance(bf16_weights, bool):
        raise ValueError(f"bf16_weights must be True or False, got {bf16_weights!r}")
    speed = SpeedSettings(torch.device(device) if device is not None else default_device(), bf16, channels_last)
    if cuda_graph and speed.target.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but training runs on {speed.target}")
    parallel = distributed.active()
    if cuda_graph and parallel:
        raise ValueError("cuda_graph=True cannot be used with several ranks (DDP's gradient averaging is not "
                         "recorded here): leave cuda_graph=None")
    if bf16_weights and parallel:
        raise ValueError("bf16_weights=True cannot be used with several ranks (DDP would average the bfloat16 "
                         "copy's gradients, not the master weights'): leave it off under torchrun")
    use_graph = speed.target.type == "cuda" and cuda_graph is not False and not parallel
    optimizer = speed.prepare(model, lr, weight_decay, capturable=use_graph)
    precision = Bfloat16Weights(model) if bf16_weights else None  # made on the device, after prepare
    net = distributed.wrap(model, speed.target) if parallel else model  # DDP copies rank 0's weights to all
    if parallel and distributed.rank() > 0:  # every rank its own t and ε (rank 0 keeps the single-process stream)
        torch.manual_seed(distributed.rank_seed(torch.initial_seed()))
    result = result or TrainResult()
    if result.ema is not None:  # continuing a run: its EMA must average this very network, not another one
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        if shapes != {name: tuple(p.shape) for name, p in result.ema.model.named_parameters()}:
            raise ValueError("result= comes from a run of a different network (its EMA's parameters do not match "
                             "this model's): pass the result of a run of this model, or none")
    if ema_decay is not None and result.ema is None:
        result.ema = EMA(model, ema_decay)
    if result.ema is not None:
        result.ema.model.to(speed.target)
    ema = result.ema

    def forward_loss(batch: Batch) -> torch.Tensor:
        if precision is not None:  # the bfloat16 copy casts its own inputs: no autocast
            return loss_fn(precision.working, batch)
        with speed.autocast():
            return loss_fn(net, batch)  # e.g. L_simple at random t and ε (Algorithm 1, lines 2-5)

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        if precision is not None:
            precision.gradients_to_master()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        optimizer.step()  # the gradient step of line 5
        if precision is not None:
            precision.weights_from_master()
        if ema is not None:
            ema.blend(model)

    def zero_grad(set_to_none: bool) -> None:
        if precision is not None:
            precision.zero_grad(set_to_none)
        else:
            optimizer.zero_grad(set_to_none=set_to_none)

    def train_step(batch: Batch) -> torch.Tensor:
        """One whole step on the device, as the CUDA graph records it."""
        loss = forward_loss(batch)
        update(loss)
        return loss.detach()

    captured = CapturedTrainStep(train_step, lambda: zero_grad(True)) if use_graph else None
    pending: list[torch.Tensor] = []  # graph path: losses not yet read back from the GPU

    def read_back() -> None:
        if pending:
            values = torch.stack(pending).float().tolist()
            _check_losses(values, result.steps, lr)
            result.losses.extend(values)
            pending.clear()

    start = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress or not distributed.is_main(), desc="training", leave=True)
    side = torch.cuda.Stream(speed.target) if use_graph else None
    try:
        for step in bar:
            batch = _to_device(next_batch(), speed.target, speed.channels_last)
            _set_learning_rate(optimizer, lr * warmup_cosine(step, steps, warmup_steps, cosine_decay))
            if ema is not None:
                ema.advance()
            if captured is not None and step >= WARMUP_STEPS and captured.graph is None:
                torch.cuda.current_stream(speed.target).wait_stream(side)
                try:
                    captured.capture(batch)
                except CaptureError as error:
                    if cuda_graph:
                        raise
                    warnings.warn(f"{error} Training goes on with eager steps.", stacklevel=2)
                    captured = None
            if captured is not None and captured.matches(batch):
                pending.append(captured(batch).clone())
                if len(pending) >= 25:
                    read_back()
            else:  # an eager step: the loss is checked before it can change the weights
                zero_grad(captured is None or captured.graph is None)
                on_side = side is not None and captured is not None  # warm-ups before a capture: a side stream
                if on_side:
                    side.wait_stream(torch.cuda.current_stream(speed.target))
                with torch.cuda.stream(side) if on_side else nullcontext():
                    loss = forward_loss(batch)
                    pending.append(distributed.mean(loss.detach()))  # the ranks' average, for the record
                    read_back()
                    update(loss)
                    del loss  # a live loss keeps its autograd graph, whose nodes remember this step's stream
            if (step % 25 == 0 or step == steps - 1) and result.losses:
                bar.set_postfix(loss=f"{sum(result.losses[-25:]) / len(result.losses[-25:]):.4f}")
            if callback is not None and (result.steps + len(pending)) % callback_every == 0:
                read_back()
                if distributed.any_rank(callback(result) is True, speed.target):
                    break
            if time_limit is not None and distributed.any_rank(time.perf_counter() - start >= time_limit,
                                                               speed.target):
                result.timed_out = True
                break
    except KeyboardInterrupt:
        result.interrupted = True
        print(f"training interrupted after {result.steps + len(pending)} steps: the model keeps the weights "
              "trained so far")
    finally:
        bar.close()
        if side is not None:
            torch.cuda.current_stream(speed.target).wait_stream(side)
        read_back()
        result.seconds += time.perf_counter() - start
        model.eval()
    if callback is not None:
        callback(result)
    return result


#: What a network can be trained to predict at x_t: the noise ε (DDPM), the clean data x_0, or
#: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022; lesson 14, eq. 7).
PREDICTION_TARGETS = ("eps", "x0", "v")


def ddpm_loss(model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor,
              generator: torch.Generator | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, target: str = "eps") -> torch.Tensor:
    """Algorithm 1 of Ho et al. (2020): L_simple = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², t ~ U{1..T}.

    The mean over every dimension is used (a constant factor away from the sum in the paper). ``t`` and
    ``noise`` are drawn here unless given (giving them makes the loss deterministic, e.g. to check it).
    ``target`` "x0" or "v" regresses the network onto x_0 or onto v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 instead
    (:data:`PREDICTION_TARGETS`); read such a model as an ε-model with :func:`minidiff.contracts.eps_from_v`.
    In ε-terms the v-loss weights each t by 1/ᾱ_t (lesson 14, eq. 8).
    """
    if target not in PREDICTION_TARGETS:
        raise ValueError(f"target must be one of {PREDICTION_TARGETS}, got {target!r}")
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator, device=x0.device)
    if noise is None:
        noise = randn_like(x0, generator)
    x_t = schedule.q_sample(x0, t, noise)
    prediction = model(x_t, t)
    if target == "eps":
        wanted = noise
    elif target == "x0":
        wanted = x0
    else:  # from x_0 and ε directly: going through x̂_0 would divide by √ᾱ_t ≈ 5·10⁻⁵ at the cosine schedule's end
        alpha_bar = schedule.gather(schedule.alpha_bars, t, x0)
        wanted = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    return ((wanted - prediction.float()) ** 2).mean()


def random_rows(data: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int,
                generator: torch.Generator | None = None) -> Callable[[], Batch]:
    """A ``next_batch`` for ``fit``: each call returns ``batch_size`` rows of ``data`` drawn with replacement.

    ``data`` may be a tuple of tensors with the same number of rows (images and labels, say): each call then
    returns a tuple of the same rows of each. The rows are drawn on ``generator``'s device (without one, on the
    data's device, from its default generator).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tensors = data if isinstance(data, tuple) else (data,)
    if len({len(tensor) for tensor in tensors}) != 1:
        raise ValueError(f"the tensors in data must have the same number of rows, got {[len(t) for t in tensors]}")
    if len(tensors[0]) == 0:
        raise ValueError("data is empty: there are no rows to draw batches from")

    def next_batch() -> Batch:
        # drawn on the generator's device: a GPU generator keeps the whole step on the GPU (no host round trip)
        where = generator.device if generator is not None else tensors[0].device
        index = torch.randint(0, len(tensors[0]), (batch_size,), generator=generator, device=where)
        index = index.to(tensors[0].device)
        rows = tuple(tensor[index] for tensor in tensors)
        return rows if isinstance(data, tuple) else rows[0]

    return next_batch


def conditional_ddpm_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor,
                          label_dropout: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """L_simple for ε_θ(x_t, t, y), with each label replaced by the null class with probability ``label_dropout``.

    One network then learns both ε(x_t, t, y) and the unconditional ε(x_t, t, ∅) (Ho & Salimans 2022,
    Algorithm 1), which classifier-free guidance combines (lesson 09). ``model`` needs a ``null_class``.
    ``labels`` may be class labels [B] or caption tokens [B, L] (lesson 10: caption dropout).
    """
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be a probability in [0, 1], got {label_dropout}")
    if labels.ndim == 0 or labels.shape[0] != x0.shape[0]:
        raise ValueError(f"labels must have one row per image ([{x0.shape[0]}] or [{x0.shape[0]}, L]), "
                         f"got {tuple(labels.shape)}")
    where = generator.device if generator is not None else labels.device
    dropped = torch.rand(labels.shape[0], generator=generator, device=where).to(labels.device) < label_dropout
    dropped = dropped.view(-1, *([1] * (labels.ndim - 1)))  # a caption is dropped whole, never word by word
    labels = torch.where(dropped, torch.full_like(labels, model.null_class), labels)
    return ddpm_loss(lambda x_t, t: model(x_t, t, labels), schedule, x0, generator)


def classifier_loss(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    schedule: NoiseSchedule | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy −log p(y | x); with a ``schedule``, on x_t ~ q(x_t | x_0) at random t (lesson 09).

    A classifier used for guidance must read noisy inputs, since guidance asks it about x_t at every
    step; trained on clean digits only, its gradients on x_t would be meaningless.
    """
    if schedule is None:
        return nn.functional.cross_entropy(classifier(images), labels)
    t = schedule.sample_timesteps(images.shape[0], generator, device=images.device)
    noisy = schedule.q_sample(images, t, randn_like(images, generator))
    return nn.functional.cross_entropy(classifier(noisy, t), labels)
