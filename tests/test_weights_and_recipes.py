"""Lesson 07: safetensors weights with checked cards, the shipped models, and the recipes that make them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff import recipes
from minidiff.data import load_mnist
from minidiff.metrics import judge_accuracy
from minidiff.nets import DigitClassifier, UNet
from minidiff.weights import (
    WEIGHTS_DIR,
    available,
    file_sha256,
    load_card,
    load_weights,
    pretrained,
    save_weights,
    schedule_from_card,
)

SHIPPED = ("judge", "mnist_ddpm", "mnist_cond", "noisy_classifier", "attribute_judge", "text_digits", "autoencoder",
           "latent_text_digits", "mnist_progressive", "mnist_consistency", "mnist_flow")


def test_save_and_load_round_trip_without_leftovers(tmp_path) -> None:
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    card = save_weights(model, tmp_path / "tiny.safetensors", {"note": "test"}, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temp files left
    assert card["sha256"] == file_sha256(tmp_path / "tiny.safetensors") and card["note"] == "test"
    loaded = pretrained("tiny", device="cpu", directory=tmp_path)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([4, 400]), torch.tensor([1, 10])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert loaded.config == model.config


def test_half_precision_storage_changes_outputs_only_slightly(tmp_path) -> None:
    model = DigitClassifier().eval()
    save_weights(model, tmp_path / "judge16.safetensors")
    loaded = pretrained("judge16", device="cpu", directory=tmp_path)
    x = torch.randn(4, 1, 28, 28)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.allclose(loaded(x), model(x), atol=1e-2)
    assert (tmp_path / "judge16.safetensors").stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())


def test_a_changed_file_fails_its_checksum(tmp_path) -> None:
    save_weights(DigitClassifier(), tmp_path / "c.safetensors")
    data = bytearray((tmp_path / "c.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        pretrained("c", device="cpu", directory=tmp_path)


def test_pickle_checkpoints_are_never_loaded(tmp_path) -> None:
    """A torch.save (pickle) file is not safetensors: loading it must fail instead of unpickling it."""
    path = tmp_path / "evil.safetensors"
    torch.save(DigitClassifier().state_dict(), path)
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        load_weights(DigitClassifier(), path)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no pretrained weights named 'nope'"):
        pretrained("nope")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_weights(DigitClassifier(), "model.pt")
    with pytest.raises(ValueError, match="can only save"):
        save_weights(torch.nn.Linear(2, 2), "x.safetensors")
    with pytest.raises(ValueError, match="no noise schedule"):
        schedule_from_card(load_card("judge"))


def test_shipped_weights_have_complete_cards_and_fit_the_size_budget() -> None:
    assert set(SHIPPED) <= set(available())
    total = sum(path.stat().st_size for path in WEIGHTS_DIR.rglob("*.safetensors"))  # lesson 13's adapters too
    assert total <= 30 * 2**20, f"shipped weights take {total / 2**20:.1f} MiB, over the 30 MB budget"
    for name in SHIPPED:
        card = load_card(name)
        for key in ("recipe", "steps", "train_seconds", "device", "metrics", "sha256", "model", "seed"):
            assert key in card, f"{name}.json lacks {key!r}"
        assert card["recipe"].startswith(f"python -m minidiff.recipes {name}") and not card["fast_mode"]
        assert ("--time-limit" in card["recipe"]) == card["stopped_by_time_limit"]  # the command reproduces it
        assert card["sha256"] == file_sha256(WEIGHTS_DIR / f"{name}.safetensors")


def test_shipped_diffusion_models_load_with_their_schedules() -> None:
    for name in ("mnist_ddpm", "mnist_cond"):
        model = minidiff.pretrained(name, device="cpu")
        schedule = schedule_from_card(model.card)
        assert schedule.T == 1000 and isinstance(model, UNet)
        assert model.card["metrics"]["samples"] == 1000
    assert load_card("mnist_ddpm")["metrics"]["fid_ratio"] <= 2.0


def test_shipped_noisy_classifier_reads_lightly_noised_digits() -> None:
    classifier = minidiff.pretrained("noisy_classifier", device="cpu")
    images, labels = load_mnist("heldout")
    schedule = schedule_from_card(classifier.card)
    t = torch.full((len(images),), 100)
    noisy = schedule.q_sample(images, t, torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        accuracy = (classifier(noisy, t).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95
    assert judge_accuracy(minidiff.pretrained("judge", device="cpu"), noisy, labels) < accuracy


def test_recipe_command_line_in_fast_mode(tmp_path) -> None:
    """What CI runs of ``python -m minidiff.recipes``: the judge recipe end to end, then its card."""
    done = subprocess.run([sys.executable, "-m", "minidiff.recipes", "judge", "--fast", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((tmp_path / "judge.json").read_text())
    assert card["fast_mode"] and card["recipe"].endswith("--fast") and card["steps"] == 20
    assert pretrained("judge", device="cpu", directory=tmp_path).card == card


@pytest.mark.parametrize("name", ["mnist_ddpm", "mnist_cond", "noisy_classifier", "attribute_judge", "text_digits",
                                  "autoencoder", "latent_text_digits", "mnist_progressive",
                                  "mnist_consistency", "mnist_flow", "mnist_reflow"])
def test_every_recipe_runs_in_fast_mode(tmp_path, name: str) -> None:
    card = recipes.all_recipes()[name](tmp_path, progress=False)
    assert card["fast_mode"] and (tmp_path / f"{name}.safetensors").exists()
    assert pretrained(name, device="cpu", directory=tmp_path).card["sha256"] == card["sha256"]


def test_recipe_command_line_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        recipes.main(["no_such_recipe"])
    with pytest.raises(SystemExit):
        recipes.main(["judge", "--steps", "0"])


def test_an_interrupted_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "judge.safetensors"
    save_weights(DigitClassifier(), path)
    before = path.read_bytes()

    def crash(tensors: dict, filename: str) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("minidiff.weights.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights(DigitClassifier(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.json", "judge.safetensors"]


def test_saving_refuses_values_float16_cannot_hold_and_clears_stale_temporaries(tmp_path: Path) -> None:
    model = DigitClassifier()
    stale = tmp_path / ".judge.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    save_weights(model, tmp_path / "judge.safetensors")
    assert not stale.exists()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = 1e5  # above float16's 65504
    with pytest.raises(ValueError, match="would be stored as inf"):
        save_weights(model, tmp_path / "judge.safetensors")
    save_weights(model, tmp_path / "wide.safetensors", dtype=torch.float32)  # float32 holds it
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        save_weights(model, tmp_path / "judge.safetensors", dtype=torch.float32)


_KILLED_SAVE = """
import os, sys
from pathlib import Path
import torch
from minidiff.nets import DigitClassifier
from minidiff.weights import save_weights

real_replace = os.replace

def replace_then_die(source, target):
    if Path(target).name == sys.argv[2]:
        os._exit(9)  # as SIGKILL would: no exception handler, no clean-up
    real_replace(source, target)

os.replace = replace_then_die
torch.manual_seed(1)
save_weights(DigitClassifier(), Path(sys.argv[1]) / "pair.safetensors", {"note": "new"}, dtype=torch.float32)
"""


@pytest.mark.parametrize("killed_before", ["pair.safetensors", "pair.json"])
def test_a_save_killed_at_either_rename_leaves_a_consistent_pair(tmp_path: Path, killed_before: str) -> None:
    """Weights and card are one unit: a save killed just before the weights' rename leaves the old pair (and debris
    that the next save removes); one killed between the two renames is completed by the next load."""
    torch.manual_seed(0)
    old_model = DigitClassifier().eval()
    save_weights(old_model, tmp_path / "pair.safetensors", {"note": "old"}, dtype=torch.float32)
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), killed_before], capture_output=True)
    assert run.returncode == 9, run.stderr.decode()[-2000:]
    torch.manual_seed(1)
    new_model = DigitClassifier().eval()
    loaded = pretrained("pair", device="cpu", directory=tmp_path)  # must not fail its sha256 check
    expected, note = (old_model, "old") if killed_before == "pair.safetensors" else (new_model, "new")
    x = torch.randn(3, 1, 28, 28)
    assert loaded.card["note"] == note and torch.equal(loaded(x), expected(x))
    save_weights(new_model, tmp_path / "pair.safetensors", {"note": "again"}, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.json", "pair.safetensors"]
