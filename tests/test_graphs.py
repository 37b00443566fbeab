"""The fast path of fit and the samplers (minidiff.graphs) and the benchmark.

On a CPU the graph path cannot run, so what is checked here is that ``fit`` — whose step the graph records —
computes exactly what an independent, plainly written training loop computes. The tests marked ``cuda`` compare
the recorded step with the eager one on a GPU (CI on a GPU runs them).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from minidiff.bench import main as bench_main
from minidiff.graphs import graphed
from minidiff.nets import UNet, UNetConfig
from minidiff.samplers import ddim_sample
from minidiff.schedules import NoiseSchedule
from minidiff.train import ddpm_loss, fit, random_rows

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_resolutions=(),
                       dropout=0.0)


def _fixed_batches(count: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches that carry their own t and ε, so that a step is a pure function of its batch."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=generator), torch.randint(1, 101, (size,), generator=generator),
             torch.randn(size, 1, 8, 8, generator=generator)) for _ in range(count)]


def _loss(schedule: NoiseSchedule):
    return lambda net, batch: ddpm_loss(net, schedule, batch[0], t=batch[1], noise=batch[2])


def _reference_loop(model: nn.Module, batches: list, schedule: NoiseSchedule, lr: float, warmup: int,
                    decay: float, clip: float) -> tuple[nn.Module, list[float]]:
    """The training loop written the textbook way: LambdaLR, clip_grad_norm_, AdamW, and an EMA by lerp."""
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = len(batches)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    for n, (x0, t, noise) in enumerate(batches, start=1):
        loss = ((noise - model(schedule.q_sample(x0, t, noise), t)) ** 2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        weight = 1 - min(decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
                averaged.lerp_(current, weight)
    return ema, losses


def test_fit_computes_what_a_plain_training_loop_computes() -> None:
    schedule = NoiseSchedule.linear(100)
    batches = _fixed_batches(12, 4)
    torch.manual_seed(0)
    model = UNet(TINY_UNET, image_size=8)
    reference_model = copy.deepcopy(model)
    feed = iter(batches)
    result = fit(model, _loss(schedule), lambda: next(feed), len(batches), lr=3e-3, warmup_steps=3,
                 cosine_decay=True, ema_decay=0.9, grad_clip=0.5, device="cpu", progress=False)
    reference_ema, reference_losses = _reference_loop(reference_model, batches, schedule, 3e-3, 3, 0.9, 0.5)
    assert result.losses == pytest.approx(reference_losses, rel=1e-5)
    for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(result.ema.model.parameters(), reference_ema.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_cuda_graph_is_refused_off_cuda_and_checked() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        fit(model, lambda m, x: m(x).pow(2).mean(), lambda: torch.ones(3, 2), 2, device="cpu", cuda_graph=True,
            progress=False)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        fit(model, lambda m, x: m(x).pow(2).mean(), lambda: torch.ones(3, 2), 2, device="cpu", cuda_graph="yes",
            progress=False)


def test_a_callback_returning_true_stops_training() -> None:
    result = fit(nn.Linear(2, 2), lambda m, x: m(x).pow(2).mean(), lambda: torch.ones(3, 2), 50, device="cpu",
                 progress=False, callback=lambda r: r.steps >= 10, callback_every=5)
    assert result.steps == 10


def test_graphed_is_a_plain_call_off_cuda() -> None:
    model = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    wrapped = graphed(model)
    assert torch.equal(wrapped(x), model(x).detach())
    assert graphed(wrapped) is wrapped
    with pytest.raises(ValueError, match="model must be callable"):
        graphed(3)


def test_random_rows_draws_on_the_generators_device() -> None:
    data = torch.arange(10.0)[:, None]
    first = random_rows(data, 4, torch.Generator().manual_seed(5))()
    second = random_rows(data, 4, torch.Generator().manual_seed(5))()
    assert torch.equal(first, second)
    index = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, data[index])


def test_bench_quick_runs_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench_main(["--quick", "--no-diffusers"])
    assert rows and all(row.value for row in rows)
    assert "minidiff bench on" in capsys.readouterr().out


@needs_cuda
def test_the_recorded_step_trains_like_the_eager_step() -> None:
    schedule = NoiseSchedule.linear(100)
    batches = [tuple(t.cuda() for t in batch) for batch in _fixed_batches(40, 16)]
    torch.manual_seed(0)
    eager_model = UNet(TINY_UNET, image_size=8)
    graph_model = copy.deepcopy(eager_model)
    runs = {}
    for name, model, flag in (("eager", eager_model, False), ("graph", graph_model, True)):
        feed = iter(batches)
        runs[name] = fit(model, _loss(schedule), lambda feed=feed: next(feed), len(batches), lr=3e-3,
                         warmup_steps=5, cosine_decay=True, ema_decay=0.9, device="cuda", progress=False,
                         cuda_graph=flag)
    # the eager and the capturable fused AdamW round differently, and Adam's normalisation magnifies that on
    # parameters whose gradients are tiny: compare what the networks compute, not each weight
    assert runs["graph"].losses == pytest.approx(runs["eager"].losses, rel=1e-3, abs=1e-5)
    x, t = batches[0][0], batches[0][1]
    with torch.no_grad():
        torch.testing.assert_close(graph_model(x, t), eager_model(x, t), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(runs["graph"].ema.model(x, t), runs["eager"].ema.model(x, t), rtol=1e-3, atol=1e-4)


@needs_cuda
def test_a_step_that_draws_on_the_host_falls_back_to_eager_with_a_warning() -> None:
    host_generator = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.linear(100)
    data = torch.randn(64, 1, 8, 8, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(UNet(TINY_UNET, image_size=8), lambda net, x0: ddpm_loss(net, schedule, x0, host_generator),
                     random_rows(data, 8), 10, device="cuda", progress=False)
    assert result.steps == 10 and all(math.isfinite(v) for v in result.losses)
    assert any("could not be recorded" in str(w.message) or "host" in str(w.message) for w in caught)


@needs_cuda
def test_graphed_sampling_matches_eager_sampling() -> None:
    torch.manual_seed(0)
    model = UNet(TINY_UNET, image_size=8).cuda().eval()
    schedule = NoiseSchedule.linear(100)
    x_T = torch.randn(6, 1, 8, 8, device="cuda")
    torch.testing.assert_close(ddim_sample(graphed(model), schedule, x_T, steps=10),
                               ddim_sample(model, schedule, x_T, steps=10), rtol=1e-4, atol=1e-4)


def test_continuing_a_run_of_another_network_is_refused() -> None:
    first = fit(nn.Linear(2, 2), lambda m, x: m(x).pow(2).mean(), lambda: torch.ones(3, 2), 3, device="cpu",
                progress=False)
    with pytest.raises(ValueError, match="different network"):
        fit(nn.Linear(2, 3), lambda m, x: m(x).pow(2).mean(), lambda: torch.ones(3, 2), 3, device="cpu",
            progress=False, result=first)
