"""The lessons' tables of the shipped networks (lessons 08 and 10–14), recomputed for ``python -m minidiff.tables``.

Each function loads the shipped weights, draws the table's seeded noises or captions and returns the figures the
lesson prints, under the names the lesson's table entry in :mod:`minidiff.tables` publishes. They are measured in
full mode on the device their lesson names (an H100): there they reproduce to float noise, elsewhere within
sampling noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minidiff.samplers import ddim_sample, dpm_solver_pp_sample
from minidiff.schedules import NoiseSchedule


def lesson12_students() -> dict[str, float]:
    """Lesson 12: the teacher's solvers and the shipped students, classifier-FID ratio on the same 1,000 noises."""
    from minidiff.distill import load_student
    from minidiff.distill_recipes import consistency_rows, evaluation_noise, judge_figures, solver_rows
    from minidiff.weights import pretrained

    judge, teacher = pretrained("judge"), pretrained("mnist_ddpm")
    schedule = NoiseSchedule.from_spec(teacher.card["schedule"])
    x_T = evaluation_noise()
    rows = solver_rows(teacher, schedule, judge, x_T) | {
        "consistency": consistency_rows(load_student("mnist_consistency"), schedule, judge, x_T)}
    figures = {f"{'DPM-Solver++' if name == 'DPM-Solver++(2M)' else name} {n}": row["fid_ratio"]
               for name, by_calls in rows.items() for n, row in by_calls.items()}
    progressive = load_student("mnist_progressive")
    figures["progressive 4"] = judge_figures(ddim_sample(progressive, schedule, x_T, steps=4), judge)["fid_ratio"]
    return figures


def lesson13_personalisation() -> dict[str, float]:
    """Lesson 13: the shipped adapters' figures, 1,000 samples per kind (DDIM 50 steps, guidance 3)."""
    from minidiff.dreambooth import personalisation_report, pick_subject, real_thresholds
    from minidiff.lora import load_adapter
    from minidiff.lora_recipes import draw_with
    from minidiff.weights import pretrained

    judge, glyph = pretrained("attribute_judge"), pick_subject()
    thresholds = real_thresholds(glyph, 500, torch.Generator().manual_seed(0))
    figures = {}
    for name in ("base", "lora_subject", "lora_subject_no_prior", "lora_style"):
        model = pretrained("text_digits")
        if name != "base":
            load_adapter(model, name)
        report = personalisation_report(draw_with(model, NoiseSchedule.from_spec(model.card["schedule"])), judge,
                                        glyph, thresholds, 1000, torch.Generator().manual_seed(7),
                                        subject="subject" in name, style=name == "lora_style")
        figures |= {f"{name} {key}": value for key, value in report.items() if key != "samples_per_kind"}
    return figures


def lesson13_extraction() -> dict[str, float]:
    """Lesson 13, section 5: teacher + the best rank-r approximation of the 4-step student's change, 4 calls."""
    import copy

    from minidiff.distill import Student, load_student
    from minidiff.distill_recipes import evaluation_noise, judge_figures
    from minidiff.lora_merge import lora_from_delta
    from minidiff.weights import pretrained

    judge, teacher, student = pretrained("judge"), pretrained("mnist_ddpm"), load_student("mnist_progressive")
    schedule, x_T = NoiseSchedule.from_spec(teacher.card["schedule"]), evaluation_noise()
    figures = {"teacher DDIM 4": judge_figures(ddim_sample(teacher, schedule, x_T, steps=4), judge)["fid_ratio"],
               "student 4": judge_figures(ddim_sample(student, schedule, x_T, steps=4), judge)["fid_ratio"]}
    for rank in (4, 16):
        net, _ = lora_from_delta(copy.deepcopy(teacher), student.net, rank, targets="*")
        figures[f"rank {rank} extract 4"] = judge_figures(ddim_sample(Student(net, schedule).eval(), schedule, x_T,
                                                                      steps=4), judge)["fid_ratio"]
    return figures


def lesson08_mnist() -> dict[str, float]:
    """Lesson 08: the shipped DDPM's classifier-FID ratio under DDIM (η = 0) and DPM-Solver++(2M), 1,000 samples
    from notebook 08's table noises (seed 0), drawn in batches of 500 as the notebook does."""
    from minidiff.metrics import judge_samples
    from minidiff.runtime import budget, device
    from minidiff.weights import pretrained

    model, judge = pretrained("mnist_ddpm"), pretrained("judge")
    schedule = NoiseSchedule.from_spec(model.card["schedule"])
    count = budget(full=1000, fast=8)  # the table's first draws: notebook 08 draws its 1,000 the same way
    x_T = torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device())

    def ratio(sampler: Callable[..., torch.Tensor], steps: int) -> float:
        samples = torch.cat([sampler(model, schedule, x_T=x_T[i:i + 500], steps=steps).cpu()
                             for i in range(0, count, 500)])
        return judge_samples(judge, samples).fid_ratio

    figures = {f"DDIM {n}": ratio(ddim_sample, n) for n in (10, 20, 50, 100)}
    return figures | {f"DPM-Solver++(2M) {n}": ratio(dpm_solver_pp_sample, n) for n in (10, 20)}


def _caption_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The five figures lessons 10 and 11 print from a text model's card."""
    return {key: metrics[key] for key in ("one_object_caption_accuracy", "unseen_pairs_caption_accuracy",
                                          "two_objects_caption_accuracy", "two_objects_binding_accuracy",
                                          "two_objects_swap_rate")}


def lesson10_text() -> dict[str, float]:
    """Lesson 10: the shipped text model's prompt-following, 500 fresh captions per kind (seed 0)."""
    from minidiff.text_recipes import text_model_metrics
    from minidiff.weights import pretrained

    return _caption_figures(text_model_metrics(pretrained("text_digits"), pretrained("attribute_judge"),
                                               torch.Generator().manual_seed(0)))


def lesson11_latent() -> dict[str, float]:
    """Lesson 11: the shipped latent model's prompt-following through the autoencoder, as lesson 10's (seed 0)."""
    from minidiff.text_recipes import latent_model_metrics
    from minidiff.weights import pretrained

    return _caption_figures(latent_model_metrics(pretrained("latent_text_digits"), pretrained("autoencoder"),
                                                 pretrained("attribute_judge"), torch.Generator().manual_seed(0)))


def lesson14_flow() -> dict[str, float]:
    """Lesson 14: the shipped flow model with Euler, plain and with SD3's shift 3, on lesson 12's 1,000 noises."""
    from minidiff.distill_recipes import evaluation_noise, judge_figures
    from minidiff.flow import euler_sample
    from minidiff.flow_recipes import load_flow
    from minidiff.weights import pretrained

    judge, flow, x_1 = pretrained("judge"), load_flow("mnist_flow"), evaluation_noise()
    figures = {}
    with torch.no_grad():
        for n in (1, 2, 4, 8, 16, 50):
            figures[f"Euler {n}"] = judge_figures(euler_sample(flow, x_1, steps=n), judge)["fid_ratio"]
            figures[f"Euler shift 3, {n}"] = judge_figures(euler_sample(flow, x_1, steps=n, shift=3.0),
                                                           judge)["fid_ratio"]
    return figures


#: The seeds of the eight further sets of 1,000 starting noises on which lessons 12 and 14 read the spread.
NOISE_SET_SEEDS = tuple(range(8))


def few_step_noise_sets(seeds: tuple[int, ...] = NOISE_SET_SEEDS) -> dict[str, dict[str, float]]:
    """Lessons 12 and 14, "one draw of noises is not the truth": the few-step cells of both tables, each
    judged on ``seeds`` sets of 1,000 starting noises (seed s: ``standard_normal`` from a CPU generator seeded s);
    per cell the mean, the lowest and the highest classifier-FID ratio over the sets."""
    from minidiff.distill import load_student
    from minidiff.distill_recipes import judge_figures
    from minidiff.flow import euler_sample
    from minidiff.flow_recipes import load_flow
    from minidiff.runtime import budget, device, standard_normal
    from minidiff.weights import pretrained

    judge, teacher = pretrained("judge"), pretrained("mnist_ddpm")
    schedule = NoiseSchedule.from_spec(teacher.card["schedule"])
    progressive, flow = load_student("mnist_progressive"), load_flow()
    cells: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "DDIM 4": lambda x: ddim_sample(teacher, schedule, x, steps=4),
        "DDIM 16": lambda x: ddim_sample(teacher, schedule, x, steps=16),
        "DDIM 50": lambda x: ddim_sample(teacher, schedule, x, steps=50),
        "DPM-Solver++ 16": lambda x: dpm_solver_pp_sample(teacher, schedule, x, steps=16),
        "DPM-Solver++ 50": lambda x: dpm_solver_pp_sample(teacher, schedule, x, steps=50),
        "progressive 4": lambda x: ddim_sample(progressive, schedule, x, steps=4),
        "flow Euler 8": lambda x: euler_sample(flow, x, steps=8),
        "flow Euler 16": lambda x: euler_sample(flow, x, steps=16),
        "flow Euler shift 3, 8": lambda x: euler_sample(flow, x, steps=8, shift=3.0),
        "flow Euler shift 3, 16": lambda x: euler_sample(flow, x, steps=16, shift=3.0)}
    ratios: dict[str, list[float]] = {name: [] for name in cells}
    with torch.no_grad():
        for seed in seeds:
            x_T = standard_normal((budget(full=1000, fast=8), 1, 28, 28), torch.Generator().manual_seed(seed),
                                  device())
            for name, draw in cells.items():
                ratios[name].append(judge_figures(draw(x_T), judge)["fid_ratio"])
            print(f"noise set {seed}:", {name: values[-1] for name, values in ratios.items()}, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for name, values in ratios.items():
        known = [value for value in values if value is not None]  # None: fast mode's 8 samples, no FID
        summary[name] = ({"mean": round(sum(known) / len(known), 3), "min": min(known), "max": max(known)}
                         if known else {})
    return summary


def few_step_spread() -> dict[str, float]:
    """The table of :func:`few_step_noise_sets` flattened: ``CELL mean``, ``CELL min``, ``CELL max``."""
    return {f"{name} {key}": value for name, figures in few_step_noise_sets().items()
            for key, value in figures.items()}
