"""Combining and extracting LoRA adapters (lesson 13).

* :func:`stack_adapters` — two adapters at once. The sum of two low-rank updates is itself low rank:
  s₁B₁A₁ + s₂B₂A₂ = [s₁B₁ s₂B₂] [A₁; A₂] (lesson 13, eq. 4), so "adding" adapters is stacking their
  factors into one adapter of rank r₁ + r₂ — exact, and still cheap.
* :func:`add_zip_gates`, :func:`zip_merge_loss` — ZipLoRA (Shah et al. 2023): plain addition lets two adapters
  that write into the same columns of a weight interfere. Learn one coefficient per input column and per
  adapter, m₁ ⊙ ΔW₁ + m₂ ⊙ ΔW₂, so that the merged model still reproduces each adapter on its own prompts,
  while a penalty |m₁ · m₂| pushes the two onto different columns (lesson 13, eq. 5). (ZipLoRA matches layer
  by layer; we match the denoiser's output, which is simpler and enough at this size.)
* :func:`lora_from_delta` — the reverse: given a fully fine-tuned (or distilled) network, the best rank-r
  approximation of each layer's change W_tuned − W_base is its truncated SVD (Eckart–Young), which is how an
  adapter is extracted from a full fine-tune, and the idea behind LCM-LoRA (Luo et al. 2023): is the change
  that distillation makes low rank?
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minidiff.lora import (
    add_words,
    inject,
    lora_layers,
    new_words_table,
    read_adapter,
    target_names,
)
from minidiff.runtime import check_number, randn_like
from minidiff.schedules import NoiseSchedule


def stack_adapters(model: nn.Module, adapters: Sequence[str | Path], strengths: Sequence[float] | None = None,
                   check_base: bool = True) -> nn.Module:
    """Put several adapters on ``model`` at once, as one adapter of rank Σ rᵢ whose update is exactly
    Σ strengthᵢ·ΔWᵢ (lesson 13, eq. 4); their new words are all added. Each adapter's ranks form one *group*
    (``group_of_rank``), which :func:`add_zip_gates` gives its own coefficients.
    """
    strengths = list(strengths) if strengths is not None else [1.0] * len(adapters)
    if len(adapters) < 2 or len(strengths) != len(adapters):
        raise ValueError(f"give two or more adapters and one strength each, got {len(adapters)} adapters and "
                         f"{len(strengths)} strengths")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: remove(model) first")
    cards, tensors = zip(*(read_adapter(adapter, model, check_base) for adapter in adapters), strict=True)
    layers = cards[0]["adapter"]["layers"]
    if any(card["adapter"]["layers"] != layers for card in cards):
        raise ValueError("the adapters adapt different layers; stacking needs the same layers in each")
    ranks = [card["adapter"]["rank"] for card in cards]
    inject(model, sum(ranks), alpha=sum(ranks), targets=layers)  # α = r: the scale is 1, the sᵢ go into B
    words_rows = []
    for card, state in zip(cards, tensors, strict=True):
        if card["adapter"]["words"]:
            add_words(model, card["adapter"]["words"])
            words_rows.append(state["new_words"])
    groups = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
    scales = [card["adapter"]["alpha"] / card["adapter"]["rank"] * strength
              for card, strength in zip(cards, strengths, strict=True)]
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.down.copy_(torch.cat([state[f"{name}.down"] for state in tensors]))
            layer.up.copy_(torch.cat([s * state[f"{name}.up"] for s, state in zip(scales, tensors, strict=True)], 1))
            layer.group_of_rank = groups.to(layer.down.device)
        if words_rows:
            new_words_table(model).rows.copy_(torch.cat(words_rows))
    model.adapter_groups = len(ranks)
    return model


def add_zip_gates(model: nn.Module) -> list[nn.Parameter]:
    """Give every LoRA layer of a :func:`stack_adapters` model one trainable coefficient per input column and
    adapter (starting at 1: plain addition) and freeze everything else; return the gates."""
    groups = getattr(model, "adapter_groups", None)
    if groups is None:
        raise ValueError("add_zip_gates needs a model made by stack_adapters")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    gates = []
    for layer in lora_layers(model).values():
        layer.gates = nn.Parameter(torch.ones(groups, layer.down.shape[1], device=layer.down.device))
        gates.append(layer.gates)
    return gates


class OnlyGroup:
    """Context manager: inside it, every LoRA layer applies only adapter ``group`` (ungated) — the model with
    that one adapter, the target ZipLoRA's merged model must reproduce on that adapter's prompts."""

    def __init__(self, model: nn.Module, group: int) -> None:
        self.layers, self.group = list(lora_layers(model).values()), group

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.selected_group = self.group

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.selected_group = None


def gate_overlap(model: nn.Module) -> torch.Tensor:
    """ZipLoRA's penalty: the mean over layers of |m₁ · m₂| / in (0 when the adapters use disjoint columns,
    1 at plain addition)."""
    overlaps = [(layer.gates[0] * layer.gates[1]).sum().abs() / layer.gates.shape[1]
                for layer in lora_layers(model).values() if layer.gates is not None]
    if not overlaps:
        raise ValueError("the model has no gates: add_zip_gates(model) first")
    return torch.stack(overlaps).mean()


def zip_merge_loss(model: nn.Module, schedule: NoiseSchedule,
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]], overlap_weight: float = 0.01) -> torch.Tensor:
    """ZipLoRA's objective (lesson 13, eq. 5), matched at the denoiser's output: for each adapter g and a batch
    (images, caption tokens) of its own concept, ‖ε_merged(x_t, t, c) − ε_g(x_t, t, c)‖² at a fresh t and ε,
    where ε_g is the model with adapter g alone; plus ``overlap_weight`` × :func:`gate_overlap`."""
    check_number("overlap_weight", overlap_weight, 0.0)
    loss = overlap_weight * gate_overlap(model)
    for group, (images, tokens) in enumerate(batches):
        t = torch.randint(1, schedule.T + 1, (len(images),), device=images.device)
        x_t = schedule.q_sample(images, t, randn_like(images))
        with torch.no_grad(), OnlyGroup(model, group):
            target = model(x_t, t, tokens)
        loss = loss + (model(x_t, t, tokens) - target).pow(2).mean()
    return loss


@torch.no_grad()
def lora_from_delta(base: nn.Module, tuned: nn.Module, rank: int, targets: str | Sequence[str] = "unet",
                    ) -> tuple[nn.Module, float]:
    """Inject into ``base`` (in place) the rank-``rank`` adapter nearest to ``tuned`` − ``base`` in every targeted
    layer: ΔW ≈ U_r S_r V_rᵀ (truncated SVD of the change, the kernel flattened), B = U_r S_r, A = V_rᵀ, α = r.

    Returns the model and the share of the targeted layers' change (squared Frobenius norm) the adapter keeps.
    Changes outside the targeted weights (biases, norms, embeddings) are not carried over.
    """
    names = target_names(base, targets)
    tuned_modules = dict(tuned.named_modules())
    changes = {}
    for name in names:
        other = tuned_modules.get(name)
        weight = base.get_submodule(name).weight
        if other is None or other.weight.shape != weight.shape:
            raise ValueError(f"tuned has no layer {name!r} shaped like base's {tuple(weight.shape)}: not the same "
                             "architecture")
        changes[name] = (other.weight - weight).float()
    inject(base, rank, alpha=rank, targets=names)
    kept = total = 0.0
    for name, layer in lora_layers(base).items():
        change = changes[name].flatten(1)
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        r = min(rank, len(s))
        layer.up.zero_()
        layer.down.zero_()
        layer.up.flatten(1)[:, :r] = u[:, :r] * s[:r]
        layer.down.flatten(1)[:r] = vh[:r]
        kept, total = kept + s[:r].pow(2).sum().item(), total + s.pow(2).sum().item()
    return base, kept / max(total, 1e-30)
