"""The only global switches in minidiff: the fast-mode flag and the device choice.

Every notebook sizes its loops with :func:`budget`, so one environment variable,
``MINIDIFF_FAST=1``, shrinks the whole course to a smoke test (the test suite sets it
by itself). :func:`device` picks the accelerator once, the same way everywhere.
"""

from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

N = TypeVar("N", int, float, list, tuple)

_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"", "0", "false", "no", "off"}
_DEVICE_KINDS = ("cuda", "mps", "cpu")


def is_fast() -> bool:
    """True when ``MINIDIFF_FAST`` asks for fast mode (1/true/yes/on); read on every call."""
    raw = os.environ.get("MINIDIFF_FAST", "").strip().lower()
    if raw in _TRUE_WORDS:
        return True
    if raw in _FALSE_WORDS:
        return False
    raise ValueError(f"MINIDIFF_FAST must be one of 1/0/true/false/yes/no/on/off, got {raw!r}")


def budget(full: N, fast: N) -> N:
    """Return ``fast`` in fast mode and ``full`` otherwise: the size of every loop in the course.

    >>> budget(full=10_000, fast=50)  # training steps
    >>> budget(full=[10, 20, 50, 100], fast=[2, 4])  # a list of settings to try: fast has no more entries
    """
    if type(full) is not type(fast):
        raise TypeError(f"budget: full and fast must have the same type, got {type(full)} and {type(fast)}")
    if isinstance(full, list | tuple):
        # a list of sizes (steps to try, scales to sweep): fast mode should not try more of them
        if len(fast) > len(full):
            raise ValueError(f"budget: fast ({fast}) should not have more entries than full ({full})")
    elif fast > full:
        raise ValueError(f"budget: fast ({fast}) should not exceed full ({full})")
    return fast if is_fast() else full


def device() -> torch.device:
    """The device to compute on: ``MINIDIFF_DEVICE`` if set, else cuda, then mps, then cpu.

    ``MINIDIFF_DEVICE`` takes any name torch understands (``cpu``, ``cuda``, ``cuda:1``, ``mps``);
    asking for an accelerator that is absent is an error rather than a silent fall-back.
    """
    requested = os.environ.get("MINIDIFF_DEVICE", "").strip()
    if requested:
        try:
            chosen = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"MINIDIFF_DEVICE={requested!r} is not a device name ({error})") from error
        if chosen.type not in _DEVICE_KINDS:
            raise ValueError(f"MINIDIFF_DEVICE must name one of {_DEVICE_KINDS}, got {requested!r}")
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"MINIDIFF_DEVICE={requested!r} but torch sees no CUDA device")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"MINIDIFF_DEVICE={requested!r} but torch sees no MPS device")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a fresh CPU ``torch.Generator`` with that seed.

    Functions in minidiff that draw random numbers take an explicit ``generator`` argument;
    the returned one is a convenient default for a notebook.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise with the shape, dtype and device of ``x``, drawn from ``generator``.

    The draw happens on the generator's own device (a CPU generator gives the same numbers whatever the
    device of ``x``), then moves to ``x``'s device; without a generator it uses ``x``'s device's global RNG.
    """
    where = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)


def standard_normal(shape: tuple[int, ...], generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) noise of ``shape`` on ``device`` (the CPU by default), drawn from ``generator``: e.g. a sampler's x_T.

    Like :func:`randn_like`, the draw happens on the generator's device, so a CPU generator gives the same
    numbers whatever the target device.
    """
    return randn_like(torch.empty(shape, dtype=dtype, device=device or "cpu"), generator)


def check_number(name: str, value: float, minimum: float | None = None, *, above: bool = False,
                 maximum: float | None = None) -> float:
    """Return ``value`` as a float after checking that it is a finite real number in range, or raise a ValueError
    naming ``name``.

    One helper for every numeric argument whose wrong value would mislead rather than crash: ``x < 0`` lets NaN
    through (every comparison with NaN is False), this does not. ``above=True`` makes ``minimum`` strict.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise ValueError(f"{name} must be {'>' if above else '>='} {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value:g}")
    return value
