import pytest
import torch

import minidiff
from minidiff import budget, is_fast


def test_suite_runs_in_fast_mode() -> None:
    assert is_fast(), "the root conftest.py should turn fast mode on for the test suite"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_fast_flag_parsing(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("MINIDIFF_FAST", raw)
    assert is_fast() is expected
    assert budget(full=100, fast=3) == (3 if expected else 100)


def test_fast_flag_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDIFF_FAST", "maybe")
    with pytest.raises(ValueError, match="MINIDIFF_FAST"):
        is_fast()


def test_budget_rejects_inverted_sizes() -> None:
    with pytest.raises(ValueError, match="fast"):
        budget(full=10, fast=100)
    with pytest.raises(TypeError):
        budget(full=10, fast=1.0)


def test_device_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIDIFF_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert minidiff.device().type == expected
    monkeypatch.setenv("MINIDIFF_DEVICE", "cpu")
    assert minidiff.device() == torch.device("cpu")


def test_device_override_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDIFF_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MINIDIFF_DEVICE"):
        minidiff.device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("MINIDIFF_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA"):
            minidiff.device()


def test_seed_everything_reproduces_draws() -> None:
    first = minidiff.seed_everything(7)
    a, a_global = torch.randn(5, generator=first), torch.randn(5)
    second = minidiff.seed_everything(7)
    b, b_global = torch.randn(5, generator=second), torch.randn(5)
    assert torch.equal(a, b) and torch.equal(a_global, b_global)
    with pytest.raises(ValueError, match="seed"):
        minidiff.seed_everything(-1)


def test_randn_like_draws_from_the_generator_and_keeps_shape_dtype_device() -> None:
    from minidiff.runtime import randn_like

    x = torch.zeros(3, 4, dtype=torch.float64)
    a = randn_like(x, torch.Generator().manual_seed(5))
    b = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(a, b) and a.dtype == torch.float64 and a.device == x.device
    assert randn_like(x).shape == (3, 4)


def test_budget_of_a_list_compares_lengths() -> None:
    assert budget(full=[10, 20, 50], fast=[30]) in ([30], [10, 20, 50])
    with pytest.raises(ValueError, match="more entries"):
        budget(full=[1, 2], fast=[1, 2, 3])
