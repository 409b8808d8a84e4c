"""Joining the process group under torchrun: on CUDA the rank's GPU is made current
before NCCL starts, and the group is bound to it where torch takes ``device_id``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dinobench import distributed


@pytest.fixture
def calls(monkeypatch):
    """torchrun's variables for rank 1 of 2 on GPU 1, and a record of what ``init`` does
    (nothing is really started)."""
    seen = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "new_group", lambda **kw: seen.append(("new_group", kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.append(("set_device", i)))
    return seen


def test_cuda_device_is_set_before_the_process_group(monkeypatch, calls):
    def init_process_group(backend=None, init_method=None, *, device_id=None):
        calls.append(("init_process_group", backend, device_id))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    info, device = distributed.init("cuda")
    assert (info.rank, info.world_size, info.local_rank, device) == (1, 2, 1, "cuda:1")
    assert calls[:2] == [("set_device", 1),
                         ("init_process_group", "nccl", torch.device("cuda", 1))]
    assert calls[2] == ("new_group", {"backend": "gloo"})


def test_torch_without_device_id_still_joins(monkeypatch, calls):
    def init_process_group(backend=None, init_method=None):  # torch before device_id
        calls.append(("init_process_group", backend))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    assert distributed.init("cuda")[1] == "cuda:1"
    assert calls[:2] == [("set_device", 1), ("init_process_group", "nccl")]


def test_cpu_ranks_use_gloo_and_touch_no_gpu(monkeypatch, calls):
    def init_process_group(backend=None, init_method=None, *, device_id=None):
        calls.append(("init_process_group", backend, device_id))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    assert distributed.init("cpu")[1] == "cpu"
    assert calls[0] == ("init_process_group", "gloo", None)
    assert all(c[0] != "set_device" for c in calls)
