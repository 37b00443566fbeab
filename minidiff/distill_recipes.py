"""Recipes for the few-step students of lesson 12 (run them with ``python -m minidiff.recipes NAME``).

    mnist_progressive   progressive distillation of mnist_ddpm: 16 → 8 → 4 → 2 → 1 steps (ships the 4-step one)
    mnist_consistency   consistency distillation of mnist_ddpm (32 boundaries, an EMA target network)
    lcm_lora            a latent consistency model of lesson 11's latent_text_digits, as a rank-4 LoRA adapter

The MNIST students start from a copy of the shipped ``mnist_ddpm`` teacher and are judged, like every row of
lesson 12's table, on the same 1,000 starting noises (:func:`evaluation_noise`) by lesson 07's judge; the latent
consistency adapter is judged on prompt-following by lesson 10's attribute judge, beside its teacher's DDIM.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff.autoencoder import Autoencoder, encode_pool
from minidiff.data import CaptionedDigits
from minidiff.distill import (
    Student,
    TargetNetwork,
    consistency_loss,
    consistency_sample,
    load_student,
    progressive_distillation_loss,
    student_card,
    without_dropout,
    x0_from_eps_model,
)
from minidiff.latent_consistency import LCM_SPEC, FewStepTextToImage, latent_consistency_loss
from minidiff.lora import adapter_card, adapter_size, inject, save_adapter
from minidiff.metrics import judge_samples
from minidiff.pipeline import TextToImage
from minidiff.recipes import MNIST_SCHEDULE, _mnist_on_device, batch_generator, recipe_card, recipe_fit, rounded
from minidiff.runtime import budget, device, seed_everything, standard_normal
from minidiff.samplers import ddim_sample, dpm_solver_pp_sample
from minidiff.schedules import NoiseSchedule
from minidiff.text import scene_pool
from minidiff.text_recipes import CAPTIONED_DATA, batched_draw, evaluate_prompt_following, report_metrics
from minidiff.train import TrainResult, random_rows
from minidiff.weights import pretrained, save_weights, schedule_from_card

#: The seed of the starting noises that every row of lesson 12's table shares.
EVALUATION_SEED = 1234
#: Network calls at which the table judges every sampler.
CALLS = (1, 2, 4, 8)


def evaluation_noise(count: int | None = None, target: torch.device | None = None) -> torch.Tensor:
    """The fixed starting noises x_T of lesson 12's table ([count, 1, 28, 28], 1,000 in full mode)."""
    count = count or budget(full=1000, fast=8)
    return standard_normal((count, 1, 28, 28), torch.Generator().manual_seed(EVALUATION_SEED), target or device())


def judge_figures(samples: torch.Tensor, judge: nn.Module) -> dict[str, float | None]:
    """The table's three figures: classifier-FID ratio (null below 128 samples), confidence and class coverage."""
    report = judge_samples(judge, samples)
    return {"fid_ratio": rounded(report.fid_ratio), "mean_confidence": round(report.samples.mean_confidence, 4),
            "min_class_share": round(report.samples.min_class_share, 4)}


def solver_rows(teacher: nn.Module, schedule: NoiseSchedule, judge: nn.Module, x_T: torch.Tensor,
                calls: tuple[int, ...] = CALLS) -> dict[str, dict[int, dict[str, float | None]]]:
    """The baseline rows: DDIM (η = 0) and DPM-Solver++(2M) of the teacher at each number of calls."""
    return {"DDIM": {n: judge_figures(ddim_sample(teacher, schedule, x_T, steps=n), judge) for n in calls},
            "DPM-Solver++(2M)": {n: judge_figures(dpm_solver_pp_sample(teacher, schedule, x_T, steps=n), judge)
                                 for n in calls}}


def consistency_rows(student: Student, schedule: NoiseSchedule, judge: nn.Module, x_T: torch.Tensor,
                     calls: tuple[int, ...] = CALLS) -> dict[int, dict[str, float | None]]:
    """A consistency model's figures with 1, 2, … calls of multistep sampling (re-noising drawn from a fixed seed)."""
    return {n: judge_figures(consistency_sample(student, schedule, x_T, steps=n, generator=torch.Generator(
        x_T.device).manual_seed(EVALUATION_SEED + 1)), judge) for n in calls}


def _progressive_student(name_or_path: str | Path, final_steps: int) -> tuple[Student, str]:
    """The student a progressive chain continues from (see :func:`train_mnist_progressive`), and its name."""
    path = Path(name_or_path)
    directory, name = (path.parent, path.stem) if path.suffix == ".safetensors" else (None, str(name_or_path))
    if directory is not None and not path.is_file():
        raise FileNotFoundError(f"continue_from: no file {path}")
    student = load_student(name, directory=directory)
    if student.card["student"].get("kind") != "progressive" or "rounds" not in student.card:
        raise ValueError(f"continue_from must be a progressive student of this recipe, but {name!r}'s card has "
                         f"student kind {student.card['student'].get('kind')!r}")
    if student.card["student"]["steps"] // 2 < budget(full=final_steps, fast=1):
        raise ValueError(f"continue_from: {name!r} takes {student.card['student']['steps']} steps, so no round is "
                         f"left before final_steps={final_steps}")
    return student, name


def _teacher(name: str = "mnist_ddpm") -> tuple[nn.Module, NoiseSchedule]:
    teacher = pretrained(name).requires_grad_(False)
    return teacher, NoiseSchedule.from_spec(teacher.card["schedule"])


def train_mnist_progressive(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                            judge_directory: Path | None = None, time_limit: float | None = None,
                            final_steps: int = 1, continue_from: str | Path | None = None) -> dict[str, Any]:
    """Progressive distillation (Salimans & Ho 2022): rounds of ``steps`` updates, each student taking half the
    steps of its teacher, from DDIM-32 of mnist_ddpm down to ``final_steps`` (1, 2 or 4), the
    student's dropout off. Writes the 4-step student (the shipped one) as ``mnist_progressive`` and every round's
    student as ``mnist_progressive_N``; the card records the judge's figures of every round. ``time_limit``
    bounds each round. Fast mode always runs its two smoke-test rounds, 2 → 1 step, whatever ``final_steps``.

    ``continue_from`` picks a chain up where a student of this recipe stopped: a shipped name
    (``"mnist_progressive"``) or a path to a ``mnist_progressive*.safetensors`` with its card. Its card's rounds up
    to itself are kept (later ones, continued from it before, are replaced), the next round halves its steps, and if
    it is the 4-step student, ``mnist_progressive`` is written again as that student (the same tensors) with the new
    rounds on its card. The continued rounds draw their own noise, so they match an unbroken chain's in
    distribution, not bit for bit, and the new rounds' entries say so."""
    if final_steps not in (1, 2, 4):
        raise ValueError(f"final_steps must be 1, 2 or 4 (the shipped student takes 4), got {final_steps!r}")
    judge = pretrained("judge", directory=judge_directory)
    seed_everything(seed)
    teacher, schedule = _teacher()
    images, _ = _mnist_on_device()
    x_T = evaluation_noise()
    steps = steps or budget(full=2800, fast=2)
    batch_size = budget(full=256, fast=4)
    student_steps, shipped_steps = budget(full=16, fast=2), budget(full=4, fast=1)
    rounds, shipped, seconds, continued = [], None, 0.0, {}
    if continue_from is None:
        # dropout off: the target is deterministic, and the student samples as the network it was fitted as (§2)
        student = Student(without_dropout(copy.deepcopy(teacher)).requires_grad_(True), schedule)
        teacher_x0 = x0_from_eps_model(teacher, schedule)
    else:
        start, name = _progressive_student(continue_from, final_steps)
        # its own chain up to itself: rounds continued from it before are replaced by the ones this run trains
        rounds = [entry for entry in start.card["rounds"] if entry["steps"] >= start.card["student"]["steps"]]
        seconds = rounds[-1]["cumulative_train_seconds"]
        continued = {"continued_from": name}
        if start.card["student"]["steps"] == shipped_steps:  # written again below, its card gaining the new rounds
            added_by_saving = ("model", "parameters", "stored_dtype", "file_bytes", "sha256")
            shipped = (copy.deepcopy(start), {key: value for key, value in start.card.items()
                                              if key not in added_by_saving})
        teacher_x0 = copy.deepcopy(start).requires_grad_(False).x0
        student = without_dropout(start).train().requires_grad_(True)
        student_steps = start.card["student"]["steps"] // 2
    while student_steps >= budget(full=final_steps, fast=1):
        def loss(net: Student, x0: torch.Tensor, teacher_x0: Callable = teacher_x0, n: int = student_steps
                 ) -> torch.Tensor:
            return progressive_distillation_loss(net, teacher_x0, schedule, x0, n)

        result = recipe_fit(student, loss, random_rows(images, batch_size, batch_generator(seed + student_steps)),
                            steps, 2e-4, 100, ema_decay=0.998, progress=progress, time_limit=time_limit)
        seconds += result.seconds
        distilled = result.ema_model()
        figures = judge_figures(ddim_sample(distilled, schedule, x_T, steps=student_steps), judge)
        print(f"progressive distillation, {student_steps} steps: {figures} after {seconds:.0f} s in all")
        rounds.append({"steps": student_steps, "train_steps": result.steps,
                       "cumulative_train_seconds": round(seconds, 1)} | figures | continued)
        card = recipe_card("mnist_progressive", result, batch_size, seed, figures | {"samples": len(x_T)},
                           student_card("progressive", student_steps, "mnist_ddpm",
                                        {"schedule": MNIST_SCHEDULE, "weights": "EMA", "student_dropout": 0.0,
                                         "rounds": list(rounds)}),
                           time_limit)
        save_weights(distilled.net, out / f"mnist_progressive_{student_steps}.safetensors", card)
        if student_steps == shipped_steps:
            shipped = (copy.deepcopy(distilled), card)  # a copy: the next round trains `distilled` on
        teacher_x0 = copy.deepcopy(distilled).requires_grad_(False).x0  # this round's student teaches the next
        student, student_steps = distilled.train().requires_grad_(True), student_steps // 2
    if shipped is None:  # continued from a student past the shipped one: only mnist_progressive_N were written
        return card
    distilled, card = shipped
    card["rounds"] = rounds  # the shipped card records every round, the later ones included
    return save_weights(distilled.net, out / "mnist_progressive.safetensors", card)


def train_mnist_consistency(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                            judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """Consistency distillation (Song et al. 2023, Algorithm 2) of mnist_ddpm: one DDIM step of the teacher
    between neighbouring boundaries of a 32-step grid, a target network with μ = 0.95, pseudo-Huber distance."""
    judge = pretrained("judge", directory=judge_directory)
    seed_everything(seed)
    teacher, schedule = _teacher()
    images, _ = _mnist_on_device()
    steps = steps or budget(full=10000, fast=2)
    batch_size, boundaries, decay = budget(full=256, fast=4), budget(full=32, fast=4), 0.95
    student = Student(copy.deepcopy(teacher).requires_grad_(True), schedule)
    target, teacher_x0 = TargetNetwork(student, decay), x0_from_eps_model(teacher, schedule)
    start = time.perf_counter()
    result = recipe_fit(student, lambda net, x0: consistency_loss(net, target, schedule, x0, boundaries, teacher_x0),
                        random_rows(images, batch_size, batch_generator(seed)), steps, 2e-4, 200, ema_decay=0.999,
                        progress=progress, time_limit=time_limit)
    distilled, x_T = result.ema_model(), evaluation_noise()
    calls = consistency_rows(distilled, schedule, judge, x_T)
    print(f"consistency distillation ({time.perf_counter() - start:.0f} s):", calls)
    metrics = {"samples": len(x_T), "calls": {str(n): figures for n, figures in calls.items()}}
    card = recipe_card("mnist_consistency", result, batch_size, seed, metrics | calls[1],
                       student_card("consistency_distillation", 1, "mnist_ddpm",
                                    {"schedule": MNIST_SCHEDULE, "weights": "EMA", "boundaries": boundaries,
                                     "target_decay": decay, "huber_c": round(0.00054 * 784**0.5, 5)}), time_limit)
    return save_weights(distilled.net, out / "mnist_consistency.safetensors", card)


# ---------------------------------------------------------------------------------------
# Lesson 12, section 6: a latent consistency model of lesson 11's text-to-image model
# ---------------------------------------------------------------------------------------

#: Sampler steps at which the latent consistency table compares the student with its teacher's guided DDIM.
LCM_STEPS = (1, 2, 4)


def latent_consistency_distill(rank: int | None = LCM_SPEC["rank"], steps: int | None = None, seed: int = 0,
                               batch_size: int | None = None, progress: bool = False,
                               directory: Path | None = None, time_limit: float | None = None
                               ) -> tuple[Student, TrainResult, Autoencoder]:
    """Latent consistency distillation of the shipped ``latent_text_digits`` (lesson 12, eq. 10): the student is a
    copy of the teacher with a LoRA adapter of ``rank`` on its U-Net (None: every weight trains), distilled from
    the teacher's DDIM guided at ``LCM_SPEC['scale']`` on 100,000 captioned scenes encoded once.

    Returns the student (its EMA weights), the training run and the autoencoder."""
    generator = seed_everything(seed)
    teacher = pretrained("latent_text_digits", directory=directory).requires_grad_(False)
    autoencoder = pretrained("autoencoder", directory=directory)
    schedule = schedule_from_card(teacher.card)
    images, tokens = scene_pool(CaptionedDigits("train"), budget(full=100_000, fast=32), generator, device())
    latents = encode_pool(autoencoder, images, generator)  # the student, like its teacher, never sees a pixel
    del images
    net = copy.deepcopy(teacher)
    if rank is None:
        net.requires_grad_(True)
    else:
        inject(net, rank, targets="unet")
    # σ_data of the parameterisation is the data's own spread: the latents were scaled to unit variance (lesson 11)
    student = Student(net, schedule, round(latents.float().std().item(), 3))
    target = TargetNetwork(student, LCM_SPEC["target_decay"])

    def loss(model: Student, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return latent_consistency_loss(model, target, teacher, schedule, batch[0], batch[1])

    batch_size = batch_size or budget(full=256, fast=4)
    result = recipe_fit(student, loss, random_rows((latents, tokens), batch_size, batch_generator(seed)),
                        steps or budget(full=8000, fast=2), 1e-3 if rank is not None else 2e-4, 200,
                        ema_decay=0.999, progress=progress, time_limit=time_limit)
    return result.ema_model().eval(), result, autoencoder


def latent_consistency_rows(student: Student, autoencoder: Autoencoder, seed: int = 0,
                            directory: Path | None = None, steps: tuple[int, ...] = LCM_STEPS
                            ) -> dict[str, dict[int, dict[str, Any]]]:
    """Lesson 12's latent table: prompt-following (attribute judge, 500 fresh captions per kind) of the student
    with 1, 2, 4 calls and of its teacher's DDIM guided at the same scale with as many steps (each step two
    network evaluations, batched as one), on the same captions and starting latents."""
    judge = pretrained("attribute_judge", directory=directory)
    teacher = pretrained("latent_text_digits", directory=directory)
    pipelines = {"LCM": (FewStepTextToImage(student, autoencoder), {}),
                 "DDIM": (TextToImage(teacher, autoencoder, schedule_from_card(teacher.card)),
                          {"scale": LCM_SPEC["scale"]})}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name, (pipeline, options) in pipelines.items():
        rows[name] = {}
        for n in steps:
            figures = report_metrics(evaluate_prompt_following(batched_draw(pipeline, steps=n, **options), judge,
                                                               budget(full=500, fast=4),
                                                               torch.Generator().manual_seed(seed)))
            rows[name][n] = {key: figures[key] for key in ("one_object_caption_accuracy",
                                                           "unseen_pairs_caption_accuracy",
                                                           "two_objects_caption_accuracy")}
            print(f"{name}, {n} step(s):", rows[name][n])
    return rows


def train_lcm_lora(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                   judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """LCM-LoRA (Luo et al. 2023b) of lesson 11's model: :func:`latent_consistency_distill` at rank 4, judged by
    :func:`latent_consistency_rows`; writes the adapter ``lcm_lora`` (a few hundred kilobytes) and its card."""
    start = time.perf_counter()
    student, result, autoencoder = latent_consistency_distill(steps=steps, seed=seed, progress=progress,
                                                              directory=judge_directory, time_limit=time_limit)
    rows = latent_consistency_rows(student, autoencoder, seed, judge_directory)
    metrics = {f"{name}_{n}": figures for name, by_steps in rows.items() for n, figures in by_steps.items()}
    card = recipe_card("lcm_lora", result, budget(full=256, fast=4), seed, metrics,
                       {"data": CAPTIONED_DATA, "weights": "EMA",
                        "student": {"kind": "latent_consistency", "teacher": "latent_text_digits",
                                    "sigma_data": student.sigma_data, **LCM_SPEC},
                        "seconds_in_all": round(time.perf_counter() - start, 1)}, time_limit)
    adapter_card(student.net)  # fails early (before writing) if the student cannot be saved as an adapter
    print(f"lcm_lora: {adapter_size(student.net)} adapter numbers")
    return save_adapter(student.net, out / "lcm_lora.safetensors", card)


DISTILL_RECIPES: dict[str, Callable[..., dict[str, Any]]] = {
    "mnist_progressive": train_mnist_progressive, "mnist_consistency": train_mnist_consistency,
    "lcm_lora": train_lcm_lora}
