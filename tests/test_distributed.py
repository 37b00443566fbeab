"""Data-parallel training (minidiff.distributed, train.fit under torchrun), checked on CPU with the gloo backend.

Two processes on this machine stand for two GPUs: what DDP promises (the step of N ranks with batch b is the step of
one process with batch N·b) does not depend on the device."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from minidiff import distributed
from minidiff.train import fit

STEPS, HALF_BATCH = 6, 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A small regression problem and the global batches of every step (2 × HALF_BATCH rows each)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    order = [torch.randint(0, 64, (2 * HALF_BATCH,), generator=g) for _ in range(STEPS)]
    return x, y, order


def _train(rows: slice, out: Path, init_seed: int, fail_at: int | None = None) -> None:
    """fit() on ``rows`` of every global batch; writes the weights, the EMA and the recorded losses to ``out``."""
    torch.set_num_threads(1)
    x, y, order = _data()
    torch.manual_seed(init_seed)  # ranks start from different weights: DDP must copy rank 0's to all
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    calls = iter(range(STEPS))

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        step = next(calls)
        if fail_at is not None and step == fail_at:
            raise RuntimeError("this rank failed on purpose")
        pick = order[step][rows]
        return x[pick], y[pick]

    result = fit(model, lambda net, batch: nn.functional.mse_loss(net(batch[0]), batch[1]), next_batch, STEPS,
                 lr=1e-2, ema_decay=0.9, grad_clip=0.5, device="cpu", progress=False)
    torch.save({"weights": model.state_dict(), "ema": result.ema.model.state_dict(), "losses": result.losses}, out)


def _rank_main(rank: int, port: int, folder: str, fail_at: int | None) -> None:
    """One rank, as torchrun would start it: the environment says who it is."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MINIDIFF_DEVICE": "cpu"})
    try:
        assert distributed.init_from_env(timeout_s=20)
        _train(slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH), Path(folder) / f"rank{rank}.pt", 100 + rank,
               fail_at if rank == 1 else None)
    except Exception as error:  # the parent reads why a rank stopped
        (Path(folder) / f"rank{rank}.error").write_text(f"{type(error).__name__}: {error}")
        raise
    finally:
        distributed.shutdown()


def _two_ranks(folder: Path, fail_at: int | None = None, timeout: float = 120) -> list[int | None]:
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [context.Process(target=_rank_main, args=(rank, port, str(folder), fail_at)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    codes = [process.exitcode for process in ranks]
    for process in ranks:
        if process.is_alive():
            process.kill()
    return codes


def test_two_ranks_with_batch_b_take_the_step_of_one_process_with_batch_2b(tmp_path: Path) -> None:
    assert _two_ranks(tmp_path) == [0, 0], [p.read_text() for p in tmp_path.glob("*.error")]
    _train(slice(0, 2 * HALF_BATCH), tmp_path / "single.pt", 100)
    single, rank0, rank1 = (torch.load(tmp_path / f"{name}.pt") for name in ("single", "rank0", "rank1"))
    for key in ("weights", "ema"):
        for name, value in single[key].items():
            torch.testing.assert_close(rank0[key][name], value, rtol=1e-5, atol=1e-6)
            assert torch.equal(rank0[key][name], rank1[key][name]), f"{key} {name} differs between the ranks"
    # the recorded loss is the ranks' average, i.e. the loss of the whole batch of 2b
    assert rank0["losses"] == rank1["losses"]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-7)


def test_a_rank_that_fails_stops_the_other_with_an_error_instead_of_a_hang(tmp_path: Path) -> None:
    start = time.monotonic()
    codes = _two_ranks(tmp_path, fail_at=2, timeout=90)
    assert None not in codes, "a rank was still waiting after 90 s: the run hung"
    assert codes[1] != 0 and "failed on purpose" in (tmp_path / "rank1.error").read_text()
    assert codes[0] != 0 and (tmp_path / "rank0.error").exists(), "rank 0 carried on as if nothing had happened"
    assert time.monotonic() - start < 90


def test_without_torchrun_fit_trains_one_process_exactly_as_before(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No WORLD_SIZE (or WORLD_SIZE=1): no process group, no DDP wrapper, and bit-identical training."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() is False and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.rank_seed(5)) == (0, 1, 5)
    _train(slice(0, 2 * HALF_BATCH), tmp_path / "plain.pt", 100)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False
    _train(slice(0, 2 * HALF_BATCH), tmp_path / "world1.pt", 100)
    plain, world1 = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "world1.pt")
    assert all(torch.equal(plain["weights"][k], world1["weights"][k]) for k in plain["weights"])


def test_a_broken_torchrun_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK in 0\.\.1"):
        distributed.init_from_env()


def test_a_recipe_runs_unchanged_under_torchrun_and_only_rank_0_writes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m minidiff.recipes judge --fast` on CPUs (gloo): one weights file, whose card
    records the world size and the global batch."""
    env = os.environ | {"MINIDIFF_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "minidiff.recipes", "judge", "--fast", "--out", str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.json", "judge.safetensors"]
    card = json.loads((tmp_path / "judge.json").read_text())
    assert card["world_size"] == 2 and card["global_batch_size"] == 2 * card["batch_size"]
