"""``python -m minidiff.tables``: recompute the lessons' measured tables and report how far they drift.

Each entry below is one table printed in a lesson: the function that recomputes it, the figures the lesson
publishes, and the tolerance within which a rerun must land. The tables listed here use exact oracles (Gaussian
data, Gaussian mixtures) and fixed seeds, so they reproduce on any machine, CPU or GPU, to float rounding:

    python -m minidiff.tables            # every table, with its drift
    python -m minidiff.tables --list     # what there is
    python -m minidiff.tables lesson08-orders

Tables that need a trained network (lessons 07–11) are measured by the notebooks in full mode on a GPU; each of
those tables says in its lesson which device, seed and command produced it.
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
)}


def drift(table: Table, figures: dict[str, float]) -> dict[str, float]:
    """Relative drift |rerun − published| / |published| of every published figure."""
    missing = sorted(set(table.published) - set(figures))
    if missing:
        raise KeyError(f"{table.name}: the rerun did not produce {missing}")
    return {key: abs(figures[key] - value) / abs(value) for key, value in table.published.items()}


def main(argv: list[str] | None = None) -> int:
    """Command line: recompute the named tables (all by default); exit 1 if any figure drifts past its tolerance."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"tables to recompute (default: all of {sorted(TABLES)})")
    parser.add_argument("--list", action="store_true", help="list the tables and where the lessons print them")
    args = parser.parse_args(argv)
    if args.list:
        for table in TABLES.values():
            print(f"{table.name:32s} {table.lesson}")
        return 0
    unknown = [name for name in args.names if name not in TABLES]
    if unknown:
        parser.error(f"unknown tables {unknown}; choose from {sorted(TABLES)}")
    failed = 0
    for name in args.names or list(TABLES):
        table = TABLES[name]
        figures = table.compute()
        drifts = drift(table, figures)
        print(f"\n{table.name} ({table.lesson}); tolerance {table.relative_tolerance:.0%}")
        for key, value in table.published.items():
            flag = "" if drifts[key] <= table.relative_tolerance else "   <-- drifted"
            failed += bool(flag)
            print(f"  {key:36s} published {value:<10.4g} rerun {figures[key]:<10.4g} drift {drifts[key]:6.1%}{flag}")
    print(f"\n{failed} figure(s) drifted past their tolerance" if failed else "\nevery figure reproduces")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
