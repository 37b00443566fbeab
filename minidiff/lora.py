"""LoRA by hand (lesson 13): a frozen layer plus a trainable low-rank update, W' = W + (α/r) B A.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3: a pretrained weight
W ∈ R^{out×in} stays frozen and the fine-tuning update is constrained to rank r,

    h = W x + (α/r) B A x,   A ∈ R^{r×in} (``down``),  B ∈ R^{out×r} (``up``),            (lesson 13, eq. 1)

with B initialised to zero, so the adapted network starts *exactly* equal to the base one, and A random, so
that the gradient of B is not zero as well. A 3×3 convolution gets the same treatment with A a 3×3
convolution to r channels and B a 1×1 convolution back (the "LoCon" layout): ΔW = B ∘ A is again rank r when
the kernel is flattened to a [out, in·3·3] matrix.

Everything an adapter adds lives in this module's layers: :func:`inject` wraps the chosen layers,
:func:`merge` folds ΔW into W (no extra cost at sampling time), :func:`unmerge` takes it out again,
:func:`remove` restores the base layers, and :func:`save_adapter` writes only the adapter's tensors (a few
hundred kilobytes against the base model's megabytes) with a card naming the base it belongs to.

A new word (DreamBooth's identifier, lesson 13) needs a new row in the text encoder's embedding table:
:func:`add_words` appends trainable rows, which belong to the adapter too.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from minidiff.runtime import check_number

#: Which layers :func:`inject` wraps, as glob patterns over module names (``model.named_modules()``).
#: "unet": every linear and convolution of the denoiser; "attention": its attention projections only;
#: "cross_attention": the keys and values that read the text (Kumari et al. 2023, "Custom Diffusion").
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "unet": ("unet.*",),
    "attention": ("unet.*.query", "unet.*.key_value", "unet.*.out"),
    "cross_attention": ("unet.*.key_value",),
}


class LoRALayer(nn.Module):
    """What a LoRA linear and a LoRA convolution share: the frozen base layer, A (``down``), B (``up``), the
    scale α/r, a user ``strength`` (the "LoRA scale" of lesson 13's widget) and whether ΔW is merged into W.

    ``gates`` (optional, [groups, in]) multiply the input columns of A, one row of gates per group of ranks:
    after :func:`stack_adapters`, group g holds the ranks of the g-th adapter and its gates are ZipLoRA's
    per-column merge coefficients (Shah et al. 2023), m_g ⊙ ΔW_g, still a rank-r update.
    """

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = down.shape[0], float(alpha)
        self.down, self.up = nn.Parameter(down), nn.Parameter(up)
        self.strength = 1.0
        self.merged = False
        self.gates: nn.Parameter | None = None
        self.selected_group: int | None = None  # set by lora_merge.OnlyGroup: apply that adapter alone
        self.register_buffer("group_of_rank", torch.zeros(self.rank, dtype=torch.long), persistent=False)

    @property
    def scale(self) -> float:
        """The factor in front of B A: (α/r) times the user's ``strength``."""
        return self.alpha / self.rank * self.strength

    def gated_down(self) -> torch.Tensor:
        """A with each input column multiplied by its gate (A itself when there are no gates)."""
        if self.selected_group is not None:
            keep = (self.group_of_rank == self.selected_group).to(self.down.dtype)
            return self.down * keep.view(-1, *([1] * (self.down.ndim - 1)))
        if self.gates is None:
            return self.down
        gates = self.gates[self.group_of_rank]  # [rank, in]
        return self.down * gates.view(*gates.shape, *([1] * (self.down.ndim - 2)))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·strength·B A, shaped like the base weight (for a convolution: B's 1×1 kernel times A's)."""
        down = self.gated_down()
        delta = self.up.flatten(1) @ down.flatten(1)  # [out, r] @ [r, in·k·k]
        return self.scale * delta.view_as(self.base.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW: afterwards the layer costs exactly what the base layer costs."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW: undo :meth:`merge` (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """B A x without forming ΔW (two thin matrix products: r·(in + out) per input instead of in·out)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x (+ the low-rank update unless it is merged into W already)."""
        out = self.base(x)
        if self.merged or self.strength == 0.0:
            return out
        return out + self.scale * self.update(x)


class LoRALinear(LoRALayer):
    """``nn.Linear`` + (α/r) B A (lesson 13, eq. 1). A starts like a linear layer's weight, B at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        down = torch.empty(rank, base.in_features, device=base.weight.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's own initialisation
        super().__init__(base, down, torch.zeros(base.out_features, rank, device=base.weight.device),
                         rank if alpha is None else alpha)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """B (A x)."""
        return F.linear(F.linear(x, self.gated_down().to(x.dtype)), self.up.to(x.dtype))


class LoRAConv2d(LoRALayer):
    """``nn.Conv2d`` + (α/r) B ∘ A: A is a conv to ``rank`` channels with the base's kernel, stride and padding;
    B a 1×1 conv back to the output channels, initialised to zero."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None) -> None:
        if base.groups != 1:
            raise ValueError(f"LoRA supports ungrouped convolutions only, got groups={base.groups}")
        down = torch.empty(rank, base.in_channels, *base.kernel_size, device=base.weight.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        super().__init__(base, down, torch.zeros(base.out_channels, rank, 1, 1, device=base.weight.device),
                         rank if alpha is None else alpha)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """B ∘ (A ∘ x)."""
        hidden = F.conv2d(x, self.gated_down().to(x.dtype), None, self.base.stride, self.base.padding,
                          self.base.dilation)
        return F.conv2d(hidden, self.up.to(x.dtype))


class NewWords(nn.Module):
    """An embedding table with extra rows: ids below the base vocabulary read the frozen table, the new ids
    read trainable rows (a new word's vector, learned with the adapter)."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = nn.Parameter(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] → vectors [..., dim]."""
        return F.embedding(ids, torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)]))


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")


def _wrap(layer: nn.Module, rank: int, alpha: float | None) -> LoRALayer:
    if isinstance(layer, nn.Linear):
        return LoRALinear(layer, rank, alpha)
    if isinstance(layer, nn.Conv2d):
        return LoRAConv2d(layer, rank, alpha)
    raise ValueError(f"LoRA wraps nn.Linear and nn.Conv2d layers, got {type(layer).__name__}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` by the name of the layer it wraps."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def target_names(model: nn.Module, targets: str | Sequence[str] = "unet") -> list[str]:
    """The names of the linear and conv layers that ``targets`` (a preset of :data:`TARGET_PRESETS` or glob
    patterns) selects in ``model``."""
    patterns = TARGET_PRESETS.get(targets, (targets,)) if isinstance(targets, str) else tuple(targets)
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, LoRALayer)
             and ".base" not in f".{name}" and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        raise ValueError(f"targets {targets!r} select no linear or conv layer of {type(model).__name__}; presets: "
                         f"{sorted(TARGET_PRESETS)}")
    return names


def inject(model: nn.Module, rank: int, alpha: float | None = None, targets: str | Sequence[str] = "unet",
           ) -> list[str]:
    """Wrap the layers ``targets`` selects in LoRA layers of ``rank`` (scale α/r; α = r by default) and freeze
    everything else: afterwards ``model``'s only trainable parameters are the adapters' A and B (and any rows of
    :func:`add_words`). Returns the wrapped layers' names. The adapted model starts equal to the base one.
    """
    _check_rank(rank)
    if alpha is not None:
        check_number("alpha", alpha, 0.0, above=True)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: remove(model) them (or merge them) before injecting again")
    names = target_names(model, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if (words := new_words_table(model)) is not None:  # new words (add_words) belong to the adapter: kept trainable
        words.rows.requires_grad_(True)
    for name in names:
        _replace(model, name, _wrap(model.get_submodule(name), rank, alpha))
    return names


def set_strength(model: nn.Module, strength: float) -> None:
    """Multiply every adapter's update by ``strength`` (0: the base model, 1: as trained, >1: exaggerated)."""
    check_number("strength", strength)
    for layer in lora_layers(model).values():
        if layer.merged:
            raise ValueError("unmerge(model) before changing the strength of merged adapters")
        layer.strength = float(strength)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + ΔW) and return ``model``."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again (W ← W − ΔW) and return ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Put the base layers back (unmerged: the base model again), drop new words, and return ``model``."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        _replace(model, name, layer.base)
    for name, module in list(model.named_modules()):
        if isinstance(module, NewWords):
            _replace(model, name, module.base)
    if hasattr(model, "base_vocabulary"):
        model.vocabulary = model.base_vocabulary
    return model


def _embedding_owner(model: nn.Module) -> tuple[str, nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, NewWords)) and name.endswith("encoder.tokens"):
            return name, module
    raise ValueError(f"{type(model).__name__} has no text encoder (encoder.tokens): new words need a text model")


def add_words(model: nn.Module, words: Sequence[str], init_from: str = "a") -> list[int]:
    """Append ``words`` to ``model``'s vocabulary with trainable embedding rows, each starting as a copy of the
    row of ``init_from``; returns their token ids. ``model.vocabulary`` (used by the sampler's tokenizer) grows.

    A fresh row copied from a near-empty word ("a") starts the new word as almost no word at all: the model's
    prior for "a red sks 7" is then "a red 7", DreamBooth's intent when it picks a rare token (Ruiz et al. 2023).
    """
    if not hasattr(model, "vocabulary"):
        raise ValueError(f"{type(model).__name__} has no vocabulary: new words need a text-conditioned model")
    vocabulary = tuple(model.vocabulary)
    words = [str(word).lower() for word in words]
    for word in words:
        if not word.isalpha() or word in vocabulary or words.count(word) > 1:
            raise ValueError(f"new word {word!r} must be letters only, not yet in the vocabulary and given once")
    if init_from not in vocabulary:
        raise ValueError(f"init_from must be a word of the vocabulary, got {init_from!r}")
    name, table = _embedding_owner(model)
    base, old_rows = (table.base, table.rows.data) if isinstance(table, NewWords) else (table, None)
    seed_row = F.embedding(torch.tensor([vocabulary.index(init_from)], device=base.weight.device),
                           torch.cat([base.weight] + ([old_rows] if old_rows is not None else []))).detach()
    rows = seed_row.repeat(len(words), 1)
    if old_rows is not None:
        rows = torch.cat([old_rows, rows])
    _replace(model, name, NewWords(base, rows.clone()))
    if not hasattr(model, "base_vocabulary"):
        model.base_vocabulary = vocabulary
    model.vocabulary = vocabulary + tuple(words)
    return [model.vocabulary.index(word) for word in words]


def new_words_table(model: nn.Module) -> NewWords | None:
    """The model's table of new words, if :func:`add_words` gave it one."""
    return next((module for module in model.modules() if isinstance(module, NewWords)), None)


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters that will be trained (``requires_grad``): after :func:`inject`, the adapter's alone."""
    return (p for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by name: ``LAYER.down``/``LAYER.up`` per LoRA layer and ``new_words`` rows."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.down"], state[f"{name}.up"] = layer.gated_down().detach(), layer.up.detach()
    if (words := new_words_table(model)) is not None:
        state["new_words"] = words.rows.detach()
    return {name: tensor.float().cpu().contiguous() for name, tensor in state.items()}


def adapter_size(model: nn.Module) -> int:
    """How many numbers the adapter holds (its A, B and new rows)."""
    return sum(tensor.numel() for tensor in adapter_state(model).values())


# ---------------------------------------------------------------------------------------
# Adapter files: the adapter's tensors alone, with a card naming the base model
# ---------------------------------------------------------------------------------------

ADAPTERS_DIR = Path(__file__).resolve().parent / "pretrained_weights" / "adapters"


def adapter_card(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card fields that rebuild ``model``'s adapter on its base: rank, α, layers, new words, and the base
    model's name and sha256 (from ``model.card``, which :func:`minidiff.pretrained` sets)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: inject(model, rank) first")
    ranks = {layer.rank for layer in layers.values()}
    alphas = {layer.alpha / layer.rank for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"an adapter file holds one rank and one scale; this model mixes ranks {sorted(ranks)}")
    base_card = getattr(model, "card", None) or {}
    words = list(model.vocabulary[len(model.base_vocabulary):]) if hasattr(model, "base_vocabulary") else []
    layer = next(iter(layers.values()))
    return {"adapter": {"rank": layer.rank, "alpha": layer.alpha, "layers": sorted(layers), "words": words,
                        "base": {"name": base_card.get("name"), "sha256": base_card.get("sha256")}}} | (extra or {})


def save_adapter(model: nn.Module, path: str | Path, card: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Write the adapter of ``model`` (not the base weights) to ``path`` (…/NAME.safetensors) and its card to
    NAME.json, as one unit (:func:`minidiff.weights.write_pair`); return the card (with the file's size and sha256).

    Tensors are stored as ``dtype`` (half precision by default, as :func:`minidiff.save_weights` does; pass
    ``torch.float32`` to get back bit-identical outputs) and loaded as float32."""
    from minidiff.weights import write_pair  # weights imports the networks; keep this light

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    card = adapter_card(model, card)
    tensors = adapter_state(model)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save {name}: it holds NaN or inf (did training diverge?)")
    tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    card |= {"stored_dtype": str(dtype).removeprefix("torch."), "parameters": sum(t.numel() for t in tensors.values())}
    return write_pair(path, lambda temporary: save_file(tensors, temporary), card)


def _adapter_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    path = candidate if candidate.suffix == ".safetensors" else ADAPTERS_DIR / f"{name_or_path}.safetensors"
    if not path.exists():
        shipped = sorted(p.stem for p in ADAPTERS_DIR.glob("*.safetensors"))
        raise ValueError(f"no adapter at {path}; shipped adapters: {shipped}")
    return path


def load_adapter_card(name_or_path: str | Path) -> dict[str, Any]:
    """The card of a shipped adapter ``name`` (or of a ``.safetensors`` path)."""
    from minidiff.weights import recover_interrupted_save

    path = _adapter_path(name_or_path)
    recover_interrupted_save(path)  # a save killed between its two renames is completed first
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def read_adapter(name_or_path: str | Path, model: nn.Module, check_base: bool = True
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The card and tensors of adapter ``name_or_path``, after checking the file's sha256 against its card and
    (unless ``check_base=False``) that ``model`` is the base it was trained on (``model.card['sha256']``)."""
    from minidiff.weights import file_sha256

    path = _adapter_path(name_or_path)
    card = load_adapter_card(path)
    if (actual := file_sha256(path)) != card["sha256"]:
        raise ValueError(f"{path} is corrupted or was replaced: sha256 {actual[:12]}… but its card says "
                         f"{card['sha256'][:12]}…")
    base = card["adapter"]["base"]
    model_card = getattr(model, "card", None) or {}
    if check_base and model_card.get("sha256") != base["sha256"]:
        raise ValueError(f"wrong base model: adapter {path.name} was trained on {base['name']!r} (sha256 "
                         f"{str(base['sha256'])[:12]}…), but the model given is {model_card.get('name')!r} "
                         f"(sha256 {str(model_card.get('sha256'))[:12]}…)")
    return card, load_file(path)


def load_adapter(model: nn.Module, name_or_path: str | Path, check_base: bool = True) -> nn.Module:
    """Put the adapter ``name_or_path`` onto ``model`` (injecting its layers and words) and return ``model``.

    Refused with a clear error: a file whose sha256 does not match its card; a base model other than the one
    the adapter was trained on (``model.card['sha256']``; ``check_base=False`` skips this); a model whose LoRA
    layers already have another rank or other layers; layer shapes that do not fit.
    """
    card, tensors = read_adapter(name_or_path, model, check_base)
    spec = card["adapter"]
    existing = lora_layers(model)
    if existing:
        ranks = {layer.rank for layer in existing.values()}
        if sorted(existing) != spec["layers"] or ranks != {spec["rank"]}:
            raise ValueError(f"rank mismatch: the model already carries LoRA layers of rank {sorted(ranks)} on "
                             f"{len(existing)} layers; the adapter has rank {spec['rank']} on {len(spec['layers'])}"
                             " layers. remove(model) first")
    else:
        modules = dict(model.named_modules())
        missing = [name for name in spec["layers"] if name not in modules]
        if missing:
            raise ValueError(f"wrong base model: it has no layer {missing[0]!r} that the adapter adapts")
        inject(model, spec["rank"], spec["alpha"], targets=spec["layers"])
    if spec["words"] and tuple(getattr(model, "vocabulary", ()))[-len(spec["words"]):] != tuple(spec["words"]):
        add_words(model, spec["words"])
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for part in ("down", "up"):
                value, target = tensors[f"{name}.{part}"], getattr(layer, part)
                if value.shape != target.shape:
                    raise ValueError(f"wrong base model or rank: {name}.{part} is {tuple(target.shape)} here but "
                                     f"{tuple(value.shape)} in the adapter")
                target.copy_(value)
        if "new_words" in tensors:
            rows = new_words_table(model).rows
            if rows.shape != tensors["new_words"].shape:
                raise ValueError(f"the adapter's new-word rows are {tuple(tensors['new_words'].shape)}, the "
                                 f"model's {tuple(rows.shape)}: was another adapter with new words loaded first?")
            rows.copy_(tensors["new_words"])
    model.adapter_card = card
    return model
