"""Saving and loading weights: safetensors files with a JSON card beside them (lesson 07).

A weights file holds tensors only (safetensors), so loading it can never run code, unlike a pickled
``torch.save`` checkpoint. Next to ``NAME.safetensors`` sits ``NAME.json``, the model's card: the class
and config that rebuild the network, the recipe command that trained it, steps, time, device, the
metrics it reached, and the file's sha256, which is checked on every load. The two files are saved as one unit
(:func:`write_pair`): a save killed at any moment leaves either the old pair or the new one, never half a file
and never new weights beside an old card.

The shipped weights live in ``minidiff/pretrained_weights/``; :func:`pretrained` loads them by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minidiff.attributes import AttributeJudge, AttributeJudgeConfig
from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.nets import DigitClassifier, DigitClassifierConfig, UNet, UNetConfig
from minidiff.runtime import device as default_device
from minidiff.schedules import NoiseSchedule
from minidiff.text import TextConditionedUNet, TextUNetConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "pretrained_weights"
#: Every network that can be saved, with the config dataclass that rebuilds it from its card.
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "UNet": (UNet, UNetConfig), "DigitClassifier": (DigitClassifier, DigitClassifierConfig),
    "AttributeJudge": (AttributeJudge, AttributeJudgeConfig),
    "TextConditionedUNet": (TextConditionedUNet, TextUNetConfig), "Autoencoder": (Autoencoder, AutoencoderConfig)}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pending_card(path: Path) -> Path:
    """Where a save keeps the new card of ``path`` between its two renames."""
    return path.parent / f".{path.stem}.json.pending"


def recover_interrupted_save(path: str | Path) -> None:
    """Finish or undo a save of ``path`` (…/NAME.safetensors) that was killed between its two renames.

    :func:`write_pair` renames the new weights into place first and the new card second. If it was killed in
    between, the pending card's sha256 matches the weights now in place: it is renamed into place (the save is
    completed). If it was killed before the weights' rename, the pending card matches nothing and is removed (the
    old pair stands). Loading and saving call this, so a reader never sees new weights beside an old card."""
    path = Path(path)
    pending = _pending_card(path)
    if not pending.exists():
        return
    try:
        card = json.loads(pending.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a pending card is itself written atomically; anything else is debris
        card = {}
    if path.exists() and isinstance(card, dict) and card.get("sha256") == file_sha256(path):
        os.replace(pending, path.with_suffix(".json"))
    else:
        pending.unlink(missing_ok=True)


def write_pair(path: Path, write_tensors: Callable[[str], None], card: dict[str, Any]) -> dict[str, Any]:
    """Save a tensors file ``path`` (written by ``write_tensors(temporary_path)``) and its JSON card as one unit.

    Order: tensors to a temporary file; the card, with that file's size and sha256, to a pending file; the tensors
    renamed into place; the card renamed into place. Each rename is atomic on one file system, and
    :func:`recover_interrupted_save` completes a save killed between the two, so at every moment the pair on disk is
    the old one or the new one. Leftovers of earlier killed saves are removed first. Returns the card.

    This protects against a save being killed, not against two processes saving or loading the same file at the
    same moment: a reader that comes in between the two renames completes the save itself, one that comes before
    the first rename removes the pending card and makes that save fail with an error (not a mismatched pair)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(path)
    for pattern in (f".{path.name}.*.tmp", f".{path.stem}.json.*.tmp", f".{path.stem}.json.pending.*.tmp"):
        for stale in path.parent.glob(pattern):  # left by a save that was killed (SIGKILL, power cut)
            stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    pending = _pending_card(path)
    try:
        write_tensors(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; weights and cards are for everyone to read
        card = dict(card) | {"file_bytes": Path(temporary).stat().st_size, "sha256": file_sha256(temporary)}
        _atomic_write(pending, lambda name: Path(name).write_text(json.dumps(card, indent=2) + "\n",
                                                                   encoding="utf-8"))
        os.replace(temporary, path)  # from here on, the new card is the one that belongs to the file
        os.replace(pending, path.with_suffix(".json"))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        recover_interrupted_save(path)  # complete the save if the weights made it, else drop the pending card
        raise
    return card


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file onto ``path`` (atomic on one file system)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; weights and cards are for everyone to read
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: str | Path, card: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Write ``model``'s weights to ``path`` (…/NAME.safetensors) and its card to NAME.json; return the card.

    Floating-point tensors are stored as ``dtype`` (half precision by default: half the size, and the
    loaded network's outputs differ by about 1e-3 of their scale) and loaded back as float32.
    The card is ``card`` plus the model's class and config, its parameter count and the file's sha256.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    if type(model).__name__ not in MODEL_CLASSES or not hasattr(model, "config"):
        raise ValueError(f"can only save {sorted(MODEL_CLASSES)} models, got {type(model).__name__}")
    state = model.state_dict()
    for name, value in state.items():
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                raise ValueError(f"refusing to save {name}: it holds NaN or inf (did training diverge?)")
            largest = value.abs().max().item() if value.numel() else 0.0
            if largest > torch.finfo(dtype).max:
                raise ValueError(f"{name} holds {largest:.3g}, beyond {str(dtype).removeprefix('torch.')}'s largest "
                                 f"value {torch.finfo(dtype).max:.3g}: it would be stored as inf. Save with "
                                 "dtype=torch.float32")
    tensors = {name: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
               for name, value in state.items()}
    card = dict(card or {}) | {
        "model": {"class": type(model).__name__, "config": dataclasses.asdict(model.config)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "stored_dtype": str(dtype).removeprefix("torch.")}
    return write_pair(path, lambda temporary: save_file(tensors, temporary), card)


def _weights_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".safetensors":
        return candidate
    path = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not path.exists():
        raise ValueError(f"no pretrained weights named {name_or_path!r}; available: {available()}")
    return path


def load_card(name_or_path: str | Path) -> dict[str, Any]:
    """The JSON card of shipped weights ``name`` (or of a ``.safetensors`` path)."""
    path = _weights_path(name_or_path)
    recover_interrupted_save(path)
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def build_model(card: dict[str, Any]) -> nn.Module:
    """A fresh, untrained network of the class and config that ``card`` describes."""
    spec = card["model"]
    if spec["class"] not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {spec['class']!r} in card; known: {sorted(MODEL_CLASSES)}")
    model_class, config_class = MODEL_CLASSES[spec["class"]]
    known = {field.name for field in dataclasses.fields(config_class)}
    if unknown := sorted(set(spec["config"]) - known):
        raise ValueError(f"the card's {spec['class']} config has fields {unknown} that {config_class.__name__} "
                         f"does not know (known: {sorted(known)}): a card from a newer minidiff?")
    return model_class(config_class(**spec["config"]))


def load_weights(model: nn.Module, path: str | Path, sha256: str | None = None) -> nn.Module:
    """Load a safetensors file into ``model`` (strictly: every name and shape must match), checking ``sha256``."""
    path = Path(path)
    if sha256 is not None and (actual := file_sha256(path)) != sha256:
        raise ValueError(f"{path} is corrupted or was replaced: sha256 {actual[:12]}… but its card says "
                         f"{sha256[:12]}…; re-download or re-run its recipe")
    tensors = load_file(path)  # safetensors: plain tensors, never pickle
    reference = model.state_dict()
    model.load_state_dict({name: value.to(reference[name].dtype) if name in reference else value
                           for name, value in tensors.items()}, strict=True)
    return model


def pretrained(name: str, device: torch.device | str | None = None, directory: str | Path | None = None) -> nn.Module:
    """The network ``name`` with its shipped weights, in eval mode on ``device``; its card is ``model.card``.

    ``directory`` loads from somewhere else (e.g. the output of ``python -m minidiff.recipes``).
    """
    path = Path(directory) / f"{name}.safetensors" if directory is not None else _weights_path(name)
    if not path.exists():
        raise ValueError(f"no weights at {path}")
    card = load_card(path)
    model = load_weights(build_model(card), path, card["sha256"])
    model.card = card
    return model.to(device or default_device()).eval()


def schedule_from_card(card: dict[str, Any]) -> NoiseSchedule:
    """The noise schedule a diffusion model was trained with, as recorded in its card."""
    spec = card.get("schedule")
    if spec is None:
        raise ValueError("this card records no noise schedule (is it a classifier?)")
    return NoiseSchedule.from_spec(spec)


def available() -> list[str]:
    """Names of the shipped weights."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))
