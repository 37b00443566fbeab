"""Plotting helpers shared by the notebooks: image grids, 2D scatter and density plots, a t-slider."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from minidiff.contracts import LevelScore


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one [rows·H, nrow·W] (or ·3) array in [0, 1] for imshow."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    images = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    count, channels, height, width = images.shape
    rows = -(-count // nrow)
    grid = np.ones((rows * (height + padding) - padding, nrow * (width + padding) - padding, channels))
    for index in range(count):
        top, left = (index // nrow) * (height + padding), (index % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = images[index].permute(1, 2, 0).numpy()
    return grid[..., 0] if channels == 1 else grid


def show_images(images: torch.Tensor, nrow: int = 8, title: str | None = None, ax: plt.Axes | None = None) -> plt.Axes:
    """Show a batch of images in [-1, 1] as one grid."""
    ax = ax or plt.figure(figsize=(nrow * 0.8, max(1, -(-len(images) // nrow)) * 0.8)).gca()
    ax.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def scatter2d(points: torch.Tensor, ax: plt.Axes | None = None, title: str | None = None,
              lim: float = 3.0, **kwargs: object) -> plt.Axes:
    """Scatter [N, 2] points on a square, equal-aspect panel of half-width ``lim``."""
    ax = ax or plt.figure(figsize=(4, 4)).gca()
    points = points.detach().cpu().numpy()
    style = {"s": 2, "alpha": 0.5} | kwargs
    ax.scatter(points[:, 0], points[:, 1], **style)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def density_contours(log_prob: Callable[[torch.Tensor], torch.Tensor], ax: plt.Axes | None = None,
                     lim: float = 3.0, resolution: int = 150, levels: int = 10, **kwargs: object) -> plt.Axes:
    """Draw contours of exp(log_prob) over [-lim, lim]² (log_prob maps [N, 2] points to [N] values)."""
    ax = ax or plt.figure(figsize=(4, 4)).gca()
    axis = torch.linspace(-lim, lim, resolution, dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(axis, axis, indexing="xy")
    density = log_prob(torch.stack([grid_x.flatten(), grid_y.flatten()], 1)).exp().reshape(resolution, resolution)
    ax.contour(grid_x.numpy(), grid_y.numpy(), density.detach().cpu().numpy(), levels=levels, **kwargs)
    ax.set_aspect("equal")
    return ax


def slider(draw: Callable[[int], None], values: Sequence[int], name: str = "t") -> None:
    """An ipywidgets slider that calls ``draw(value)``; without ipywidgets, draw a few values instead.

    Run headless (nbval, CI, a script), ``interact`` simply renders the default value once, so the
    cell still runs and shows a picture.
    """
    values = list(values)
    try:
        import ipywidgets
    except ImportError:  # degrade gracefully: a static strip of the first, middle and last value
        for value in (values[0], values[len(values) // 2], values[-1]):
            draw(value)
        return
    ipywidgets.interact(draw, **{name: ipywidgets.SelectionSlider(options=values, value=values[len(values) // 2],
                                                                    description=name)})


def score_field(score: LevelScore, ax: plt.Axes | None = None, lim: float = 3.0,
                resolution: int = 21, title: str | None = None, **kwargs: object) -> plt.Axes:
    """Draw a score field ∇ log p as arrows on a grid (arrow lengths normalised per plot; colour = magnitude)."""
    ax = ax or plt.figure(figsize=(4, 4)).gca()
    axis = torch.linspace(-lim, lim, resolution, dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], 1)
    with torch.no_grad():
        vectors = score(points).detach().double().cpu()
    lengths = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # show directions with a gently compressed length, so both strong and weak regions stay readable
    shown = vectors / lengths * lengths.log1p()
    ax.quiver(points[:, 0], points[:, 1], shown[:, 0], shown[:, 1], lengths[:, 0], cmap="viridis", **kwargs)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    if title:
        ax.set_title(title)
    return ax


def live_loss_plot(window: int = 50, min_interval: float = 1.0) -> Callable[[object], None]:
    """A ``callback`` for :func:`minidiff.train.fit` that redraws the loss curve in place in a notebook.

    It redraws at most every ``min_interval`` seconds (drawing is slow next to a training step) and
    always when a run ends; the raw loss is drawn faintly under its running mean over ``window`` steps.
    """
    import time

    from IPython.display import display

    figure, ax = plt.subplots(figsize=(6, 3))
    plt.close(figure)  # shown through the display handle only, not again at the end of the cell
    handle = display(figure, display_id=True)
    last_draw, last_seconds = [0.0], [0.0]

    def update(result: object) -> None:
        now = time.perf_counter()
        finished = result.seconds != last_seconds[0]  # fit adds to result.seconds only when a run ends
        if now - last_draw[0] < min_interval and not finished:
            return
        last_draw[0], last_seconds[0] = now, result.seconds
        ax.clear()
        ax.plot(result.losses, alpha=0.3, lw=0.5, label="loss")
        ax.plot(result.smoothed_losses(window), label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(loc="upper right")
        ax.set_title(f"step {result.steps}, {result.seconds:.0f} s" if result.seconds else f"step {result.steps}")
        handle.update(figure)

    return update
