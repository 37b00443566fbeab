"""The recipe of lesson 14's MNIST flow model (run it with ``python -m minidiff.recipes mnist_flow``).

    mnist_flow   lesson 07's U-Net trained by conditional flow matching on the straight path (rectified flow)
    mnist_reflow mnist_flow after one round of reflow (its weights are not shipped: the 30 MB budget is spent)

Same network, data, batch, optimiser and time budget as ``mnist_ddpm`` (lesson 07); only the loss differs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff.distill_recipes import evaluation_noise, judge_figures
from minidiff.flow import (
    TimeScaled,
    euler_sample,
    flow_matching_loss,
    linear_path,
    logit_normal_times,
    reflow_pairs,
    straightness,
    uniform_times,
)
from minidiff.nets import UNet
from minidiff.recipes import MNIST_UNET, _mnist_on_device, batch_generator, recipe_card, recipe_fit
from minidiff.runtime import budget, device, seed_everything, standard_normal
from minidiff.train import random_rows
from minidiff.weights import pretrained, save_weights

#: How the flow model reads time: the U-Net's sinusoidal embedding receives 1000 τ, like a DDPM's timestep.
FLOW_SPEC: dict[str, Any] = {"path": "linear", "time_scale": 1000.0, "times": "logit-normal(0, 1)"}


def train_mnist_flow(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                     judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """Rectified flow on MNIST: v_θ(x_τ, τ) ≈ ε − x_0 on x_τ = (1 − τ) x_0 + τ ε, τ logit-normal (SD3's choice);
    judged on 1,000 samples of 50 Euler steps from lesson 12's evaluation noises."""
    judge = pretrained("judge", directory=judge_directory)
    seed_everything(seed)
    images, _ = _mnist_on_device()
    steps = steps or budget(full=8000, fast=10)
    batch_size = budget(full=512, fast=8)
    model, path = TimeScaled(UNet(MNIST_UNET), FLOW_SPEC["time_scale"]), linear_path()
    result = recipe_fit(model, lambda net, x0: flow_matching_loss(net, x0, path, logit_normal_times),
                        random_rows(images, batch_size, batch_generator(seed)), steps, 5e-4, 500, ema_decay=0.9995,
                        progress=progress, time_limit=time_limit)
    flow, x1 = result.ema_model(), evaluation_noise()
    figures = judge_figures(euler_sample(flow, x1, steps=50), judge)
    print("flow matching, 50 Euler steps:", figures)
    card = recipe_card("mnist_flow", result, batch_size, seed, figures | {"samples": len(x1),
                                                                           "sampler": "Euler, 50 steps"},
                       {"flow": FLOW_SPEC, "weights": "EMA"}, time_limit)
    return save_weights(flow.net, out / "mnist_flow.safetensors", card)


def load_flow(name: str = "mnist_flow", device: torch.device | str | None = None, directory: Any = None) -> nn.Module:
    """A shipped (or recipe-made) flow model as a :data:`~minidiff.contracts.VelocityModel` (``model.card``)."""
    net = pretrained(name, device, directory)
    if "flow" not in net.card:
        raise ValueError(f"{name!r} is not a flow-matching model (its card has no 'flow' entry)")
    model = TimeScaled(net, net.card["flow"]["time_scale"]).eval()
    model.card = net.card
    return model


def train_mnist_reflow(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                       judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """One round of reflow on MNIST (Liu et al. 2023; lesson 14, section 4): couple 60,000 noises with the
    50-step Euler samples the shipped ``mnist_flow`` makes from them, fine-tune a copy of it with the flow-matching
    loss on those pairs (τ uniform), and judge both at 1, 2, 4 and 8 Euler steps on lesson 12's evaluation noises,
    with the straightness S of each (200 noises)."""
    judge = pretrained("judge", directory=judge_directory)
    seed_everything(seed)
    teacher = load_flow("mnist_flow", directory=judge_directory)
    count, chunk = budget(full=60_000, fast=16), budget(full=1000, fast=8)
    noise = standard_normal((count, 1, 28, 28), torch.Generator().manual_seed(seed + 1), device())
    with torch.no_grad():
        samples = torch.cat([reflow_pairs(teacher, noise[i:i + chunk], steps=50)[0] for i in range(0, count, chunk)])
    steps = steps or budget(full=4000, fast=10)
    batch_size = budget(full=512, fast=8)
    rows = batch_generator(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, count, (batch_size,), generator=rows, device=rows.device)
        return samples[pick], noise[pick]

    student, path = copy.deepcopy(teacher).train().requires_grad_(True), linear_path()
    result = recipe_fit(student, lambda net, batch: flow_matching_loss(net, batch[0], path, uniform_times,
                                                                       noise=batch[1]),
                        next_batch, steps, 2e-4, 200, ema_decay=0.999, progress=progress, time_limit=time_limit)
    reflowed, x1 = result.ema_model(), evaluation_noise()
    figures: dict[str, Any] = {"pairs": count}
    for name, model in (("teacher", teacher), ("reflow", reflowed)):
        with torch.no_grad():
            for n in (1, 2, 4, 8):
                figures[f"{name}_euler_{n}"] = judge_figures(euler_sample(model, x1, steps=n), judge)
            figures[f"{name}_straightness"] = round(straightness(model, x1[:budget(full=200, fast=4)], steps=100), 4)
        print(name, {key: value for key, value in figures.items() if key.startswith(name)})
    card = recipe_card("mnist_reflow", result, batch_size, seed, figures,
                       {"flow": FLOW_SPEC | {"times": "uniform", "reflow_of": teacher.card["sha256"]},
                        "weights": "EMA"}, time_limit)
    return save_weights(reflowed.net, out / "mnist_reflow.safetensors", card)


FLOW_RECIPES = {"mnist_flow": train_mnist_flow, "mnist_reflow": train_mnist_reflow}
