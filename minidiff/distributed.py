"""Data-parallel training on several GPUs with PyTorch's own engine (lesson 07, section 8).

``torchrun --nproc_per_node=N -m minidiff.recipes NAME`` starts N copies of the same program, one per GPU, and
tells each its place through environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_from_env` joins them into one process group; :func:`~minidiff.train.fit` sees the
group and wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients of
the N ranks after every backward pass. Each rank draws its own batches, so N ranks with batch b take the step one
process would take with batch N·b (Goyal et al. 2017, "Accurate, large minibatch SGD"; ``tests/test_distributed.py``
checks it to float tolerance).

Nothing here runs without ``WORLD_SIZE`` > 1: a single process trains exactly as before.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: How long a rank waits for the others at a collective before failing with an error instead of hanging.
DEFAULT_TIMEOUT_S = 300.0


class NotMainRank(Exception):
    """Raised by a recipe on every rank but 0 once training is over: rank 0 alone evaluates and writes."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer (torchrun sets it)") from None


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; False (and nothing done) when
    ``WORLD_SIZE`` is unset or 1. NCCL on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on CPUs.

    ``timeout_s`` bounds every wait at a collective: a rank that died stops the others with an error."""
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return False
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE={world} needs RANK in 0..{world - 1}, got RANK={rank}: start with torchrun")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and os.environ.get("MINIDIFF_DEVICE", "cuda").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank or 0)  # "cuda" now means this rank's own GPU
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many ranks train together (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one that shows progress, evaluates and writes weights."""
    return rank() == 0


def wrap(model: nn.Module, target: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel, which copies rank 0's weights to every rank now and averages
    the gradients after each backward pass."""
    if target.type == "cuda":
        index = target.index if target.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index])
    return DistributedDataParallel(model)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The average of ``value`` over the ranks (every rank gets it): e.g. the loss, for logging."""
    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def any_rank(flag: bool, target: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any: ranks must agree on when to stop (a time limit, say)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=target)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rank_seed(seed: int) -> int:
    """A seed of this rank's own: rank r draws other batches and noises than rank 0 (``seed`` itself on rank 0)."""
    return seed + 7919 * rank()


def shutdown() -> None:
    """Leave the process group (when there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
