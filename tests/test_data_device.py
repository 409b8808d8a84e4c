"""``DeviceImages``: batches equal ``images[order[i*B:(i+1)*B]]`` whichever way the images
are held (resident on the device, or streamed from pinned host memory)."""

from __future__ import annotations

import pytest
import torch

from dinobench.data.device import DeviceImages, fits_on_device


def _images(n: int = 23) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)


def _expected(images, order, batch_size, drop_last):
    n = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    return [images[order[i * batch_size:(i + 1) * batch_size]] for i in range(n)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_cpu_batches_follow_the_order(drop_last):
    images = _images()
    source = DeviceImages(images, "cpu")
    order = torch.randperm(len(images))
    got = list(source.epoch_batches(order, 5, drop_last=drop_last))
    want = _expected(images, order, 5, drop_last)
    assert len(got) == (4 if drop_last else 5) and len(source) == 23
    assert all(torch.equal(g, w) and g.dtype == torch.uint8 for g, w in zip(got, want))
    assert source.resident and source.images.data_ptr() == images.data_ptr()  # no copy


def test_rejects_anything_but_uint8_nchw():
    with pytest.raises(ValueError, match="uint8"):
        DeviceImages(torch.zeros(4, 3, 8, 8), "cpu")
    with pytest.raises(ValueError, match="uint8"):
        DeviceImages(torch.zeros(4, 8, 8, dtype=torch.uint8), "cpu")


def test_the_budget_decides_residency():
    assert fits_on_device(150 << 20, 80 << 30)  # CIFAR-10 train on an 80 GB card
    assert not fits_on_device(2_765 << 20, 8 << 30)  # STL-10 unlabelled, 8 GB free
    assert fits_on_device(100, 1000, budget=0.1) and not fits_on_device(101, 1000, budget=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_batches_match_resident_or_streamed(resident):
    """Batches are used on the main stream the way training uses them: consumed by
    kernels queued behind others, never synchronised one by one (a ``.cpu()`` per batch
    would wait for every copy and hide a missing ``wait_event``, and would keep the main
    stream idle, hiding a buffer reused before the main stream had read it, which
    ``record_stream`` prevents). Results stay on the device and are compared once."""
    images = _images(1_001)
    source = DeviceImages(images, "cuda", resident=resident)
    assert source.resident == resident
    assert source.images.is_cuda == resident
    order = torch.randperm(len(images))
    for drop_last in (True, False):
        want = _expected(images, order, 64, drop_last)
        got = []
        for i, batch in enumerate(source.epoch_batches(order, 64, drop_last=drop_last)):
            assert batch.is_cuda and batch.dtype == torch.uint8
            if i % 2:  # the main stream falls behind the copies ...
                torch.cuda._sleep(2_000_000)
            # ... or reads the batch at once; the copy it makes outlives the batch.
            got.append(batch.to(torch.int16) + 0)
        assert len(got) == len(want)
        got = torch.cat(got).cpu()  # one synchronisation, at the end
        assert torch.equal(got, torch.cat(want).to(torch.int16))
