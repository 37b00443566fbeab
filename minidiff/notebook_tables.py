"""The lessons' tables of networks a notebook trains itself (lessons 03, 04 and 07) and lesson 09's guidance tables.

Each function but the last repeats, call for call, the notebook cells that print its table, with the same seeds:
the cells seed what they draw themselves (``torch.manual_seed(seed)`` before a network is built and trained, a
fresh ``torch.Generator().manual_seed(seed)`` for data, starting noises and sampler noise), so that a notebook run
in full mode and ``python -m minidiff.tables NAME`` print the same figures on one device. On another device, or another
PyTorch, training takes another path through float rounding, and the figures then agree only within the noise of
one training run and one draw of samples, which each lesson quotes beside its table. The last,
:func:`lesson09_thresholding`, is the lesson's own table (40 digits at scales 8 and 15), wider than the notebook's
cell (20 digits at scale 15), so the two print different figures by design.
"""

from __future__ import annotations

import torch

from minidiff.metrics import compare_to_data, judge_accuracy, judge_samples, mixture_log_likelihood, within_class_spread
from minidiff.runtime import budget, device, standard_normal
from minidiff.samplers import ddim_sample, ddpm_sample
from minidiff.schedules import NoiseSchedule

#: The seed of each 2D toy's model and data in notebook 03 (its samples use seed 100 + this).
TOY_SEEDS = {"swiss_roll": 0, "two_moons": 1, "eight_gaussians": 2, "checkerboard": 3}


def lesson03_toys() -> dict[str, float]:
    """Lesson 03, section 3: one DDPM per toy (``MLPDenoiser(128, 3)``, 10,000 steps of batch 512, linear schedule
    T = 1000), 5,000 ancestral samples each, scored by the energy and sliced-Wasserstein ratios to fresh data."""
    from minidiff.graphs import graphed
    from minidiff.nets import MLPDenoiser
    from minidiff.toys import sample_toy
    from minidiff.train import ddpm_loss, fit, random_rows

    schedule, target = NoiseSchedule.linear(1000), device()
    train_steps, num_samples = budget(full=10_000, fast=150), budget(full=5000, fast=400)
    figures = {}
    for name, seed in TOY_SEEDS.items():
        torch.manual_seed(seed)
        data = sample_toy(name, 100_000, torch.Generator().manual_seed(seed)).to(target)
        result = fit(MLPDenoiser(hidden=128, num_blocks=3), lambda m, x: ddpm_loss(m, schedule, x),
                     random_rows(data, 512), train_steps, lr=2e-3, warmup_steps=min(200, train_steps // 10),
                     cosine_decay=True, device=target, progress=False)
        draw = torch.Generator().manual_seed(100 + seed)
        samples = ddpm_sample(graphed(result.ema.model), schedule, standard_normal((num_samples, 2), draw, target),
                              generator=draw).cpu()

        def data_sampler(n: int, g: torch.Generator, name: str = name) -> torch.Tensor:
            return sample_toy(name, n, g)

        figures[f"{name} energy"] = compare_to_data(samples, data_sampler, draw, repeats=5).ratio
        figures[f"{name} sliced-W"] = compare_to_data(samples, data_sampler, draw, metric="sliced_wasserstein",
                                                      repeats=5).ratio
        print(f"lesson03-toys: {name} trained in {result.seconds:.1f} s on {target}", flush=True)
    return figures


def lesson04_ncsn() -> dict[str, float]:
    """Lesson 04, section 3: the MLP of lesson 03 as a noise-conditional score network on the eight Gaussians (20
    levels, σ from 3 to 0.05, 8,000 steps), sampled by annealed Langevin: energy ratio and average log-density."""
    from minidiff.nets import MLPDenoiser
    from minidiff.score import NoiseConditionalScore, annealed_langevin, geometric_sigmas
    from minidiff.toys import eight_gaussians_mixture
    from minidiff.train import fit, random_rows

    mixture, sigmas, target = eight_gaussians_mixture(), geometric_sigmas(3.0, 0.05, 20), device()
    torch.manual_seed(0)
    data = mixture.sample(100_000, torch.Generator().manual_seed(0)).to(target)
    score_model = NoiseConditionalScore(MLPDenoiser(hidden=128, num_blocks=3).to(target), sigmas)
    result = fit(score_model.net, lambda net, x: score_model.loss(x), random_rows(data, 512),
                 budget(full=8000, fast=150), lr=2e-3, ema_decay=None, warmup_steps=100, cosine_decay=True,
                 device=target, progress=False)
    print(f"lesson04-ncsn: trained in {result.seconds:.1f} s on {target}", flush=True)
    draw = torch.Generator().manual_seed(1)
    start = 3 * torch.randn(budget(full=2000, fast=300), 2, generator=draw)
    samples = annealed_langevin(lambda x, sigma: score_model(x.to(target), sigma).cpu(), start, sigmas,
                                steps_per_level=budget(full=100, fast=20), step_scale=2e-5, generator=draw)
    return {"energy ratio": compare_to_data(samples, lambda n, g: mixture.sample(n, g), draw).ratio,
            "samples log-density": mixture_log_likelihood(samples, mixture),
            "data log-density": mixture_log_likelihood(mixture.sample(20_000, draw), mixture)}


def lesson07_training() -> dict[str, float]:
    """Lesson 07, sections 2 and 6: the notebook's own U-Net (3,000 steps of batch 256 on a GPU; on a CPU the
    smaller ``CPU_UNET`` for up to ten minutes); the EMA against the last weights on the same 500 noises (DDPM), then
    1,000 DDPM samples of the EMA weights (bfloat16 on a GPU) judged."""
    from minidiff.data import load_mnist
    from minidiff.graphs import graphed
    from minidiff.nets import UNet
    from minidiff.recipes import CPU_UNET, MNIST_UNET
    from minidiff.train import ddpm_loss, fit, random_rows
    from minidiff.weights import pretrained

    target = device()
    on_gpu = target.type != "cpu"
    train_T = budget(full=1000, fast=50)
    schedule = NoiseSchedule.linear(train_T, start=1e-4 * 1000 / train_T, end=0.02 * 1000 / train_T)
    batch_size, train_steps = budget(full=256 if on_gpu else 64, fast=8), budget(full=3000 if on_gpu else 6000, fast=10)
    torch.manual_seed(0)
    net = UNet(MNIST_UNET if on_gpu else CPU_UNET)
    batches = random_rows(load_mnist("train")[0].to(target), batch_size, torch.Generator(target).manual_seed(0))
    result = fit(net, lambda m, x0: ddpm_loss(m, schedule, x0), batches, train_steps, lr=1e-3, ema_decay=0.999,
                 warmup_steps=min(200, train_steps // 5), cosine_decay=True, bf16=True,
                 time_limit=None if on_gpu else budget(full=600.0, fast=5.0), progress=False)
    print(f"lesson07-training: {result.steps} steps in {result.seconds:.0f} s on {target}", flush=True)
    figures = {"final loss": sum(result.losses[-100:]) / len(result.losses[-100:])}
    judge, ema_net, raw_net = pretrained("judge", device=target), result.ema.model.float(), net.float().eval()
    count = budget(full=500 if on_gpu else 128, fast=2)

    def ema_and_raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([ema_net(x[:count], t[:count]), raw_net(x[count:], t[count:])])

    draw = torch.Generator().manual_seed(1)
    x_T = torch.randn(count, 1, 28, 28, generator=draw).repeat(2, 1, 1, 1)
    both = ddpm_sample(graphed(ema_and_raw), schedule, x_T=x_T.to(target), generator=draw).cpu()
    for name, images in (("EMA", both[:count]), ("last", both[count:])):
        report = judge_samples(judge, images)
        figures |= {f"{name} FID ratio": report.fid_ratio, f"{name} confidence": report.samples.mean_confidence}
    fast_model, judge_count = graphed(ema_net, bf16=True), budget(full=1000 if on_gpu else 300, fast=2)
    draw, drawn = torch.Generator().manual_seed(2), []
    for first in range(0, judge_count, 500):  # batches of 500, as the notebook draws them
        x_T = standard_normal((min(500, judge_count - first), 1, 28, 28), draw, target)
        drawn.append(ddpm_sample(fast_model, schedule, x_T, generator=draw).cpu())
    report = judge_samples(judge, torch.cat(drawn))
    return figures | {"FID ratio": report.fid_ratio, "confidence": report.samples.mean_confidence,
                      "rarest class": report.samples.min_class_share}


#: Lesson 09's guidance scales, swept for both kinds of guidance.
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)


def lesson09_guidance_sweep() -> dict[str, float]:
    """Lesson 09, section 5: classifier-free (``mnist_cond``) and classifier guidance (``mnist_ddpm`` and
    ``noisy_classifier``) at each scale, 500 samples (50 per digit) by DDIM 50 from the same noises (seed 0):
    accuracy on the requested digit, confidence, within-class spread relative to real digits, FID ratio."""
    from minidiff.data import load_mnist
    from minidiff.guidance import classifier_free_guidance, classifier_guidance
    from minidiff.weights import pretrained, schedule_from_card

    target = device()
    judge, noisy_classifier = pretrained("judge", device=target), pretrained("noisy_classifier", device=target)
    unconditional, conditional = pretrained("mnist_ddpm", device=target), pretrained("mnist_cond", device=target)
    schedule = schedule_from_card(conditional.card)
    heldout, heldout_labels = load_mnist("heldout")
    count = budget(full=500 if target.type != "cpu" else 60, fast=20)
    steps = budget(full=50, fast=2)  # every scale even in fast mode (the notebook then tries two): a table is whole
    requested = (torch.arange(count) % 10).to(target)
    x_sweep = torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(target)
    reference = torch.cat([torch.nonzero(heldout_labels == c)[: count // 10, 0] for c in range(10)])
    real_spread = within_class_spread(judge, heldout[reference], heldout_labels[reference])
    figures = {}
    for kind in ("classifier-free", "classifier"):
        for scale in GUIDANCE_SCALES:
            guided = (classifier_free_guidance(conditional, requested, scale) if kind == "classifier-free" else
                      classifier_guidance(unconditional, noisy_classifier, schedule, requested, scale))
            samples = ddim_sample(guided, schedule, x_T=x_sweep, steps=steps).cpu()
            report = judge_samples(judge, samples)
            figures |= {f"{kind} {scale:g} accuracy": judge_accuracy(judge, samples, requested.cpu()),
                        f"{kind} {scale:g} confidence": report.samples.mean_confidence,
                        f"{kind} {scale:g} spread": within_class_spread(judge, samples) / real_spread,
                        f"{kind} {scale:g} FID ratio": report.fid_ratio}
    return figures


def lesson09_thresholding() -> dict[str, float]:
    """Lesson 09, section 5, 'Strong guidance and thresholding': classifier-free guidance of ``mnist_cond`` at
    scales 8 and 15, 40 digits (four of each, noises of seed 0) by DDIM 50, with no thresholding, static clipping
    of x̂_0 to [−1, 1] and Imagen's dynamic thresholding (99.5th percentile): the share of final pixels outside
    [−1, 1], the judge's accuracy on the requested digit and the mean pixel of the clamped images.

    Nothing is trained and DDIM with η = 0 draws nothing on the way, so on one device the figures repeat exactly.
    """
    from minidiff.guidance import classifier_free_guidance
    from minidiff.samplers import thresholded
    from minidiff.weights import pretrained, schedule_from_card

    target = device()
    judge, conditional = pretrained("judge", device=target), pretrained("mnist_cond", device=target)
    schedule = schedule_from_card(conditional.card)
    count, steps = budget(full=40, fast=10), budget(full=50, fast=2)
    requested = (torch.arange(count) % 10).to(target)
    x_T = torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(target)
    figures = {}
    for scale in (8.0, 15.0):
        guided = classifier_free_guidance(conditional, requested, scale)
        variants = {"none": guided, "static": thresholded(guided, schedule, clip=1.0),
                    "dynamic": thresholded(guided, schedule, dynamic_percentile=0.995)}
        for name, model in variants.items():
            images = ddim_sample(model, schedule, x_T=x_T, steps=steps)
            clamped = images.clamp(-1, 1).cpu()
            figures |= {f"{scale:g} {name} outside": (images.abs() > 1).float().mean().item(),
                        f"{scale:g} {name} accuracy": judge_accuracy(judge, clamped, requested.cpu()),
                        f"{scale:g} {name} mean pixel": clamped.mean().item()}
    return figures
