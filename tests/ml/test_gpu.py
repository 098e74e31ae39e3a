"""The CUDA path, on a GPU (marked `gpu`; skipped where there is no CUDA). `make gpu-check` packs what a
GPU host needs to run these, and scripts/gpu_check.py runs them there with the rest of the check.

What they hold: the frozen features and a fine-tune's training step on CUDA are the CPU's (within
what cuDNN's and autocast's arithmetic allows), and a model trained on the GPU exports a bundle that
ONNX Runtime serves with the same answers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import image_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here"),
]


@pytest.fixture(scope="module")
def backbone():
    from ml.backbones import create_backbone

    return create_backbone("efficientnet_lite1").eval()


def _batch(n: int = 8, size: int = 240) -> torch.Tensor:
    from ml.images import decode_rgb
    from ml.preprocess import eval_transform
    from ml.preprocessing import Preprocessing

    transform = eval_transform(Preprocessing(size, round(size / 0.882), (0.5,) * 3, (0.5,) * 3, "bicubic"))
    return torch.stack([transform(decode_rgb(image_bytes(size=(300, 260), seed=i))) for i in range(n)])


def test_frozen_features_on_cuda_are_the_cpus(backbone):
    x = _batch()
    with torch.inference_mode():
        cpu = backbone(x)
        gpu = backbone.cuda()(x.cuda()).cpu()
    backbone.cpu()
    assert gpu.shape == cpu.shape == (8, backbone.feature_dim)
    # cuDNN's convolutions sum in another order (TF32 is off for fp32 by default in PyTorch's convs)
    assert torch.allclose(gpu, cpu, atol=1e-3, rtol=1e-3), float((gpu - cpu).abs().max())


def test_a_finetune_step_under_autocast_lowers_the_loss_on_cuda(backbone):
    from ml.finetune import FinetuneConfig, Start, _prepare, freeze_batchnorm

    device = torch.device("cuda")
    head = nn.Linear(backbone.feature_dim, 2)
    model, _, _, optimizer = _prepare(Start(backbone, head), FinetuneConfig(depth=2), device)
    model.train()
    freeze_batchnorm(model)
    x, y = _batch(16).to(device), torch.tensor([0, 1] * 8, device=device)
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=amp):
            feats = model[:-1](x)
        loss = nn.functional.cross_entropy(model[-1](feats.float()), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_a_model_on_cuda_exports_a_bundle_onnx_runtime_serves_alike(backbone, tmp_path):
    from ml.bundle import write_bundle
    from ml.predict import Predictor
    from ml.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 3)).cuda().eval()
    prep = Preprocessing(240, 272, (0.5,) * 3, (0.5,) * 3, "bicubic")
    write_bundle(tmp_path, model=model, classes=["a", "b", "c"], preprocessing=prep, metrics={}, card={})
    served = Predictor(tmp_path / "bundle", runtime="onnxruntime")
    x = _batch(4)
    with torch.inference_mode():
        expected = torch.softmax(model(x.cuda()).float(), 1).cpu()
    got = served.predict_tensors(list(x.numpy()), k=3)
    for row, probs in zip(got, expected, strict=True):
        assert row[0].label == "abc"[int(probs.argmax())]
        assert abs(row[0].score - float(probs.max())) < 1e-3
