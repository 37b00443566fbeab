"""The attribute judge (lesson 10): read a generated scene back into its digits and colours, so that
prompt-following is measured rather than eyeballed.

A scene of :class:`minidiff.data.CaptionedDigits` has two slots, left and right. The judge predicts, for each
slot, the digit (0–9, or 10 = empty) and the colour (0–3 in :data:`~minidiff.data.COLOURS`, or 4 = empty).
From those readings, :func:`caption_report` scores a batch of generated images against the scenes their
captions asked for:

* ``digit_accuracy`` / ``colour_accuracy``: each requested object, in the slot its caption named;
* ``caption_accuracy``: everything right at once (both slots, an empty slot empty; when the caption names no
  positions, the two objects in either order);
* ``binding_accuracy``: two-object captions with two different digits and colours ("a red 3 and a blue 7"):
  both digits drawn, each in its own colour, wherever they are; ``swap_rate`` counts the classic binding
  failure, the right digits with each other's colours.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minidiff.data import COLOURS, NUM_CLASSES, POSITIONS, Scene

EMPTY_DIGIT, EMPTY_COLOUR = NUM_CLASSES, len(COLOURS)


@dataclass(frozen=True)
class AttributeJudgeConfig:
    """Everything that builds an :class:`AttributeJudge`."""

    width: int = 32
    dropout: float = 0.1


class AttributeJudge(nn.Module):
    """A small CNN with four read-outs: digit and colour of the left slot and of the right slot.

    Three conv stages (32 → 16 → 8 pixels), pooled to a 2×2 grid so that left and right stay apart, then one
    linear layer to 2 × (11 + 5) logits.
    """

    def __init__(self, config: AttributeJudgeConfig | None = None, **fields: Any) -> None:
        super().__init__()
        self.config = config = replace(config or AttributeJudgeConfig(), **fields)
        width = config.width
        stages, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            stages += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(config.dropout))
        self.readout = nn.Linear(4 * channels, len(POSITIONS) * (NUM_CLASSES + 1 + len(COLOURS) + 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, 32, 32] in [−1, 1] → (digit logits [B, 2, 11], colour logits [B, 2, 5])."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"images must have shape [B, 3, 32, 32], got {tuple(images.shape)}")
        logits = self.readout(self.features(images)).unflatten(1, (len(POSITIONS), -1))
        return logits[..., :NUM_CLASSES + 1], logits[..., NUM_CLASSES + 1:]


def scene_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the judge should read: (digits [N, 2], colours [N, 2]) per slot, 10 / 4 for an empty slot."""
    digits = torch.full((len(scenes), len(POSITIONS)), EMPTY_DIGIT, dtype=torch.long)
    colours = torch.full((len(scenes), len(POSITIONS)), EMPTY_COLOUR, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for item in scene.objects:
            slot = POSITIONS.index(item.position)
            digits[row, slot], colours[row, slot] = item.digit, COLOURS.index(item.colour)
    return digits, colours


def attribute_loss(judge: nn.Module, images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the four read-outs (two slots × digit and colour)."""
    digit_logits, colour_logits = judge(images)
    return (F.cross_entropy(digit_logits.flatten(0, 1), digits.flatten())
            + F.cross_entropy(colour_logits.flatten(0, 1), colours.flatten()))


@torch.no_grad()
def read_scenes(judge: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's reading of ``images``: (digits [N, 2], colours [N, 2]) on the CPU."""
    judge.eval()
    where = next(judge.parameters()).device
    digits, colours = [], []
    for start in range(0, len(images), batch_size):
        digit_logits, colour_logits = judge(images[start:start + batch_size].to(where, torch.float32))
        digits.append(digit_logits.argmax(-1).cpu())
        colours.append(colour_logits.argmax(-1).cpu())
    return torch.cat(digits), torch.cat(colours)


@dataclass
class CaptionReport:
    """How well images follow their captions (fractions in [0, 1]; NaN where no caption of that kind was asked)."""

    count: int
    digit_accuracy: float
    colour_accuracy: float
    caption_accuracy: float
    single_object_accuracy: float
    two_object_accuracy: float
    binding_accuracy: float
    swap_rate: float
    binding_count: int

    def __str__(self) -> str:
        return (f"{self.count} images: whole caption {self.caption_accuracy:.1%} (one object "
                f"{self.single_object_accuracy:.1%}, two objects {self.two_object_accuracy:.1%}); digit "
                f"{self.digit_accuracy:.1%}, colour {self.colour_accuracy:.1%}; binding {self.binding_accuracy:.1%} "
                f"with colours swapped {self.swap_rate:.1%} (of {self.binding_count} two-colour captions)")


def binding_verdict(scene: Scene, read: list[tuple[int, int]]) -> str | None:
    """For a caption of two different digits in two different colours: "bound" when the judge's reading
    ``read`` (one (digit, colour index) per slot) has each digit in its own colour, "swapped" when it has them in
    each other's colours, "other" otherwise; None for any other caption (binding is not asked)."""
    if len(scene.objects) != 2:
        return None
    first, second = scene.objects
    if first.digit == second.digit or first.colour == second.colour:
        return None
    asked = sorted((o.digit, COLOURS.index(o.colour)) for o in scene.objects)
    crossed = sorted([(first.digit, COLOURS.index(second.colour)), (second.digit, COLOURS.index(first.colour))])
    return "bound" if sorted(read) == asked else "swapped" if sorted(read) == crossed else "other"


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def caption_report(judge: nn.Module, images: torch.Tensor, scenes: list[Scene]) -> CaptionReport:
    """Score ``images`` against the ``scenes`` their captions described (see the module doc for each figure)."""
    if len(images) != len(scenes):
        raise ValueError(f"give one scene per image: {len(images)} images, {len(scenes)} scenes")
    read_digits, read_colours = read_scenes(judge, images)
    want_digits, want_colours = scene_targets(scenes)
    digit_ok, colour_ok, whole, single, double, bound, swapped = [], [], [], [], [], [], []
    for row, scene in enumerate(scenes):
        got = list(zip(read_digits[row].tolist(), read_colours[row].tolist(), strict=True))
        want = list(zip(want_digits[row].tolist(), want_colours[row].tolist(), strict=True))
        if scene.say_positions:
            correct = got == want
            for slot in range(len(POSITIONS)):
                if want[slot][0] != EMPTY_DIGIT:
                    digit_ok.append(got[slot][0] == want[slot][0])
                    colour_ok.append(got[slot][1] == want[slot][1])
        else:
            correct = sorted(got) == sorted(want)
        whole.append(correct)
        (single if len(scene.objects) == 1 else double).append(correct)
        verdict = binding_verdict(scene, got)
        if verdict is not None:
            bound.append(verdict == "bound")
            swapped.append(verdict == "swapped")
    return CaptionReport(len(scenes), _mean(digit_ok), _mean(colour_ok), _mean(whole), _mean(single), _mean(double),
                         _mean(bound), _mean(swapped), len(bound))
