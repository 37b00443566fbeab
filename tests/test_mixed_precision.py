"""Mixed precision with float32 master weights (minidiff.mixed_precision, fit(bf16_weights=True)), on the CPU.

Planted bugs these tests catch (tried once each): the working gradients never copied up to the master (the
master weights then never move); the master weights never copied down (the bfloat16 copy then keeps its start
and the loss does not fall).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minidiff.mixed_precision import Bfloat16Weights, bfloat16_copy
from minidiff.nets import MLPDenoiser
from minidiff.schedules import NoiseSchedule
from minidiff.toys import sample_toy
from minidiff.train import ddpm_loss, fit
from minidiff.weights import pretrained

SCHEDULE = NoiseSchedule.linear(1000)


def test_the_working_copy_computes_the_master_networks_gradient() -> None:
    """The bfloat16 copy's gradient, copied up, is the float32 network's own gradient up to bfloat16 rounding
    (autograd on the float32 master is the independent reference); the copy down rounds the master exactly."""
    torch.manual_seed(0)
    master = MLPDenoiser(hidden=64, num_blocks=2)
    x, t = torch.randn(512, 2), torch.randint(1, 1001, (512,))
    target = torch.randn(512, 2)
    (master(x, t) - target).pow(2).mean().backward()
    reference = [p.grad.clone() for p in master.parameters()]
    master.zero_grad(set_to_none=True)

    precision = Bfloat16Weights(master)
    output = precision.working(x, t)  # float32 in (x and the time embedding), float32 out
    assert output.dtype == torch.float32
    (output - target).pow(2).mean().backward()
    precision.gradients_to_master()
    for (name, parameter), expected, working in zip(master.named_parameters(), reference,
                                                    precision.working.parameters(), strict=True):
        assert parameter.grad.dtype == torch.float32
        assert torch.equal(parameter.grad, working.grad.float()), name
        relative = (parameter.grad - expected).norm() / expected.norm()
        assert relative < 0.05, (name, relative.item())  # bfloat16 keeps ~3 significant digits

    with torch.no_grad():
        for parameter in master.parameters():
            parameter.add_(1e-4 * torch.randn_like(parameter))
    precision.weights_from_master()
    for parameter, working in zip(master.parameters(), precision.working.parameters(), strict=True):
        assert working.dtype == torch.bfloat16 and torch.equal(working, parameter.to(torch.bfloat16))


DATA = sample_toy("two_moons", 4000, torch.Generator().manual_seed(0))


def train(bf16_weights: bool, steps: int, lr: float) -> tuple[nn.Module, nn.Module, list[float]]:
    """The 2D MLP trained on two moons from fixed seeds; returns it, a copy of its start and the losses."""
    torch.manual_seed(1)
    model = MLPDenoiser(hidden=64, num_blocks=2)
    start = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    result = fit(model, lambda net, x0: ddpm_loss(net, SCHEDULE, x0),
                 lambda: DATA[torch.randint(0, len(DATA), (256,), generator=generator)], steps, lr=lr,
                 ema_decay=None, progress=False, device="cpu", bf16_weights=bf16_weights)
    return model, start, result.losses


def test_fit_with_bfloat16_weights_trains_as_float32_does() -> None:
    """Same seeds, same 400 steps: the bfloat16-weights run ends at float32's loss, and ``model`` comes back
    with float32 weights."""
    _, _, plain = train(False, 400, 2e-3)
    model, _, mixed = train(True, 400, 2e-3)
    start, plain_end, mixed_end = sum(plain[:20]) / 20, sum(plain[-100:]) / 100, sum(mixed[-100:]) / 100
    print(f"loss at the start {start:.3f}; after 400 steps: float32 {plain_end:.4f}, bfloat16 weights {mixed_end:.4f}")
    assert mixed_end < 0.8 * start  # it learns...
    assert abs(mixed_end - plain_end) < 0.1 * plain_end  # ...as float32 does
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert max(abs(a - b) for a, b in zip(plain, mixed, strict=True)) > 1e-4  # bfloat16's rounding is there


def test_updates_below_bfloat16_resolution_add_up_in_the_master_weights() -> None:
    """At lr = 1e-5 each AdamW step moves a weight by about 1e-5, far below half of bfloat16's spacing near the
    MLP's typical weight (about 2.4e-4 at 0.1): weights held in bfloat16 would never move. The master weights
    must move by about steps × lr."""
    steps, lr = 60, 1e-5
    model, start, _ = train(True, steps, lr)
    moved = torch.cat([(p - p0).abs().flatten() for p, p0 in zip(model.parameters(), start.parameters(),
                                                                  strict=True)])
    typical = torch.cat([p.abs().flatten() for p in start.parameters()]).median().item()
    spacing = 2.0 ** (torch.tensor(typical).log2().floor().item() - 7)  # bfloat16 keeps 7 bits after the point
    print(f"median |weight| {typical:.3f}, bfloat16 spacing there {spacing:.1e}; moved: median {moved.median():.2e}, "
          f"max {moved.max():.2e} (steps x lr = {steps * lr:.1e})")
    assert lr < 0.1 * spacing  # the premise: one step is lost in bfloat16
    assert moved.median() > 0.3 * steps * lr and moved.max() < 1.5 * steps * lr


def test_a_bfloat16_copy_predicts_what_the_float32_network_does() -> None:
    """The shipped U-Net's sampling copy: bfloat16 weights, float32 in and out, its ε within bfloat16 noise of the
    float32 network's (the reference), and the float32 network left as it was."""
    model = pretrained("mnist_ddpm")
    before = [p.clone() for p in model.parameters()]
    fast = bfloat16_copy(model)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and not fast.training
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(1, 1000, 64).long()
    with torch.no_grad():
        exact, rounded = model(x, t), fast(x, t)
    assert rounded.dtype == torch.float32
    error = ((rounded - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 0.03, f"relative error of the bfloat16 copy's ε: {error:.2e}"
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_bad_inputs_name_the_argument() -> None:
    model = MLPDenoiser(hidden=16, num_blocks=1)
    with pytest.raises(ValueError, match="bf16_weights must be True or False"):
        fit(model, lambda net, x0: ddpm_loss(net, SCHEDULE, x0), lambda: torch.randn(8, 2), 1, progress=False,
            device="cpu", bf16_weights="yes")
    with pytest.raises(ValueError, match="master must hold float32 parameters"):
        Bfloat16Weights(MLPDenoiser(hidden=16, num_blocks=1).double())
    with pytest.raises(ValueError, match=r"master must be an nn\.Module"):
        Bfloat16Weights(lambda x: x)
    with pytest.raises(ValueError, match=r"model must be an nn\.Module"):
        bfloat16_copy("mnist_ddpm")
