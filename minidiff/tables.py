"""``python -m minidiff.tables``: recompute the lessons' measured tables and report how far they drift.

Each entry below is one table printed in a lesson: the function that recomputes it, the figures the lesson
publishes, and the tolerance within which a rerun must land. The tables listed here use exact oracles (Gaussian
data, Gaussian mixtures) and fixed seeds, so they reproduce on any machine, CPU or GPU, to float rounding:

    python -m minidiff.tables            # every table, with its drift
    python -m minidiff.tables --list     # what there is
    python -m minidiff.tables lesson08-orders

Tables of trained networks are measured with the shipped weights in full mode, on the device their lesson names
(an H100): they reproduce there to float noise, and elsewhere within sampling noise. They run only when asked:

    python -m minidiff.tables --trained  # the oracle tables and lessons 08 and 10–14's tables of shipped networks

Lesson 08's MNIST table and lessons 10 and 11's prompt-following tables were first measured with other noises or
captions (the notebook's, the card's), so their rerun agrees within sampling noise, not to float rounding. Tables of
a network trained in the notebook itself (lessons 07 and 09) are measured by the notebooks in full mode on a GPU;
each of those tables says in its lesson which device, seed and command produced it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minidiff.guidance import classifier_guidance
from minidiff.oracles import GaussianData, mixture_eps_model, mixture_guidance_oracles, mixture_noisy_classifier
from minidiff.samplers import ddim_sample, ddpm_sample, ddpm_step, dpm_solver_pp_sample, pf_ode_sample
from minidiff.schedules import NoiseSchedule
from minidiff.toys import GaussianMixture, eight_gaussians_mixture


@dataclass
class Table:
    """One published table: where it is, how to recompute it, what the lesson prints, how close a rerun must be."""

    name: str
    lesson: str
    compute: Callable[[], dict[str, float]]
    published: dict[str, float]
    relative_tolerance: float
    #: a figure within this absolute distance also passes (rates published as 0 have no relative drift)
    absolute_tolerance: float = 0.0
    #: needs shipped networks and, to be quick, a GPU: run only with --trained or by name
    trained: bool = False


def _lesson08_orders() -> dict[str, float]:
    """Lesson 08: endpoint errors against the exact flow map of Gaussian data (cosine schedule, 1,000 points)."""
    schedule = NoiseSchedule.cosine(1000)
    data = GaussianData(schedule, mean=0.5, var=0.3)
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha_bar_T = float(schedule.alpha_bars[-1])
    sigma_bar_T = ((1 - alpha_bar_T) / alpha_bar_T) ** 0.5
    exact = data.mean + (x_T / alpha_bar_T**0.5 - data.mean) * (data.var / (data.var + sigma_bar_T**2)) ** 0.5
    solvers = {"ddim": lambda n: ddim_sample(data.optimal_eps, schedule, x_T=x_T, steps=n),
               "heun": lambda n: pf_ode_sample(data.optimal_eps, schedule, x_T=x_T, steps=n),
               "dpm": lambda n: dpm_solver_pp_sample(data.optimal_eps, schedule, x_T=x_T, steps=n)}
    return {f"{name} {steps}": (solve(steps) - exact).abs().mean().item()
            for name, solve in solvers.items() for steps in (3, 10, 40, 160, 320)}


def _lesson09_tilt() -> dict[str, float]:
    """Lesson 09: guided samples of two Gaussians (exact oracles), DDPM and all-steps DDIM, 20,000 samples."""
    mixture = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                              0.36 * torch.eye(2).repeat(2, 1, 1))
    labels = torch.tensor([0, 1])
    schedule = NoiseSchedule.cosine(200)
    unconditional, _ = mixture_guidance_oracles(mixture, labels, schedule)
    classifier = mixture_noisy_classifier(mixture, labels, schedule)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(20_000, 2, generator=generator, dtype=torch.float64)
    figures = {}
    for gamma in (1.0, 3.0, 6.0):
        guided = classifier_guidance(unconditional, classifier, schedule, 1, gamma)
        stochastic = ddpm_sample(guided, schedule, x_T=x_T, generator=generator)
        deterministic = ddim_sample(guided, schedule, x_T=x_T, steps=schedule.T)
        figures[f"DDPM mean {gamma:g}"] = stochastic[:, 0].mean().item()
        figures[f"DDIM mean {gamma:g}"] = deterministic[:, 0].mean().item()
    return figures


def _lesson05_ddpm_is_euler_maruyama() -> dict[str, float]:
    """Lesson 05: the gap between a DDPM step and an Euler–Maruyama step of the reverse SDE, as β halves."""
    mixture = eight_gaussians_mixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gaps = {}
    for beta in (0.02, 0.01, 0.005):
        schedule = NoiseSchedule(torch.full((round(1.4 / beta),), beta))
        t = schedule.T // 2
        eps = mixture_eps_model(mixture, schedule)(x, torch.full((64,), t))
        score = -eps / (1 - schedule.alpha_bars[t]).sqrt()
        euler_maruyama = x + beta * (0.5 * x + score) + beta**0.5 * z
        gaps[f"gap beta={beta:g}"] = (ddpm_step(x, eps, t, schedule, z) - euler_maruyama).abs().max().item()
    for small, big in itertools.pairwise(sorted(gaps)):  # report the ratios the lesson quotes too
        gaps[f"ratio {big}/{small}"] = gaps[big] / gaps[small]
    return gaps


def _lesson12_students() -> dict[str, float]:
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


def _lesson13_personalisation() -> dict[str, float]:
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


def _lesson13_extraction() -> dict[str, float]:
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


def _lesson08_mnist() -> dict[str, float]:
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


def _lesson10_text() -> dict[str, float]:
    """Lesson 10: the shipped text model's prompt-following, 500 fresh captions per kind (seed 0)."""
    from minidiff.text_recipes import text_model_metrics
    from minidiff.weights import pretrained

    return _caption_figures(text_model_metrics(pretrained("text_digits"), pretrained("attribute_judge"),
                                               torch.Generator().manual_seed(0)))


def _lesson11_latent() -> dict[str, float]:
    """Lesson 11: the shipped latent model's prompt-following through the autoencoder, as lesson 10's (seed 0)."""
    from minidiff.text_recipes import latent_model_metrics
    from minidiff.weights import pretrained

    return _caption_figures(latent_model_metrics(pretrained("latent_text_digits"), pretrained("autoencoder"),
                                                 pretrained("attribute_judge"), torch.Generator().manual_seed(0)))


def _lesson14_flow() -> dict[str, float]:
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


def _few_step_spread() -> dict[str, float]:
    """The table of :func:`few_step_noise_sets` flattened: ``CELL mean``, ``CELL min``, ``CELL max``."""
    return {f"{name} {key}": value for name, figures in few_step_noise_sets().items()
            for key, value in figures.items()}


TABLES: dict[str, Table] = {table.name: table for table in (
    Table("lesson08-orders", "lessons/08_ddim_and_fast_sampling.md, 'Orders, measured against an exact answer'",
          _lesson08_orders,
          {"ddim 3": 0.178, "ddim 10": 0.060, "ddim 40": 0.016, "ddim 160": 0.0041, "ddim 320": 0.0021,
           "heun 3": 0.118, "heun 10": 0.011, "heun 40": 0.0011, "heun 160": 1.8e-4, "heun 320": 8.5e-5,
           "dpm 3": 0.176, "dpm 10": 0.017, "dpm 40": 6.9e-4, "dpm 160": 5.9e-5, "dpm 320": 1.1e-5}, 0.1),
    Table("lesson09-tilt", "lessons/09_guidance.md, section 4 (c)", _lesson09_tilt,
          {"DDPM mean 1": 1.003, "DDIM mean 1": 0.999, "DDPM mean 3": 1.339, "DDIM mean 3": 1.630,
           "DDPM mean 6": 1.495, "DDIM mean 6": 2.118}, 0.01),
    Table("lesson05-ddpm-euler-maruyama", "lessons/05_sde_and_ode.md, 'DDPM's sampler is this SDE, discretised'",
          _lesson05_ddpm_is_euler_maruyama, {"ratio gap beta=0.01/gap beta=0.005": 4.00,
                                             "ratio gap beta=0.02/gap beta=0.01": 4.00}, 0.01),
    Table("lesson08-mnist", "lessons/08_ddim_and_fast_sampling.md, 'Ours: the shipped mnist_ddpm'", _lesson08_mnist,
          {"DDIM 10": 1.30, "DDIM 20": 1.08, "DDIM 50": 1.04, "DDIM 100": 1.05, "DPM-Solver++(2M) 10": 1.16,
           "DPM-Solver++(2M) 20": 1.05}, 0.05, trained=True),
    Table("lesson10-text", "lessons/10_text_conditioning.md, 'Measured (H100)'", _lesson10_text,
          {"one_object_caption_accuracy": 0.998, "unseen_pairs_caption_accuracy": 0.997,
           "two_objects_caption_accuracy": 0.536, "two_objects_binding_accuracy": 0.600,
           "two_objects_swap_rate": 0.357}, 0.05, absolute_tolerance=0.045, trained=True),
    Table("lesson11-latent", "lessons/11_latent_diffusion.md, section 4", _lesson11_latent,
          {"one_object_caption_accuracy": 0.998, "unseen_pairs_caption_accuracy": 0.985,
           "two_objects_caption_accuracy": 0.510, "two_objects_binding_accuracy": 0.541,
           "two_objects_swap_rate": 0.336}, 0.05, absolute_tolerance=0.045, trained=True),
    Table("lesson12-students", "lessons/12_distillation_and_consistency.md, section 5", _lesson12_students,
          {"DDIM 1": 443, "DDIM 2": 30.6, "DDIM 4": 5.62, "DDIM 8": 2.95, "DPM-Solver++ 4": 4.20,
           "DPM-Solver++ 8": 2.20, "consistency 1": 3.26, "consistency 2": 2.17, "consistency 4": 2.09,
           "consistency 8": 2.76, "progressive 4": 1.89}, 0.05, trained=True),
    Table("lesson13-personalisation", "lessons/13_lora_finetuning.md, section 2", _lesson13_personalisation,
          {"base ordinary_caption_accuracy": 0.997, "base class_subject_rate": 0.001,
           "lora_subject subject_rate": 0.822, "lora_subject class_subject_rate": 0.0,
           "lora_subject ordinary_caption_accuracy": 0.997, "lora_subject_no_prior subject_rate": 1.0,
           "lora_subject_no_prior class_subject_rate": 1.0,
           # the drifted model is fragile: 0.640 and 0.748 on two H100 machines (GPU kernels round differently)
           "lora_subject_no_prior ordinary_caption_accuracy": 0.748,
           "lora_style style_rate": 0.584, "lora_style style_caption_accuracy": 0.691,
           "lora_style ordinary_caption_accuracy": 0.984}, 0.05, absolute_tolerance=0.03, trained=True),
    Table("lesson13-extraction", "lessons/13_lora_finetuning.md, section 5", _lesson13_extraction,
          {"teacher DDIM 4": 5.62, "student 4": 1.89, "rank 4 extract 4": 8.71, "rank 16 extract 4": 3.76}, 0.05,
          trained=True),
    Table("lesson14-flow", "lessons/14_flow_matching.md, section 5", _lesson14_flow,
          {"Euler 1": 116, "Euler 2": 14.8, "Euler 4": 4.73, "Euler 8": 2.49, "Euler 16": 1.67, "Euler 50": 1.60,
           "Euler shift 3, 2": 6.63, "Euler shift 3, 4": 3.31, "Euler shift 3, 8": 1.92, "Euler shift 3, 16": 1.69,
           "Euler shift 3, 50": 1.61}, 0.05, trained=True),
    Table("few-step-spread", "lessons/12_distillation_and_consistency.md and 14_flow_matching.md, section 5, "
          "'One draw of noises is not the truth'", _few_step_spread,
          {"DDIM 4 mean": 5.01, "DDIM 16 mean": 1.39, "DDIM 50 mean": 1.08, "DPM-Solver++ 16 mean": 1.11,
           "DPM-Solver++ 50 mean": 1.01, "progressive 4 mean": 1.58, "flow Euler 8 mean": 1.86,
           "flow Euler 16 mean": 1.27, "flow Euler shift 3, 8 mean": 1.41, "flow Euler shift 3, 16 mean": 1.18},
          0.05, trained=True),
)}


def drift(table: Table, figures: dict[str, float]) -> dict[str, float]:
    """Relative drift |rerun − published| / |published| of every published figure (inf for a published 0 that moved)."""
    missing = sorted(set(table.published) - set(figures))
    if missing:
        raise KeyError(f"{table.name}: the rerun did not produce {missing}")
    return {key: abs(figures[key] - value) / abs(value) if value else (0.0 if figures[key] == value else float("inf"))
            for key, value in table.published.items()}


def within(table: Table, key: str, figure: float) -> bool:
    """Whether a rerun's ``figure`` reproduces the published one: within the relative or the absolute tolerance."""
    published = table.published[key]
    return (abs(figure - published) <= table.relative_tolerance * abs(published)
            or abs(figure - published) <= table.absolute_tolerance)


def main(argv: list[str] | None = None) -> int:
    """Command line: recompute the named tables (all by default); exit 1 if any figure drifts past its tolerance."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"tables to recompute (default: all of {sorted(TABLES)})")
    parser.add_argument("--list", action="store_true", help="list the tables and where the lessons print them")
    parser.add_argument("--trained", action="store_true",
                        help="also the tables of shipped networks (lessons 12-14; minutes on a GPU, long on a CPU)")
    args = parser.parse_args(argv)
    if args.list:
        for table in TABLES.values():
            print(f"{table.name:32s} {table.lesson}{'  [trained: --trained]' if table.trained else ''}")
        return 0
    unknown = [name for name in args.names if name not in TABLES]
    if unknown:
        parser.error(f"unknown tables {unknown}; choose from {sorted(TABLES)}")
    failed = 0
    for name in args.names or [name for name, table in TABLES.items() if args.trained or not table.trained]:
        table = TABLES[name]
        figures = table.compute()
        drifts = drift(table, figures)
        extra = f" or {table.absolute_tolerance:g} absolute" if table.absolute_tolerance else ""
        print(f"\n{table.name} ({table.lesson}); tolerance {table.relative_tolerance:.0%}{extra}")
        for key, value in table.published.items():
            flag = "" if within(table, key, figures[key]) else "   <-- drifted"
            failed += bool(flag)
            print(f"  {key:36s} published {value:<10.4g} rerun {figures[key]:<10.4g} drift {drifts[key]:6.1%}{flag}")
    print(f"\n{failed} figure(s) drifted past their tolerance" if failed else "\nevery figure reproduces")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
