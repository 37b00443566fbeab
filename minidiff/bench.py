"""``python -m minidiff.bench``: how fast the course's MNIST DDPM trains and samples here, beside diffusers' stack.

Everything is measured in one run, on whatever device is present, with wall-clock times that include warm-up
and graph recording. On CUDA it measures lesson 07's U-Net (batch 256, bf16):

* training steps per second, eager, with the step recorded as a CUDA graph (:mod:`minidiff.graphs`), and recorded
  with a bfloat16 working copy of the weights (:mod:`minidiff.mixed_precision`);
* the training time until the EMA model's 1,000 DDIM-50 samples reach a classifier-FID ratio ≤ 1.5 (lesson 07's
  judge; the time counts training and its warm-up, not the checkpoint evaluations themselves);
* the time to sample 1,000 digits with DDPM (1,000 steps) and DDIM (50 steps), eager and graphed (float32,
  bfloat16 autocast, and a bfloat16 copy of the weights);
* the same figures for diffusers' ``UNet2DModel`` of the same shape with its ``DDPMScheduler``, ``EMAModel`` and
  AdamW, as its ``train_unconditional`` example does (``pip install minidiff[bench]``; skipped without it).

On a CPU it trains :data:`CPU_UNET`, the configuration lesson 07 uses without a GPU, for up to ten minutes and
reports when its digits become recognisable (judge confidence ≥ 0.9 and every class ≥ 5%).
``--quick`` shrinks every loop to a few steps: it only proves that the benchmark runs (CI).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minidiff.data import load_mnist
from minidiff.graphs import graphed
from minidiff.metrics import judge_samples
from minidiff.mixed_precision import bfloat16_copy
from minidiff.nets import UNet, UNetConfig
from minidiff.recipes import CPU_UNET, MNIST_UNET
from minidiff.runtime import device, seed_everything, standard_normal
from minidiff.samplers import ddim_sample, ddpm_sample
from minidiff.schedules import NoiseSchedule
from minidiff.train import ddpm_loss, fit, random_rows
from minidiff.weights import pretrained


@dataclass
class Row:
    """One line of the table: which stack, what was measured, the figure and a note."""

    stack: str
    measure: str
    value: str
    note: str = ""


@dataclass
class Sizes:
    """The loop sizes of one benchmark run (``--quick`` shrinks them)."""

    train_seconds: float
    eval_every: int
    samples: int
    quick: bool


def _seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return its result and its wall-clock seconds, waiting for the device to finish."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _judged_fid_ratio(model: Callable[..., torch.Tensor], schedule: NoiseSchedule, judge: nn.Module,
                      count: int, sampler: Callable[..., torch.Tensor] = ddim_sample) -> float:
    noise = standard_normal((count, 1, 28, 28), torch.Generator().manual_seed(1), device())
    return judge_samples(judge, sampler(model, schedule, noise).clamp(-1, 1).cpu()).fid_ratio


def minidiff_training(sizes: Sizes, judge: nn.Module, cuda_graph: bool, seconds: float,
                      config: UNetConfig = MNIST_UNET, batch_size: int = 256,
                      check: Callable[[nn.Module], bool] | None = None, stop_when_reached: bool = False,
                      evaluate_every: int | None = None, bf16_weights: bool = False) -> dict[str, Any]:
    """Train lesson 07's DDPM with ``fit`` for up to ``seconds``; check the EMA every ``evaluate_every`` steps.

    Returns the run's steps per second (warm-up included, checkpoints excluded), the training seconds until
    ``check(ema)`` first passed (None if it never did) and the last EMA model. ``check`` defaults to "FID ratio
    ≤ 1.5 on 1,000 DDIM-50 samples"; ``evaluate_every=None`` never checks (a pure speed run). ``bf16_weights``:
    ``fit``'s bfloat16 working copy with float32 master weights instead of autocast's weight casts.
    """
    target = device()
    seed_everything(0)
    schedule = NoiseSchedule.linear(1000)
    images = load_mnist("train")[0].to(target)
    batches = random_rows(images, batch_size, torch.Generator(target).manual_seed(0))  # indices drawn on the device
    check = check or (lambda ema: _judged_fid_ratio(graphed(ema), schedule, judge, sizes.samples) <= 1.5)
    # the learning rate decays over the steps the run is expected to reach in its time (a cosine laid out in time)
    planned = int(seconds * (75 if cuda_graph else 15 if target.type == "cuda" else 10)) + 10
    state: dict[str, Any] = {"reached": None, "evaluations": 0.0, "start": time.perf_counter()}

    def evaluate(result: Any) -> bool:
        if evaluate_every is None or state["reached"] is not None or result.steps % evaluate_every:
            return False
        start = time.perf_counter()
        if check(result.ema_model()):
            state["reached"] = start - state["start"] - state["evaluations"]
        state["evaluations"] += time.perf_counter() - start
        return stop_when_reached and state["reached"] is not None

    result = fit(UNet(config), lambda net, x0: ddpm_loss(net, schedule, x0), batches, planned, lr=1e-3,
                 warmup_steps=min(200, planned // 5), cosine_decay=True, ema_decay=0.999, bf16=True,
                 channels_last=False, progress=False, time_limit=seconds, cuda_graph=cuda_graph if
                 target.type == "cuda" else False, callback=evaluate, callback_every=evaluate_every or 10**9,
                 bf16_weights=bf16_weights)
    return {"it_per_s": result.steps / (result.seconds - state["evaluations"]), "reached": state["reached"],
            "ema": result.ema_model(), "steps": result.steps}


def diffusers_training(sizes: Sizes, judge: nn.Module, seconds: float, batch_size: int = 256) -> dict[str, Any]:
    """diffusers' stack trained as its train_unconditional example does, on the same digits and budget."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    target = device()
    seed_everything(0)
    images = load_mnist("train")[0].to(target)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D",
                                                                          "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), dropout=0.1).to(target)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    planned = max(sizes.eval_every, int(seconds * 15))
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, min(200, planned // 5), planned)
    eval_unet = copy.deepcopy(unet).eval()
    ddim = DDIMScheduler.from_config(noise_scheduler.config)

    def ddim_50(x: torch.Tensor) -> torch.Tensor:
        ddim.set_timesteps(50)
        for t in ddim.timesteps:
            x = ddim.step(eval_unet(x, t).sample, t, x).prev_sample
        return x

    reached, evaluations, steps, start = None, 0.0, 0, time.perf_counter()
    while time.perf_counter() - start - evaluations < seconds:
        x0 = images[torch.randint(0, len(images), (batch_size,), device=target)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,), device=target)
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            prediction = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
        loss = nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        steps += 1
        if steps % sizes.eval_every == 0 and reached is None:
            checkpoint = time.perf_counter()
            ema.copy_to(eval_unet.parameters())
            noise = standard_normal((sizes.samples, 1, 28, 28), torch.Generator().manual_seed(1), target)
            with torch.no_grad():
                if judge_samples(judge, ddim_50(noise).clamp(-1, 1).cpu()).fid_ratio <= 1.5:
                    reached = checkpoint - start - evaluations
            evaluations += time.perf_counter() - checkpoint
    ema.copy_to(eval_unet.parameters())
    return {"it_per_s": steps / (time.perf_counter() - start - evaluations), "reached": reached, "unet": eval_unet,
            "ddim": ddim, "scheduler": noise_scheduler, "steps": steps}


def _diffusers_sampling(trained: dict[str, Any], count: int, ddpm: bool) -> float:
    unet, target = trained["unet"], device()
    scheduler = trained["scheduler"] if ddpm else trained["ddim"]
    scheduler.set_timesteps(1000 if ddpm else 50)
    x = standard_normal((count, 1, 28, 28), torch.Generator().manual_seed(2), target)

    def run() -> torch.Tensor:
        y = x
        with torch.no_grad():
            for t in scheduler.timesteps:
                y = scheduler.step(unet(y, t).sample, t, y).prev_sample
        return y
    return _seconds(run)[1]


def _time_text(seconds: float | None, limit: float) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"not within {limit:g} s"


def gpu_table(sizes: Sizes, judge: nn.Module, with_diffusers: bool) -> list[Row]:
    """Every figure of the CUDA benchmark, measured in this one call."""
    rows = []
    eager = minidiff_training(sizes, judge, False, sizes.train_seconds / 6)
    rows.append(Row("minidiff", "training it/s, eager (batch 256, bf16)", f"{eager['it_per_s']:.1f}"))
    graph = minidiff_training(sizes, judge, True, sizes.train_seconds / 6)
    rows.append(Row("minidiff", "training it/s, CUDA graph", f"{graph['it_per_s']:.1f}",
                    f"{graph['it_per_s'] / eager['it_per_s']:.1f}× eager"))
    # the fastest path is the one timed to the FID target
    fast = minidiff_training(sizes, judge, True, sizes.train_seconds, evaluate_every=sizes.eval_every,
                             bf16_weights=True)
    rows.append(Row("minidiff", "training it/s, CUDA graph + bf16 weights", f"{fast['it_per_s']:.1f}",
                    f"{fast['it_per_s'] / eager['it_per_s']:.1f}× eager (float32 master weights)"))
    rows.append(Row("minidiff", "time to FID ratio ≤ 1.5 (DDIM-50), CUDA graph + bf16 weights",
                    _time_text(fast["reached"], sizes.train_seconds), f"{fast['steps']} steps in the run"))
    model, schedule = fast["ema"], NoiseSchedule.linear(1000)
    noise = standard_normal((sizes.samples, 1, 28, 28), torch.Generator().manual_seed(2), device())
    sampler_steps = 1000 if not sizes.quick else 20
    for name, sampler in ((f"DDPM-{sampler_steps}", lambda m: ddpm_sample(m, NoiseSchedule.linear(sampler_steps),
                                                                           noise)),
                          ("DDIM-50", lambda m: ddim_sample(m, schedule, noise, steps=50))):
        plain = _seconds(lambda sampler=sampler: sampler(model))[1]
        captured = _seconds(lambda sampler=sampler: sampler(graphed(model)))[1]
        rows.append(Row("minidiff", f"sample {sizes.samples} digits, {name}, eager", f"{plain:.1f} s"))
        both = _seconds(lambda sampler=sampler: sampler(graphed(model, bf16=True)))[1]
        rows.append(Row("minidiff", f"sample {sizes.samples} digits, {name}, CUDA graph", f"{captured:.1f} s",
                        f"{plain / captured:.1f}× eager, recording included"))
        rows.append(Row("minidiff", f"sample {sizes.samples} digits, {name}, CUDA graph + bf16", f"{both:.1f} s",
                        f"{plain / both:.1f}× eager"))
        copied = _seconds(lambda sampler=sampler: sampler(graphed(bfloat16_copy(model))))[1]
        rows.append(Row("minidiff", f"sample {sizes.samples} digits, {name}, CUDA graph + bf16 weights",
                        f"{copied:.1f} s", f"{plain / copied:.1f}× eager"))
    if with_diffusers:
        theirs = diffusers_training(sizes, judge, sizes.train_seconds)
        rows.append(Row("diffusers", "training it/s, eager (UNet2DModel, bf16)", f"{theirs['it_per_s']:.1f}",
                        f"minidiff's graph: {graph['it_per_s'] / theirs['it_per_s']:.1f}× this, with bf16 "
                        f"weights {fast['it_per_s'] / theirs['it_per_s']:.1f}×"))
        rows.append(Row("diffusers", "time to FID ratio ≤ 1.5 (DDIM-50)",
                        _time_text(theirs["reached"], sizes.train_seconds), f"{theirs['steps']} steps in the run"))
        for ddpm, name in ((True, f"DDPM-{1000}"), (False, "DDIM-50")):
            if sizes.quick and ddpm:
                continue
            rows.append(Row("diffusers", f"sample {sizes.samples} digits, {name}",
                            f"{_diffusers_sampling(theirs, sizes.samples, ddpm):.1f} s"))
    return rows


def cpu_table(sizes: Sizes, judge: nn.Module) -> list[Row]:
    """The CPU benchmark: :data:`CPU_UNET` trained until its DDIM-50 digits are recognisable, or 10 minutes."""
    schedule = NoiseSchedule.linear(1000)

    def recognisable(ema: nn.Module) -> bool:
        noise = standard_normal((sizes.samples, 1, 28, 28), torch.Generator().manual_seed(1))
        report = judge_samples(judge, ddim_sample(ema, schedule, noise, steps=50).clamp(-1, 1))
        print(f"  checkpoint: {report.samples.mean_confidence:.3f} confidence, rarest class "
              f"{report.samples.min_class_share:.1%}, FID ratio {report.fid_ratio:.2f}", flush=True)
        return report.recognisable()

    # lesson 07's CPU settings: batch 64, learning rate 1e-3
    run = minidiff_training(sizes, judge, False, sizes.train_seconds, CPU_UNET, 64, recognisable,
                            stop_when_reached=True, evaluate_every=sizes.eval_every)
    threads = torch.get_num_threads()
    return [Row("minidiff", f"CPU U-Net training it/s (batch 64, {threads} threads)", f"{run['it_per_s']:.1f}"),
            Row("minidiff", "time to recognisable digits (DDIM-50)", _time_text(run["reached"], sizes.train_seconds),
                f"{run['steps']} steps; checkpoints every {sizes.eval_every} steps, not counted")]


def main(argv: list[str] | None = None) -> list[Row]:
    """Command line: measure and print the table."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks that it runs")
    parser.add_argument("--seconds", type=float, default=None, help="training budget per stack (default 90 on "
                        "CUDA, 600 on a CPU)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' stack")
    args = parser.parse_args(argv)
    on_cuda = device().type == "cuda"
    seconds = args.seconds or (2.0 if args.quick else 90.0 if on_cuda else 600.0)
    sizes = Sizes(train_seconds=seconds, eval_every=4 if args.quick else
                  (500 if on_cuda else 1000), samples=8 if args.quick else (1000 if on_cuda else 300), quick=args.quick)
    judge = pretrained("judge", device=device())
    with_diffusers = not args.no_diffusers
    if with_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed (pip install 'minidiff[bench]'): its rows are skipped")
            with_diffusers = False
    start = time.perf_counter()
    rows = gpu_table(sizes, judge, with_diffusers) if on_cuda else cpu_table(sizes, judge)
    name = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nminidiff bench on {name}, torch {torch.__version__}{' (quick)' if args.quick else ''}, "
          f"{time.perf_counter() - start:.0f} s in all")
    width = max(len(row.measure) for row in rows)
    for row in rows:
        print(f"{row.stack:10s} {row.measure:{width}s} {row.value:>16s}  {row.note}")
    return rows


if __name__ == "__main__":
    main()
