"""Personalisation, DreamBooth-style (lesson 13): teach lesson 10's text-to-image model a new concept from a
handful of pictures, bound to a new word, without making it forget what it knew.

Ruiz et al. (2023), "DreamBooth": fine-tune on a few images of one subject captioned "a [V] dog", where [V]
is a rare identifier, and add a *prior-preservation* loss on the base model's own samples of the class
("a dog"), so that the class keeps its variety:

    L = E ‖ε − ε_θ(x_t, t, "a [V] c")‖² + λ E ‖ε − ε_θ(x'_t, t', "a c")‖²,  x' ~ base("a c")   (lesson 13, eq. 3)

Our toy concepts, both drawn procedurally so everything stays offline:

* the **subject**: one particular handwritten 7 that the base model never saw (a held-out MNIST digit, picked
  as an unusual one), shown in eight pictures (two colours, both slots) as "a red sks 7 on the left";
* the **style**: horizontal stripes, shown on eight digits as "a striped blue 3 on the right".

And the measures that tell whether it worked (:func:`personalisation_report`): how much the samples of a
prompt look like the subject (normalised cross-correlation with the subject's glyph), whether they are
striped (the stripe frequency's share of the row profile), and lesson 10's attribute judge for everything
the base model could already do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minidiff.attributes import caption_report
from minidiff.data import (
    CANVAS,
    COLOURS,
    DIGIT_SIZE,
    GLYPH_LEFTS,
    GLYPH_TOPS,
    POSITIONS,
    CaptionedDigits,
    DigitObject,
    Scene,
    place_glyph,
)
from minidiff.schedules import NoiseSchedule
from minidiff.train import conditional_ddpm_loss

#: The identifier of the subject and the word of the style: new words, added with :func:`minidiff.lora.add_words`.
SUBJECT_WORD, STYLE_WORD = "sks", "striped"
#: The subject's class: a particular 7.
SUBJECT_DIGIT = 7
#: The stripes: in every :data:`STRIPE_PERIOD` rows of a glyph, the last two are dimmed to :data:`STRIPE_DIM` of
#: their brightness (two bright rows, two dark: a period of four pixels, coarse enough for a 32×32 model to draw).
STRIPE_PERIOD, STRIPE_DIM = 4, 0.1
#: What the subject's pictures show: two colours in both slots (the other two colours are left for testing
#: whether the concept composes with words it was never shown with).
SUBJECT_COLOURS = ("red", "green")

Draw = Callable[[list[str], torch.Generator], torch.Tensor]


def _ncc_rows(patches: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of each patch [..., h, w] with ``template`` [h, w] (1: the same picture up to
    brightness and contrast)."""
    a = patches.flatten(-2) - patches.flatten(-2).mean(-1, keepdim=True)
    b = (template - template.mean()).flatten()
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-8)


def pick_subject(digit: int = SUBJECT_DIGIT, quantile: float = 0.1) -> torch.Tensor:
    """The subject's glyph [18, 18] in [0, 1]: the held-out ``digit`` whose correlation with the average training
    ``digit`` sits at ``quantile`` (0.1: an unusual one, yet clearly a ``digit``). The base model never saw it."""
    train, heldout = CaptionedDigits("train"), CaptionedDigits("heldout")
    mean_glyph = train.digits[train.by_class[digit]].mean(0)
    candidates = heldout.digits[heldout.by_class[digit]]
    scores = _ncc_rows(candidates, mean_glyph)
    order = scores.argsort()
    return candidates[order[int(quantile * (len(order) - 1))]].clone()


def striped(glyph: torch.Tensor) -> torch.Tensor:
    """The style: two of every :data:`STRIPE_PERIOD` rows of a glyph dimmed to :data:`STRIPE_DIM`."""
    rows = torch.ones(glyph.shape[-2])
    for offset in (STRIPE_PERIOD - 2, STRIPE_PERIOD - 1):
        rows[offset::STRIPE_PERIOD] = STRIPE_DIM
    return glyph * rows[:, None]


def render(objects: Sequence[tuple[torch.Tensor, str, str]], generator: torch.Generator | None = None) -> torch.Tensor:
    """One scene [3, 32, 32] in [−1, 1] from (glyph, colour, position) triples, placed as lesson 10's data."""
    canvas = torch.zeros(3, CANVAS, CANVAS)
    for glyph, colour, position in objects:
        place_glyph(canvas, glyph, colour, position, generator)
    return canvas * 2 - 1


@dataclass
class Concept:
    """A few pictures of a new concept and their captions (the *instance* data of DreamBooth)."""

    images: torch.Tensor
    captions: list[str]
    #: prompts that should show the concept, and the scenes they ask for (for the attribute judge)
    test_captions: list[str]
    test_scenes: list[Scene]


def subject_prompts() -> tuple[list[str], list[Scene]]:
    """The prompts that should draw the subject: "a COLOUR sks 7 on the SLOT", every colour in both slots."""
    scenes = [Scene((DigitObject(SUBJECT_DIGIT, colour, position),)) for colour in COLOURS for position in POSITIONS]
    return [f"a {s.objects[0].colour} {SUBJECT_WORD} {SUBJECT_DIGIT} on the {s.objects[0].position}"
            for s in scenes], scenes


def style_prompts() -> tuple[list[str], list[Scene]]:
    """The prompts that should draw stripes: "a striped COLOUR DIGIT on the SLOT", every digit twice."""
    scenes = [Scene((DigitObject(digit, COLOURS[(digit + k) % 4], POSITIONS[k % 2]),))
              for digit in range(10) for k in range(2)]
    return [f"a {STYLE_WORD} {s.objects[0].colour} {s.objects[0].digit} on the {s.objects[0].position}"
            for s in scenes], scenes


def subject_concept(glyph: torch.Tensor, count: int = 8, generator: torch.Generator | None = None) -> Concept:
    """``count`` pictures of the subject glyph in :data:`SUBJECT_COLOURS`, both slots, captioned
    "a red sks 7 on the left"; the test prompts ask for every colour in both slots."""
    images, captions = [], []
    for index in range(count):
        colour, position = SUBJECT_COLOURS[index % 2], POSITIONS[(index // 2) % 2]
        images.append(render([(glyph, colour, position)], generator))
        captions.append(f"a {colour} {SUBJECT_WORD} {SUBJECT_DIGIT} on the {position}")
    return Concept(torch.stack(images), captions, *subject_prompts())


def style_concept(count: int = 8, generator: torch.Generator | None = None) -> Concept:
    """``count`` pictures of striped training digits (random digit, colour and slot), captioned
    "a striped blue 3 on the right"; the test prompts ask for every digit, colour and slot."""
    data = CaptionedDigits("train", exclude_heldout_pairs=False)
    images, captions = [], []
    for scene in data.sample_scenes(count * 4, generator):
        if len(scene.objects) != 1 or len(images) == count:
            continue
        item = scene.objects[0]
        pool = data.by_class[item.digit]
        glyph = data.digits[pool[int(torch.randint(0, len(pool), (), generator=generator))]]
        images.append(render([(striped(glyph), item.colour, item.position)], generator))
        captions.append(f"a {STYLE_WORD} {item.colour} {item.digit} on the {item.position}")
    return Concept(torch.stack(images), captions, *style_prompts())


def ordinary_scenes(count: int, digits: Sequence[int] = tuple(range(10)), generator: torch.Generator | None = None
                    ) -> list[Scene]:
    """``count`` one-object scenes of ``digits``, cycling through digits, colours and slots (the prompts on which
    the base model's skills are measured, and from which the prior-preservation pictures are drawn)."""
    offset = int(torch.randint(0, 8, (), generator=generator))
    return [Scene((DigitObject(digits[k % len(digits)], COLOURS[(k // len(digits) + offset) % 4],
                               POSITIONS[(k // (4 * len(digits)) + offset) % 2]),)) for k in range(count)]


def dreambooth_loss(model: nn.Module, schedule: NoiseSchedule, instance: tuple[torch.Tensor, torch.Tensor],
                    prior: tuple[torch.Tensor, torch.Tensor] | None, prior_weight: float = 1.0,
                    caption_dropout: float = 0.1) -> torch.Tensor:
    """DreamBooth's objective (lesson 13, eq. 3): L_simple on the concept's pictures with their captions, plus
    ``prior_weight`` × L_simple on the base model's own samples of the class (``prior``; None: no prior term).

    ``instance`` and ``prior`` are (images, caption tokens) pairs; the noise and timesteps are fresh draws.
    Captions are dropped with probability ``caption_dropout``, as in the base model's training (lesson 09): the
    sampler's guidance uses ε(x_t, ∅), and an adapter that never saw the null caption would change that
    branch untrained — and guidance at scale s multiplies the change by s − 1.
    """
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    loss = conditional_ddpm_loss(model, schedule, *instance, caption_dropout)
    if prior is not None and prior_weight > 0:
        loss = loss + prior_weight * conditional_ddpm_loss(model, schedule, *prior, caption_dropout)
    return loss


# ---------------------------------------------------------------------------------------
# Measures: does a sample show the subject, is it striped, and can the model still do the rest?
# ---------------------------------------------------------------------------------------

def _grey(images: torch.Tensor) -> torch.Tensor:
    """Brightness [N, 32, 32] in [0, 1]: the largest channel (every palette colour has one channel near 1)."""
    return ((images.float() + 1) / 2).amax(1).clamp(0, 1)


def subject_similarity(images: torch.Tensor, glyph: torch.Tensor, positions: Sequence[str]) -> torch.Tensor:
    """Per image, how much its glyph in slot ``positions[i]`` looks like ``glyph``: the largest normalised
    cross-correlation over every spot a glyph can occupy in that slot (one pixel of slack each way), after a
    3×3 blur of both (so stripes or a pixel of stroke width do not decide it). 1: the same picture."""
    blur = lambda z: F.avg_pool2d(z[:, None], 3, 1, 1)[:, 0]  # noqa: E731
    grey, template = blur(_grey(images)), blur(glyph[None].float())[0]
    scores = []
    for image, position in zip(grey, positions, strict=True):
        lefts = range(max(0, GLYPH_LEFTS[position][0] - 1), min(CANVAS - DIGIT_SIZE, GLYPH_LEFTS[position][-1] + 1) + 1)
        tops = range(GLYPH_TOPS[0] - 1, min(CANVAS - DIGIT_SIZE, GLYPH_TOPS[-1] + 1) + 1)
        patches = torch.stack([image[top:top + DIGIT_SIZE, left:left + DIGIT_SIZE] for top in tops for left in lefts])
        scores.append(_ncc_rows(patches, template).max())
    return torch.stack(scores)


def stripe_score(images: torch.Tensor, positions: Sequence[str]) -> torch.Tensor:
    """Per image, the share of its slot's row profile at the stripe frequency: |Σ_y p(y) e^{−2πi y/4}| / Σ_y p(y),
    with p(y) the brightness of row y summed over the slot's columns. Shift-invariant; near 0 for plain digits."""
    grey = _grey(images)
    rows = torch.arange(CANVAS, dtype=torch.float32)
    wave = torch.exp(-2j * torch.pi * rows / STRIPE_PERIOD)
    scores = []
    for image, position in zip(grey, positions, strict=True):
        columns = GLYPH_LEFTS[position]
        profile = image[:, columns[0]:columns[-1] + DIGIT_SIZE].sum(1)
        scores.append((profile * wave).sum().abs() / profile.sum().clamp_min(1e-8))
    return torch.stack(scores)


def real_thresholds(glyph: torch.Tensor, count: int = 500, generator: torch.Generator | None = None
                    ) -> dict[str, float]:
    """The 99th percentiles of :func:`subject_similarity` (to ``glyph``) over real pictures of ordinary
    :data:`SUBJECT_DIGIT` s, of the same for striped ones (to the striped glyph), and of :func:`stripe_score`
    over real plain scenes: above them, a sample counts as "the subject", "the striped subject" or "striped"
    (so 1% of real data passes by chance)."""
    data = CaptionedDigits("train", exclude_heldout_pairs=False)
    sevens = ordinary_scenes(count, (SUBJECT_DIGIT,), generator)
    images = data.render(sevens, generator)
    positions = [s.objects[0].position for s in sevens]
    similarity = subject_similarity(images, glyph, positions).quantile(0.99).item()
    plain = ordinary_scenes(count, generator=generator)
    stripes = stripe_score(data.render(plain, generator), [s.objects[0].position for s in plain]).quantile(0.99)
    pool = data.by_class[SUBJECT_DIGIT]
    striped_sevens = torch.stack([render([(striped(data.digits[pool[int(torch.randint(0, len(pool), (),
                                                                                       generator=generator))]]),
                                           "red", position)], generator) for position in positions])
    striped_similarity = subject_similarity(striped_sevens, striped(glyph), positions).quantile(0.99).item()
    return {"subject_similarity": similarity, "striped_subject_similarity": striped_similarity,
            "stripe_score": stripes.item()}


def _draw_prompts(draw: Draw, captions: list[str], scenes: list[Scene], samples: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """``samples`` pictures of ``captions`` cycled in turn: (images, the slot each asks for, the scenes)."""
    repeat = -(-samples // len(captions))
    captions, scenes = (captions * repeat)[:samples], (scenes * repeat)[:samples]
    return draw(captions, generator), [s.objects[0].position for s in scenes], scenes


def personalisation_report(draw: Draw, judge: nn.Module, glyph: torch.Tensor, thresholds: dict[str, float],
                           samples: int, generator: torch.Generator, subject: bool = True, style: bool = False
                           ) -> dict[str, Any]:
    """Every figure of lesson 13 for one model, from ``samples`` pictures per kind of prompt drawn by ``draw``:

    * ``subject_*`` (prompts "a COLOUR sks 7 on the SLOT", every colour): mean similarity to the subject, the
      share above the real-data threshold, and the judge's digit and colour accuracy;
    * ``class_subject_rate``: the same share for ordinary "a COLOUR 7" prompts: *language drift* when it rises
      (every 7 becomes the subject);
    * ``ordinary_caption_accuracy``: the judge on one-object prompts of every digit (what the model already knew);
    * ``plain_stripe_rate``: the share of striped samples among the ordinary ones (a style leaking out);
    * ``subject_*`` only with ``subject`` (the base model does not know the word), and with ``style``:
      ``style_rate`` and ``style_caption_accuracy`` on "a striped …" prompts.
    """
    def kind(captions: list[str], scenes: list[Scene]) -> tuple[torch.Tensor, list[str], list[Scene]]:
        return _draw_prompts(draw, captions, scenes, samples, generator)

    report: dict[str, Any] = {"samples_per_kind": samples}
    if subject:
        images, positions, scenes = kind(*subject_prompts())
        similarity = subject_similarity(images, glyph, positions)
        judged = caption_report(judge, images, scenes)
        report |= {"subject_similarity": similarity.mean().item(),
                   "subject_rate": (similarity > thresholds["subject_similarity"]).float().mean().item(),
                   "subject_digit_accuracy": judged.digit_accuracy, "subject_colour_accuracy": judged.colour_accuracy}
    sevens = ordinary_scenes(len(COLOURS) * len(POSITIONS), (SUBJECT_DIGIT,))
    images, positions, _ = kind([s.caption() for s in sevens], sevens)
    class_similarity = subject_similarity(images, glyph, positions)
    report["class_subject_similarity"] = class_similarity.mean().item()
    report["class_subject_rate"] = (class_similarity > thresholds["subject_similarity"]).float().mean().item()
    ordinary = ordinary_scenes(40)
    images, positions, scenes = kind([s.caption() for s in ordinary], ordinary)
    judged = caption_report(judge, images, scenes)
    report["ordinary_caption_accuracy"] = judged.caption_accuracy
    report["plain_stripe_rate"] = (stripe_score(images, positions) > thresholds["stripe_score"]).float().mean().item()
    if style:
        images, positions, scenes = kind(*style_prompts())
        stripes = stripe_score(images, positions)
        report["style_stripe_score"] = stripes.mean().item()
        report["style_rate"] = (stripes > thresholds["stripe_score"]).float().mean().item()
        report["style_caption_accuracy"] = caption_report(judge, images, scenes).caption_accuracy
    return report


def combined_captions() -> tuple[list[str], list[Scene]]:
    """The prompts of a merged subject-and-style model: "a striped COLOUR sks 7 on the SLOT", every colour and slot."""
    _, scenes = subject_prompts()  # the subject's scenes; the caption adds the style's word
    captions = [f"a {STYLE_WORD} {s.objects[0].colour} {SUBJECT_WORD} {SUBJECT_DIGIT} on the {s.objects[0].position}"
                for s in scenes]
    return captions, scenes


def merge_report(draw: Draw, judge: nn.Module, glyph: torch.Tensor, thresholds: dict[str, float], samples: int,
                 generator: torch.Generator) -> dict[str, Any]:
    """A merged adapter's figures: on "a striped red sks 7" prompts, is it the striped subject (similarity to the
    striped glyph, and the share above real striped 7s' 99th percentile), striped at all, both, and the right digit
    and colour (judge); and does each concept still work on its own prompts?"""
    images, positions, scenes = _draw_prompts(draw, *combined_captions(), samples, generator)
    # the target is the striped subject: compared with the striped glyph (stripes lower the plain glyph's score)
    similarity = subject_similarity(images, striped(glyph), positions)
    judged = caption_report(judge, images, scenes)
    is_subject = similarity > thresholds["striped_subject_similarity"]
    is_striped = stripe_score(images, positions) > thresholds["stripe_score"]
    report = {"combined_subject_similarity": similarity.mean().item(),
              "combined_subject_rate": is_subject.float().mean().item(),
              "combined_stripe_rate": is_striped.float().mean().item(),
              "combined_both_rate": (is_subject & is_striped).float().mean().item(),
              "combined_caption_accuracy": judged.caption_accuracy}
    alone = personalisation_report(draw, judge, glyph, thresholds, samples, generator, subject=True, style=True)
    return report | alone
