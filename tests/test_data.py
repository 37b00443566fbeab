import pytest
import torch

from minidiff.data import load_mnist, minibatches, to_unit_interval


def test_mnist_splits_are_fixed_disjoint_and_balanced() -> None:
    train_images, train_labels = load_mnist("train")
    held_images, held_labels = load_mnist("heldout")
    all_images, _ = load_mnist("all")
    assert train_images.shape == (4000, 1, 28, 28) and held_images.shape == (1000, 1, 28, 28)
    assert train_images.dtype == torch.float32 and train_labels.dtype == torch.int64
    assert train_images.min() == -1.0 and train_images.max() == 1.0
    assert torch.equal(held_images, all_images[::5])  # the documented rule: every fifth digit is held out
    assert torch.bincount(train_labels, minlength=10).min() >= 300
    assert torch.bincount(held_labels, minlength=10).min() >= 70
    # no held-out digit appears among the training digits
    train_flat = train_images.flatten(1)
    assert all(not (train_flat == image.flatten()).all(1).any() for image in held_images[:50])


def test_pixels_decode_back_to_eight_bit_levels() -> None:
    images, _ = load_mnist("heldout")
    grey = to_unit_interval(images) * 255
    assert torch.allclose(grey, grey.round(), atol=1e-3)


def test_minibatches_cover_everything_once_and_reproducibly() -> None:
    values = torch.arange(10)
    labels = values * 10
    batches = list(minibatches(values, labels, batch_size=3, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and [len(b[0]) for b in batches] == [3, 3, 3, 1]
    assert all(torch.equal(b[1], b[0] * 10) for b in batches)
    again = list(minibatches(values, labels, batch_size=3, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert [len(b[0]) for b in minibatches(values, batch_size=3, drop_last=True)] == [3, 3, 3]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("test")
    with pytest.raises(ValueError, match="rows"):
        list(minibatches(torch.zeros(3), torch.zeros(4), batch_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        list(minibatches(torch.zeros(3), batch_size=0))
