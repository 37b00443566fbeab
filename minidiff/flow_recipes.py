"""The recipe of lesson 14's MNIST flow model (run it with ``python -m minidiff.recipes mnist_flow``).

    mnist_flow   lesson 07's U-Net trained by conditional flow matching on the straight path (rectified flow)

Same network, data, batch, optimiser and time budget as ``mnist_ddpm`` (lesson 07); only the loss differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff.distill_recipes import evaluation_noise, judge_figures
from minidiff.flow import TimeScaled, euler_sample, flow_matching_loss, linear_path, logit_normal_times
from minidiff.nets import UNet
from minidiff.recipes import MNIST_UNET, _mnist_on_device, batch_generator, recipe_card, recipe_fit
from minidiff.runtime import budget, seed_everything
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


FLOW_RECIPES = {"mnist_flow": train_mnist_flow}
