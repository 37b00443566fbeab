"""Recipes that train every shipped network: ``python -m minidiff.recipes NAME [--out DIR] [--fast]``.

Each recipe trains one model from scratch on the bundled MNIST digits, measures it, and writes
``NAME.safetensors`` with its JSON card (see :mod:`minidiff.weights`) to ``--out``. With ``--fast`` (or
``MINIDIFF_FAST=1``) every loop shrinks to a smoke test, which CI runs; the weights in
``minidiff/pretrained_weights`` were made by the full recipes on a GPU, as their cards record.

On several GPUs of one machine the same command runs under ``torchrun --nproc_per_node=N -m minidiff.recipes
NAME``: every rank trains (DDP inside :func:`~minidiff.train.fit`, see :mod:`minidiff.distributed`), rank 0 writes.

    judge             the digit classifier that scores samples (lesson 07)
    mnist_ddpm        the unconditional U-Net DDPM (lessons 07 and 08)
    mnist_cond        the class-conditional U-Net with a null class, for guidance (lesson 09)
    noisy_classifier  p(y | x_t, t) on noised digits, for classifier guidance (lesson 09)
    attribute_judge   reads digit and colour per slot of a captioned scene (lesson 10)
    text_digits       the text-conditioned U-Net with its jointly trained text encoder (lesson 10)
    autoencoder       the KL-regularised autoencoder of captioned scenes, 3×32×32 ↔ 4×8×8 (lesson 11)
    latent_text_digits  the text-conditioned denoiser of the autoencoder's latents (lesson 11)
    mnist_progressive   mnist_ddpm progressively distilled to 4 steps (lesson 12)
    mnist_consistency   mnist_ddpm consistency-distilled to 1–4 steps (lesson 12)
    mnist_flow          lesson 07's U-Net trained by flow matching on the straight path (lesson 14)
    mnist_reflow        mnist_flow after one round of reflow (lesson 14; not shipped)
    lora_subject        a LoRA adapter of text_digits: one particular 7 as "sks 7" (lesson 13; also
                        lora_subject_no_prior and lora_style; adapters go to pretrained_weights/adapters)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minidiff import distributed
from minidiff.data import load_mnist, random_shift
from minidiff.graphs import graphed
from minidiff.metrics import judge_accuracy, judge_samples
from minidiff.nets import DigitClassifier, UNet, UNetConfig
from minidiff.runtime import budget, device, is_fast, seed_everything, standard_normal
from minidiff.samplers import ddim_sample, ddpm_sample
from minidiff.schedules import NoiseSchedule
from minidiff.train import TrainResult, classifier_loss, conditional_ddpm_loss, ddpm_loss, fit, random_rows
from minidiff.weights import pretrained, save_weights

#: The U-Net every MNIST diffusion model in the course uses (about 1.7M parameters).
MNIST_UNET = UNetConfig(base_channels=32, channel_mults=(1, 2, 2), blocks_per_level=2, attention_resolutions=(7,),
                        dropout=0.1)
#: Lesson 07's U-Net sized for a laptop's CPU (about 0.29M parameters): one block per level, no attention, no
#: dropout. On two cores it trains at about 10 steps of batch 64 per second and draws recognisable digits within
#: ten minutes (``python -m minidiff.bench`` on a CPU measures it).
CPU_UNET = UNetConfig(base_channels=16, channel_mults=(1, 2, 2), blocks_per_level=1, attention_resolutions=(),
                      dropout=0.0)
#: The forward process of the MNIST models: DDPM's linear schedule with T = 1000.
MNIST_SCHEDULE: dict[str, Any] = {"kind": "linear", "T": 1000}


def _device_name(target: torch.device) -> str:
    if target.type == "cuda":
        return torch.cuda.get_device_name(target)
    return f"{target.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def recipe_card(name: str, result: TrainResult, batch_size: int, seed: int, metrics: dict[str, Any],
                extra: dict[str, Any] | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """The weight card of a recipe's run: the command that reproduces it, its steps, time, device and metrics."""
    command = f"python -m minidiff.recipes {name}" + (" --fast" if is_fast() else "")
    command += f" --seed {seed}" if seed else ""
    # a time limit that was not reached changes nothing: only one that stopped the run belongs to its command
    command += f" --time-limit {time_limit:g}" if time_limit is not None and result.timed_out else ""
    return {"name": name, "recipe": command,
            "seed": seed, "fast_mode": is_fast(), "steps": result.steps, "batch_size": batch_size,
            "world_size": distributed.world_size(), "global_batch_size": batch_size * distributed.world_size(),
            "train_seconds": round(result.seconds, 1),
            "iterations_per_second": round(result.steps / max(result.seconds, 1e-9), 2),
            "device": _device_name(device()), "torch": torch.__version__,
            "stopped_by_time_limit": result.timed_out,
            "data": "bundled MNIST-5k, train split (4,000 digits)", "metrics": metrics} | (extra or {})


def random_pairs(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                 shift: int = 0) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A ``next_batch``: ``batch_size`` random (image, label) rows, images shifted by up to ``shift`` pixels."""
    draw = random_rows((images, labels), batch_size, generator)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        chosen, chosen_labels = draw()
        return (random_shift(chosen, shift, generator) if shift else chosen), chosen_labels
    return next_batch


def batch_generator(seed: int) -> torch.Generator:
    """The generator that draws the recipes' batches, on the compute device: a recorded CUDA graph step then never
    waits for the host.

    The losses draw their t and ε from the device's default generator, which
    :func:`~minidiff.runtime.seed_everything` seeds: a step that drew from a generator of its own could not be
    recorded.
    """
    return torch.Generator(device()).manual_seed(distributed.rank_seed(seed))  # under torchrun: a stream per rank


def recipe_fit(model: nn.Module, loss_fn: Callable[..., torch.Tensor], next_batch: Callable[[], Any], steps: int,
               lr: float, warmup_steps: int, **options: Any) -> TrainResult:
    """What every recipe shares: AdamW with a warm-up and cosine decay, an EMA, and the GPU speed knobs."""
    return fit(model, loss_fn, next_batch, steps, lr=lr, warmup_steps=min(warmup_steps, steps // 5),
               cosine_decay=True, bf16=True, channels_last=True, **options)


def _mnist_on_device(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(tensor.to(device()) for tensor in load_mnist(split))


def train_judge(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                time_limit: float | None = None) -> dict[str, Any]:
    """The judge: a DigitClassifier trained with ±2-pixel shifts; reports held-out accuracy."""
    seed_everything(seed)
    images, labels = _mnist_on_device()
    steps = steps or budget(full=4000, fast=20)
    batch_size = budget(full=128, fast=16)
    result = recipe_fit(DigitClassifier(), lambda net, batch: classifier_loss(net, *batch),
                        random_pairs(images, labels, batch_size, batch_generator(seed), shift=2), steps, 2e-3, 200,
                        weight_decay=0.05, ema_decay=0.999, progress=progress, time_limit=time_limit)
    judge = result.ema_model()
    metrics = {"heldout_accuracy": round(judge_accuracy(judge, *load_mnist("heldout")), 4),
               "train_accuracy": round(judge_accuracy(judge, *load_mnist("train")), 4)}
    return save_weights(judge, out / "judge.safetensors", recipe_card("judge", result, batch_size, seed, metrics,
                                                                      time_limit=time_limit))


def rounded(value: float) -> float | None:
    """A card's figure to 3 decimals; NaN (too few samples for a classifier-FID) is stored as null."""
    return round(value, 3) if value == value else None


def _diffusion_card_metrics(samples: torch.Tensor, judge: nn.Module) -> dict[str, Any]:
    report = judge_samples(judge, samples)
    print(report)
    return {"samples": report.samples.count, "sampler": "DDPM ancestral, 1000 steps, sigma^2 = beta",
            "classifier_fid": rounded(report.samples.classifier_fid),
            "classifier_fid_real_vs_real": rounded(report.real.classifier_fid),
            "fid_ratio": rounded(report.fid_ratio), "mean_confidence": round(report.samples.mean_confidence, 4),
            "min_class_share": round(report.samples.min_class_share, 4)}


def _card_samples(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                  x_T: torch.Tensor, generator: torch.Generator, progress: bool) -> torch.Tensor:
    """The samples a DDPM recipe's card is judged on: DDPM's 1,000 steps (Algorithm 2); in fast mode 10 DDIM
    steps, since a smoke test's card is no result and 1,000 CPU calls of the U-Net cost CI some 40 s a recipe."""
    if is_fast():
        return ddim_sample(model, schedule, x_T, steps=10, progress=progress)
    return ddpm_sample(model, schedule, x_T, generator=generator, progress=progress)


def train_mnist_ddpm(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                     judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """The unconditional DDPM: MNIST_UNET trained with L_simple; judged on 1,000 DDPM samples."""
    judge = pretrained("judge", directory=judge_directory)  # before training: a missing judge fails fast
    generator, target = seed_everything(seed), device()
    images, _ = _mnist_on_device()
    schedule = NoiseSchedule.from_spec(MNIST_SCHEDULE)
    steps = steps or budget(full=8000, fast=10)
    batch_size = budget(full=512, fast=8)
    result = recipe_fit(UNet(MNIST_UNET), lambda net, x0: ddpm_loss(net, schedule, x0),
                        random_rows(images, batch_size, batch_generator(seed)),
                        steps, 5e-4, 500, ema_decay=0.9995, progress=progress, time_limit=time_limit)
    ema = result.ema_model()
    x_T = standard_normal((budget(full=1000, fast=4), 1, 28, 28), generator, target)
    samples = _card_samples(graphed(ema), schedule, x_T, generator, progress)
    card = recipe_card("mnist_ddpm", result, batch_size, seed, _diffusion_card_metrics(samples, judge),
                       {"schedule": MNIST_SCHEDULE, "weights": "EMA"}, time_limit)
    return save_weights(ema, out / "mnist_ddpm.safetensors", card)


def train_mnist_cond(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                     judge_directory: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """The class-conditional DDPM with label dropout 0.1 (one net for ε(x, t, y) and ε(x, t, ∅))."""
    judge = pretrained("judge", directory=judge_directory)  # before training: a missing judge fails fast
    generator, target = seed_everything(seed), device()
    images, labels = _mnist_on_device()
    schedule = NoiseSchedule.from_spec(MNIST_SCHEDULE)
    steps = steps or budget(full=8000, fast=10)
    batch_size = budget(full=256, fast=8)
    result = recipe_fit(UNet(MNIST_UNET, num_classes=10),
                        lambda net, batch: conditional_ddpm_loss(net, schedule, *batch, 0.1),
                        random_pairs(images, labels, batch_size, batch_generator(seed)), steps, 5e-4, 500,
                        ema_decay=0.9995,
                        progress=progress, time_limit=time_limit)
    ema = result.ema_model()
    count = budget(full=1000, fast=4)
    requested = torch.arange(count, device=target) % 10
    x_T = standard_normal((count, 1, 28, 28), generator, target)
    samples = _card_samples(graphed(lambda x, t: ema(x, t, requested)), schedule, x_T, generator, progress)
    metrics = {"conditional_accuracy_no_guidance": round(judge_accuracy(judge, samples, requested), 4),
               "samples": count, "label_dropout": 0.1}
    card = recipe_card("mnist_cond", result, batch_size, seed, metrics, {"schedule": MNIST_SCHEDULE, "weights": "EMA"},
                       time_limit)
    return save_weights(ema, out / "mnist_cond.safetensors", card)


def train_noisy_classifier(out: Path, seed: int = 0, progress: bool = True, steps: int | None = None,
                           judge_directory: Path | None = None,
                           time_limit: float | None = None) -> dict[str, Any]:
    """p(y | x_t, t): a time-conditional DigitClassifier on x_t ~ q(x_t | x_0); accuracy reported per t."""
    generator, target = seed_everything(seed), device()
    images, labels = _mnist_on_device()
    schedule = NoiseSchedule.from_spec(MNIST_SCHEDULE)
    steps = steps or budget(full=3000, fast=20)
    batch_size = budget(full=256, fast=16)
    result = recipe_fit(DigitClassifier(time_conditional=True),
                        lambda net, batch: classifier_loss(net, *batch, schedule),
                        random_pairs(images, labels, batch_size, batch_generator(seed), shift=1), steps, 2e-3, 200,
                        weight_decay=0.05, ema_decay=0.999, progress=progress, time_limit=time_limit)
    classifier = result.ema_model()
    heldout, heldout_labels = _mnist_on_device("heldout")
    accuracy = {}
    with torch.no_grad():
        for t in (1, 250, 500, 750, 1000):
            timesteps = torch.full((len(heldout),), t, device=target)
            noisy = schedule.q_sample(heldout, timesteps, standard_normal(heldout.shape, generator, target))
            predicted = classifier(noisy, timesteps).argmax(dim=1)
            accuracy[f"heldout_accuracy_t{t}"] = round((predicted == heldout_labels).float().mean().item(), 4)
    card = recipe_card("noisy_classifier", result, batch_size, seed, accuracy, {"schedule": MNIST_SCHEDULE}, time_limit)
    return save_weights(classifier, out / "noisy_classifier.safetensors", card)


RECIPES: dict[str, Callable[..., dict[str, Any]]] = {
    "judge": train_judge, "mnist_ddpm": train_mnist_ddpm, "mnist_cond": train_mnist_cond,
    "noisy_classifier": train_noisy_classifier}


def all_recipes() -> dict[str, Callable[..., dict[str, Any]]]:
    """Every recipe by name: the MNIST ones here, the captioned-scene ones of :mod:`minidiff.text_recipes`, the
    few-step students of :mod:`minidiff.distill_recipes`, the flow model of :mod:`minidiff.flow_recipes` and the
    adapters of :mod:`minidiff.lora_recipes`."""
    from minidiff.distill_recipes import DISTILL_RECIPES  # imported here: they build on this module
    from minidiff.flow_recipes import FLOW_RECIPES
    from minidiff.lora_recipes import LORA_RECIPES
    from minidiff.text_recipes import TEXT_RECIPES

    return RECIPES | TEXT_RECIPES | DISTILL_RECIPES | FLOW_RECIPES | LORA_RECIPES


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: train one recipe and write its weights and card."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(all_recipes()))
    parser.add_argument("--out", type=Path, default=Path("recipe_outputs"), help="folder for NAME.safetensors/.json")
    parser.add_argument("--fast", action="store_true", help="smoke-test sizes (same as MINIDIFF_FAST=1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    parser.add_argument("--judge-dir", type=Path, default=None,
                        help="load the judges (and, for latent_text_digits, the autoencoder) from this folder "
                             "instead of the shipped ones")
    args = parser.parse_args(argv)
    if args.fast:
        os.environ["MINIDIFF_FAST"] = "1"
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    start = time.perf_counter()
    options = {} if args.name in ("judge", "attribute_judge", "autoencoder") else {"judge_directory": args.judge_dir}
    # Under torchrun every rank runs the whole recipe (DDP inside fit keeps their weights equal); only rank 0 writes
    # into --out, the others into a folder that is thrown away.
    distributed.init_from_env()
    out = args.out if distributed.is_main() else Path(tempfile.mkdtemp(prefix=f"minidiff-rank{distributed.rank()}-"))
    try:
        card = all_recipes()[args.name](out, seed=args.seed, steps=args.steps, time_limit=args.time_limit, **options)
    finally:
        if out != args.out:
            shutil.rmtree(out, ignore_errors=True)
        distributed.shutdown()
    if out != args.out:
        return card
    print(f"{args.name}: wrote {args.out / (args.name + '.safetensors')} in {time.perf_counter() - start:.0f} s; "
          f"metrics {card['metrics']}")
    return card


if __name__ == "__main__":
    main()
