"""Recipes for lesson 13's adapters of the lesson 10 text model (run them with ``python -m minidiff.recipes NAME``).

    lora_subject           DreamBooth-style LoRA (rank 4): one particular 7, bound to the word "sks", with prior
                           preservation
    lora_subject_no_prior  the same without the prior term: the language-drift example
    lora_style             LoRA (rank 4): horizontal stripes, bound to the word "striped", with prior preservation

:func:`personalise` is the whole procedure (prior samples from the base model, words, adapter, training,
figures); lesson 13's tables of ranks, full fine-tuning and merging call it with other settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff.dreambooth import (
    SUBJECT_DIGIT,
    Concept,
    dreambooth_loss,
    merge_report,
    ordinary_scenes,
    personalisation_report,
    pick_subject,
    real_thresholds,
    style_concept,
    subject_concept,
)
from minidiff.lora import adapter_card, adapter_size, add_words, inject, save_adapter
from minidiff.lora_merge import add_zip_gates, gate_overlap, stack_adapters, zip_merge_loss
from minidiff.recipes import batch_generator, rounded
from minidiff.runtime import budget, device, is_fast, seed_everything
from minidiff.schedules import NoiseSchedule
from minidiff.text import sample_captions, tokenize
from minidiff.text_recipes import TEXT_EVAL
from minidiff.train import TrainResult, fit
from minidiff.weights import pretrained

#: The base model every adapter of lesson 13 adapts.
BASE = "text_digits"
#: The guidance scale and DDIM steps of every sample lesson 13 draws (lesson 10's card figures use the same).
EVAL = dict(TEXT_EVAL)


@dataclass
class Personalised:
    """What :func:`personalise` returns: the adapted model, its training run and its figures."""

    model: nn.Module
    result: TrainResult
    report: dict[str, Any]
    trainable: int
    #: the GPU memory training took beyond what was allocated before it (the models, the pictures), in MiB
    peak_memory_mb: float | None


def draw_with(model: nn.Module, schedule: NoiseSchedule) -> Callable[[list[str], torch.Generator], torch.Tensor]:
    """``draw(captions, generator)``: samples of ``model`` at lesson 10's settings (:data:`EVAL`)."""
    def draw(captions: list[str], generator: torch.Generator) -> torch.Tensor:
        return sample_captions(model, schedule, captions, EVAL["scale"], budget(full=EVAL["steps"], fast=4), generator)
    return draw


def prior_samples(base: nn.Module, schedule: NoiseSchedule, concept: str, count: int, generator: torch.Generator,
                  class_share: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """The base model's own pictures for prior preservation (lesson 13, eq. 3): for the subject, ``class_share`` of
    them of its class ("a COLOUR 7 on the SLOT") and the rest of every digit; for the style, every digit.

    DreamBooth's prior is the class alone. In a model this small every digit shares every weight, so a class-only
    prior leaves the other nine digits unguarded (ordinary accuracy 0.90-0.94 over three seeds on an H100), and a
    prior of every digit guards the 7s too weakly (a third to two thirds of plain 7s became the subject); half and half
    kept both (lesson 13, section 2)."""
    if not 0.0 <= class_share <= 1.0:
        raise ValueError(f"class_share must be a share between 0 and 1, got {class_share!r}")
    in_class = round(count * class_share) if concept == "subject" else 0
    scenes = ordinary_scenes(in_class, (SUBJECT_DIGIT,), generator) if in_class else []
    scenes += ordinary_scenes(count - in_class, tuple(range(10)), generator)
    captions = [scene.caption() for scene in scenes]
    return draw_with(base, schedule)(captions, generator), captions


def _base(directory: Path | None) -> tuple[nn.Module, nn.Module, NoiseSchedule]:
    """The base model, lesson 10's attribute judge and the base model's schedule."""
    model = pretrained(BASE, directory=directory)
    return model, pretrained("attribute_judge", directory=directory), NoiseSchedule.from_spec(model.card["schedule"])


def _measure(report: Callable[..., dict[str, Any]], model: nn.Module, schedule: NoiseSchedule, judge: nn.Module,
             glyph: torch.Tensor, seed: int, **options: Any) -> dict[str, Any]:
    """``report`` (:func:`~minidiff.dreambooth.personalisation_report` or :func:`~minidiff.dreambooth.merge_report`)
    of ``model`` at the real-data thresholds, with lesson 13's sample counts and seeds, rounded for a card."""
    thresholds = real_thresholds(glyph, budget(full=500, fast=20), torch.Generator().manual_seed(seed))
    figures = report(draw_with(model, schedule), judge, glyph, thresholds, budget(full=200, fast=4),
                     torch.Generator().manual_seed(seed + 1), **options)
    return {name: rounded(value) if isinstance(value, float) else value for name, value in figures.items()}


def personalise(concept: str = "subject", rank: int | None = 4, targets: str = "unet", prior_weight: float = 1.0,
                steps: int | None = None, lr: float | None = None, seed: int = 0, prior_count: int | None = None,
                prior_class_share: float = 0.5,
                batch_size: int | None = None, evaluate: bool = True, progress: bool = False,
                directory: Path | None = None) -> Personalised:
    """DreamBooth on lesson 10's model: a new word, an adapter of ``rank`` on ``targets`` (None: fine-tune every
    weight instead), trained on the concept's eight pictures plus ``prior_weight`` × the base model's own samples
    (lesson 13, eq. 3; ``prior_class_share`` of them of the subject's class, see :func:`prior_samples`), then
    measured by :func:`~minidiff.dreambooth.personalisation_report`."""
    if concept not in ("subject", "style"):
        raise ValueError(f"concept must be 'subject' or 'style', got {concept!r}")
    generator = seed_everything(seed)
    model, judge, schedule = _base(directory)
    glyph = pick_subject()
    data: Concept = subject_concept(glyph, 8, generator) if concept == "subject" else style_concept(8, generator)
    prior_images, prior_captions = prior_samples(model, schedule, concept, prior_count or budget(full=200, fast=4),
                                                 generator, prior_class_share)
    add_words(model, ["sks"] if concept == "subject" else ["striped"])
    if rank is None:  # full fine-tuning: every weight (and the new word) trains
        model.requires_grad_(True)
    else:
        inject(model, rank, targets=targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = device()
    instance = (data.images.to(where), tokenize(data.captions, vocabulary=model.vocabulary).to(where))
    prior = (prior_images.to(where), tokenize(prior_captions, vocabulary=model.vocabulary).to(where))
    batch_size = batch_size or budget(full=32, fast=4)
    rows = batch_generator(seed)

    def next_batch() -> tuple[torch.Tensor, ...]:
        pick = torch.randint(0, len(instance[0]), (batch_size,), generator=rows, device=where)
        pick_prior = torch.randint(0, len(prior[0]), (batch_size,), generator=rows, device=where)
        return instance[0][pick], instance[1][pick], prior[0][pick_prior], prior[1][pick_prior]

    def loss(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return dreambooth_loss(net, schedule, batch[:2], batch[2:], prior_weight)

    already = 0
    if where.type == "cuda":  # what training itself takes: gradients, optimiser state, activations, buffers
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(where)
        already = torch.cuda.memory_allocated(where)
    steps = steps or budget(full=800, fast=3)
    lr = lr or (1e-4 if rank is None else 1e-3)
    result = fit(model, loss, next_batch, steps, lr=lr, ema_decay=None, warmup_steps=min(50, steps // 5),
                 cosine_decay=True, bf16=True, progress=progress)
    peak = (torch.cuda.max_memory_allocated(where) - already) / 2**20 if where.type == "cuda" else None
    report = _measure(personalisation_report, model, schedule, judge, glyph, seed, subject=concept == "subject",
                      style=concept == "style") if evaluate else {}
    return Personalised(model, result, report, trainable, peak)


def base_report(seed: int = 0, directory: Path | None = None) -> dict[str, Any]:
    """The base model's figures on the same prompts (the subject's prompts need the new word, so they are absent)."""
    model, judge, schedule = _base(directory)
    return _measure(personalisation_report, model, schedule, judge, pick_subject(), seed, subject=False)


def merged(kind: str, adapters: tuple[str | Path, str | Path] = ("lora_subject", "lora_style"),
           steps: int | None = None, overlap_weight: float = 0.01, seed: int = 0, evaluate: bool = True,
           progress: bool = False, directory: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The subject and style adapters on one model (lesson 13, §merging): ``kind`` "sum" (plain addition, eq. 4),
    "half" (each at strength 0.5) or "zip" (ZipLoRA's learned per-column coefficients, eq. 5, trained for
    ``steps`` on the two concepts' own pictures). Returns the model and :func:`~minidiff.dreambooth.merge_report`."""
    if kind not in ("sum", "half", "zip"):
        raise ValueError(f"kind must be 'sum', 'half' or 'zip', got {kind!r}")
    generator = seed_everything(seed)
    model, judge, schedule = _base(directory)
    stack_adapters(model, list(adapters), [0.5, 0.5] if kind == "half" else [1.0, 1.0])
    glyph = pick_subject()
    seconds = 0.0
    if kind == "zip":
        add_zip_gates(model)
        where = device()
        concepts = [subject_concept(glyph, 8, generator), style_concept(8, generator)]
        pools = [(c.images.to(where), tokenize(c.captions, vocabulary=model.vocabulary).to(where)) for c in concepts]
        rows, size = batch_generator(seed), budget(full=16, fast=2)

        def next_batch() -> tuple[torch.Tensor, ...]:
            picks = [torch.randint(0, len(images), (size,), generator=rows, device=where) for images, _ in pools]
            return tuple(tensor[pick] for (images, tokens), pick in zip(pools, picks, strict=True)
                         for tensor in (images, tokens))

        def loss(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return zip_merge_loss(net, schedule, [batch[:2], batch[2:]], overlap_weight)

        result = fit(model, loss, next_batch, steps or budget(full=400, fast=2), lr=1e-2, ema_decay=None,
                     grad_clip=None, bf16=True, progress=progress)
        seconds = result.seconds
    report: dict[str, Any] = {"kind": kind, "train_seconds": round(seconds, 1)}
    if kind == "zip":
        report["gate_overlap"] = rounded(gate_overlap(model).item())
    if evaluate:
        report |= _measure(merge_report, model, schedule, judge, glyph, seed)
    return model, report


def _recipe(name: str, concept: str, prior_weight: float, full_steps: int) -> Callable[..., dict[str, Any]]:
    def train(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
              judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
        if time_limit is not None:  # refused rather than ignored: an adapter's run is a fixed number of steps
            raise ValueError(f"{name} takes no time limit (it trains {full_steps} steps, about a minute on a GPU); "
                             "use --steps to shorten it")
        start = time.perf_counter()
        run = personalise(concept, 4, "unet", prior_weight, steps or budget(full=full_steps, fast=3), seed=seed,
                          progress=progress, directory=judge_directory)
        command = f"python -m minidiff.recipes {name}" + (" --fast" if is_fast() else "")
        command += f" --seed {seed}" if seed else ""
        card = {"name": name, "recipe": command, "seed": seed, "fast_mode": is_fast(), "steps": run.result.steps,
                "train_seconds": round(run.result.seconds, 1), "device": str(device()), "torch": torch.__version__,
                "stopped_by_time_limit": False, "concept": concept, "prior_weight": prior_weight,
                "prior_class_share": 0.5 if concept == "subject" else 0.0,
                "trainable_parameters": run.trainable,
                "peak_gpu_memory_mb": None if run.peak_memory_mb is None else round(run.peak_memory_mb, 1),
                "metrics": run.report, "sampler": f"DDIM eta=0, {EVAL['steps']} steps, guidance {EVAL['scale']}",
                "seconds_in_all": round(time.perf_counter() - start, 1)}
        if device().type == "cuda":
            card["device"] = torch.cuda.get_device_name(device())
        adapter_card(run.model)  # fails early (before writing) if the model cannot be saved as an adapter
        print(f"{name}: {adapter_size(run.model)} adapter numbers; {run.report}")
        return save_adapter(run.model, out / f"{name}.safetensors", card)
    train.__doc__ = (f"Lesson 13's {name} adapter: :func:`personalise` ({concept}, rank 4, prior weight "
                     f"{prior_weight}, {full_steps} steps).")
    return train


#: The style needs more steps than the subject: stripes must carry over to every digit from eight pictures (at 800
#: steps, 20% of striped prompts came out striped on an H100; at 2,000, 60%).
LORA_RECIPES: dict[str, Callable[..., dict[str, Any]]] = {
    "lora_subject": _recipe("lora_subject", "subject", 1.0, 800),
    "lora_subject_no_prior": _recipe("lora_subject_no_prior", "subject", 0.0, 800),
    "lora_style": _recipe("lora_style", "style", 1.0, 2000)}
