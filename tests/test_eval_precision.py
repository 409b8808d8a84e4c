"""Evaluation numerics do not depend on the caller or the device: features, attention
maps and k-NN similarities are computed in float32 with autocast off and TF32 off,
whatever autocast context the caller is in; a CUDA run gives the CPU's numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinobench.eval import features as feats
from dinobench.eval.attention import cls_attention_maps
from dinobench.eval.knn import knn_classify
from dinobench.vit import ViT, ViTConfig

CUDA = torch.cuda.is_available()
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "convolution",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the floating inputs of every matrix product dispatched inside."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.dtypes |= {a.dtype for a in args
                            if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return func(*args, **(kwargs or {}))


def _vit(device="cpu") -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=32, grid=8, in_chans=3, dim=32, depth=2, heads=2,
                         mlp_dim=64)).to(device)


def _images(n=10) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def _evaluate(vit: ViT, images: torch.Tensor):
    f = feats.extract_features(vit, images, MEAN, STD, batch_size=4)
    maps = cls_attention_maps(vit, images, MEAN, STD, batch_size=4)
    pred = knn_classify(f[:6], torch.arange(6) % 3, f[6:], k=3, num_classes=3)
    return f, maps, pred


def test_evaluation_ignores_the_callers_autocast():
    vit, images = _vit(), _images()
    want = _evaluate(vit, images)
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as seen:
        got = _evaluate(vit, images)
    assert seen.dtypes == {torch.float32}
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_knn_similarities_are_float32_under_autocast():
    """The similarity matmul ran in bf16 under a caller's autocast before; the recorder
    sees the dtypes of its inputs."""
    gen = torch.Generator().manual_seed(0)
    bank, query = torch.randn(50, 8, generator=gen), torch.randn(7, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as seen:
        knn_classify(bank, torch.arange(50) % 5, query, k=4, num_classes=5)
    assert seen.dtypes == {torch.float32}


def test_tf32_flags_are_off_inside_and_restored_after():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        with feats._tf32_off():
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_evaluation_gives_the_cpu_numbers():
    """Same weights, same images: CUDA features and attention maps equal the CPU's to
    float32 accuracy (bf16 or TF32 would miss by 1e-3 and more), even under a caller's
    bf16 autocast, and k-NN predicts the same labels."""
    images = _images(16)
    f_cpu, maps_cpu, pred_cpu = _evaluate(_vit(), images)
    vit = _vit("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f_gpu, maps_gpu, pred_gpu = _evaluate(vit, images.cuda())
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps_gpu.cpu(), maps_cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(pred_gpu.cpu(), pred_cpu)
