"""Images on the device, one epoch at a time, without per-image work.

:class:`DeviceImages` holds a ``uint8 (N, C, H, W)`` CPU tensor for a training loop.
On CUDA it copies the whole tensor to the GPU once when it fits a budget (a fraction
of free GPU memory; CIFAR-10's train split is 150 MB), as airbench does; otherwise it
keeps it in pinned host memory and copies each batch asynchronously on a side stream,
one batch ahead of the one being trained on (STL-10's unlabelled split is 2.8 GB). On
the CPU it simply indexes. Augmentation stays on the device either way: batches come out
as ``uint8`` on ``device``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

DEFAULT_BUDGET = 0.25  # share of the currently free GPU memory the images may take


def fits_on_device(nbytes: int, free_bytes: int, budget: float = DEFAULT_BUDGET) -> bool:
    """Whether ``nbytes`` of images may live on a device with ``free_bytes`` free."""
    return nbytes <= budget * free_bytes


class DeviceImages:
    """Batches of ``images`` on ``device``, in an order the caller chooses.

    Args:
        images: ``uint8 (N, C, H, W)`` on the CPU.
        device: where batches are wanted.
        budget: share of free GPU memory the resident copy may take.
        resident: force the choice (``True``: copy everything to the GPU; ``False``:
            stream from pinned host memory); ``None`` decides from ``budget``.
    """

    def __init__(self, images: torch.Tensor, device: torch.device | str, *,
                 budget: float = DEFAULT_BUDGET, resident: bool | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        nbytes = images.numel() * images.element_size()
        if self.device.type != "cuda":
            self.resident = True
        elif resident is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            self.resident = fits_on_device(nbytes, free, budget)
        else:
            self.resident = resident
        if self.resident:
            self.images = images.to(self.device)
        else:  # page-locked, so host-to-device copies can run asynchronously
            self.images = images if images.is_pinned() else images.pin_memory()
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def epoch_batches(self, order: torch.Tensor, batch_size: int, *,
                      drop_last: bool = True) -> Iterator[torch.Tensor]:
        """``uint8 (B, C, H, W)`` batches on the device: ``images[order[i*B:(i+1)*B]]``.

        ``order`` is a permutation (or any index list) on any device. With ``drop_last``
        the final partial batch is skipped, so every step sees ``batch_size`` images.
        """
        n = len(order)
        n_batches = n // batch_size if drop_last else -(-n // batch_size)
        if self.resident:
            order = order.to(self.images.device)
            for i in range(n_batches):
                yield self.images[order[i * batch_size:(i + 1) * batch_size]]
        else:
            yield from self._streamed(order.cpu(), batch_size, n_batches)

    def _streamed(self, order: torch.Tensor, batch_size: int, n_batches: int
                  ) -> Iterator[torch.Tensor]:
        """Gather batch i+1 into a pinned buffer and copy it on a side stream while the
        caller's kernels for batch i run. Two pinned buffers alternate; one is refilled
        only after its previous copy has finished."""
        stream = torch.cuda.Stream(self.device)
        staging = [torch.empty((batch_size, *self.images.shape[1:]), dtype=torch.uint8,
                               pin_memory=True) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]

        def launch(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            slot = i % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the buffer's last copy is done: reuse it
            rows = order[i * batch_size:(i + 1) * batch_size]
            host = staging[slot][:len(rows)]
            torch.index_select(self.images, 0, rows, out=host)
            with torch.cuda.stream(stream):
                batch = host.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            copied[slot] = done
            return batch, done

        main = torch.cuda.current_stream(self.device)
        ahead = launch(0) if n_batches else None
        for i in range(n_batches):
            batch, done = ahead
            if i + 1 < n_batches:
                ahead = launch(i + 1)
            main.wait_event(done)  # the caller's kernels start after the copy
            batch.record_stream(main)  # its memory is in use on the main stream too
            yield batch
