"""CUDA graphs: why a small network is slow on a big GPU, and how to make it fast (lesson 07).

A GPU kernel for a 1.7M-parameter U-Net on a batch of 256 digits runs in a few microseconds, but Python and
PyTorch need about as long, or longer, to *launch* each one, and one training step of that U-Net launches well
over a thousand kernels (forward, backward, AdamW, the EMA). The GPU spends most of the step waiting for the
next launch: the step is *launch-bound*, and a bigger GPU does not help.

A CUDA graph records the kernels of one step once, with the addresses of every tensor they touch, and replays
the whole recording with a single launch. The price is that the recording is frozen:

* the tensors must stay where they are: inputs are copied into *static* buffers before each replay, and
  outputs are read from static buffers after it;
* nothing in the step may depend on a Python value that changes (a learning rate held as a float, a
  ``.item()``, a CPU random draw): whatever varies must live in a device tensor the graph reads;
* random numbers must come from the device's own generator, which CUDA graphs know how to advance on every
  replay (the loss and dropout then draw fresh noise each step, as they should).

:class:`CapturedTrainStep` records forward, backward, gradient clipping, AdamW and the EMA of
:func:`minidiff.train.fit`; :func:`graphed` wraps an ε-model for the samplers. Both fall back to ordinary
(eager) execution away from CUDA, so the code that uses them runs unchanged on a laptop.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

#: Eager steps before a capture: they initialise cuDNN/cuBLAS workspaces and the optimiser state, which a
#: graph cannot do while recording. They are real training steps, not thrown away.
WARMUP_STEPS = 3


class CaptureError(RuntimeError):
    """A training step could not be recorded as a CUDA graph (the message says why and what to change)."""


def _host_random_states() -> tuple[Any, ...]:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.random.get_rng_state().numpy().tobytes()


def _same_structure(batch: Any, static: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return (isinstance(static, torch.Tensor) and batch.shape == static.shape and batch.dtype == static.dtype
                and batch.device == static.device)
    if isinstance(batch, tuple | list):
        return (isinstance(static, tuple | list) and len(batch) == len(static)
                and all(_same_structure(b, s) for b, s in zip(batch, static, strict=True)))
    return batch == static


def _copy_into(static: Any, batch: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, tuple | list):
        for s, b in zip(static, batch, strict=True):
            _copy_into(s, b)


def _clone(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone(memory_format=torch.preserve_format)
    if isinstance(batch, tuple | list):
        return type(batch)(_clone(item) for item in batch)
    return batch


class CapturedTrainStep:
    """One training step of :func:`minidiff.train.fit` recorded as a CUDA graph and replayed.

    ``step_fn(batch)`` must do the whole step on the device — forward, ``backward()``, clipping, the optimiser
    step and the EMA blend — and return the loss tensor; every value that changes between steps must already
    live in a device tensor (the learning rate and the EMA decay do: see ``fit``). ``capture(batch)`` records it
    on ``batch``'s shapes; ``__call__(batch)`` copies a new batch into the static buffers, replays the graph and
    returns the static loss tensor (read it before the next replay overwrites it).
    """

    def __init__(self, step_fn: Callable[[Any], torch.Tensor], zero_grad: Callable[[], None]) -> None:
        self.step_fn, self.zero_grad = step_fn, zero_grad
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: Any = None
        self.static_loss: torch.Tensor | None = None

    def capture(self, batch: Any) -> None:
        """Record ``step_fn`` on a copy of ``batch``; raise :class:`CaptureError` if the step cannot be recorded.

        A step that draws from Python's, NumPy's or the CPU's torch generator would be recorded with one fixed
        draw and replay it forever; the generators' states are compared around the recording to refuse that.
        """
        self.static_batch = _clone(batch)
        self.zero_grad()  # gradients are then allocated inside the graph's memory pool, at fixed addresses
        graph = torch.cuda.CUDAGraph()
        before = _host_random_states()
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self.step_fn(self.static_batch)
        except Exception as error:
            torch.cuda.synchronize()
            self.zero_grad()
            raise CaptureError(
                f"the training step could not be recorded as a CUDA graph ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Typical causes: the loss draws random numbers "
                "on the CPU (pass generator=None, or a generator on the GPU), calls .item(), or moves a CPU tensor "
                "to the GPU inside the step.") from error
        if _host_random_states() != before:
            raise CaptureError("the training step draws random numbers on the host (Python, NumPy or a CPU torch "
                               "generator): a CUDA graph would replay one fixed draw forever. Draw them on the GPU.")
        self.graph = graph

    def matches(self, batch: Any) -> bool:
        """True when ``batch`` has the shapes, dtypes and devices the graph was recorded with."""
        return self.graph is not None and _same_structure(batch, self.static_batch)

    def __call__(self, batch: Any) -> torch.Tensor:
        """Copy ``batch`` into the static buffers and replay the recorded step; returns the static loss."""
        if self.graph is None:
            raise RuntimeError("capture(batch) must be called before the recorded step can be replayed")
        _copy_into(self.static_batch, batch)
        self.graph.replay()
        return self.static_loss


class GraphedModel(nn.Module):
    """A model whose forward pass is recorded as a CUDA graph, once per input signature, then replayed.

    Made by :func:`graphed`. Positional tensor arguments are copied into static buffers; other arguments are
    part of the signature (a new value records a new graph). Gradients are off: this is for sampling.
    """

    def __init__(self, model: Callable[..., torch.Tensor], bf16: bool = False) -> None:
        super().__init__()
        self.model, self.bf16 = model, bf16
        self._graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, list[Any], torch.Tensor]] = {}
        self._pool = None

    @staticmethod
    def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a)
                     for a in args)

    def _record(self, args: tuple[Any, ...]) -> tuple[torch.cuda.CUDAGraph, list[Any], torch.Tensor]:
        static = [_clone(a) for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():  # warm-up calls: cuDNN's choices, outside the recording
            for _ in range(2):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self._autocast():
            output = self.model(*static).float()
        self._pool = graph.pool()  # every signature's graph shares one memory pool
        return graph, static, output

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False)

    @torch.no_grad()
    def forward(self, *args: Any) -> torch.Tensor:
        """Call the wrapped model; on CUDA through a recorded graph (the output is a fresh tensor)."""
        if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return self.model(*args)
        key = self._signature(args)
        if key not in self._graphs:
            self._graphs[key] = self._record(args)
        graph, static, output = self._graphs[key]
        _copy_into(static, args)
        graph.replay()
        return output.clone()  # the static output is overwritten by the next replay


def graphed(model: Callable[..., torch.Tensor], bf16: bool = False) -> GraphedModel:
    """Wrap an ε-model (or any pure function of device tensors) so that each call on CUDA is one graph replay.

    ``bf16``: record the call under bfloat16 autocast (CUDA only; the output is float32). A big sampling batch is
    limited by memory traffic rather than by launches, and bfloat16 halves it, at the price of bf16 rounding.

    >>> fast = graphed(ema_model)
    >>> samples = ddpm_sample(fast, schedule, x_T)   # 1000 replays instead of 1000 × ~200 kernel launches

    On the CPU (or MPS) the wrapper simply calls the model. The wrapped function must be pure on the device:
    no ``.item()``, no CPU random draws, no Python state that changes between calls.
    """
    if isinstance(model, GraphedModel) and model.bf16 == bf16:
        return model
    if not callable(model):
        raise ValueError(f"model must be callable (an ε-model), got {type(model).__name__}")
    return GraphedModel(model, bf16)
