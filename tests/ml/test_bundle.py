from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from ml.backbones import Preprocessing
from ml.bundle import ExportError, check_onnx_parity, export_onnx, export_torchscript, unpack_bundle, write_bundle
from ml.predict import Predictor
from tests.conftest import image_bytes


def test_bundle_round_trip_predicts_like_the_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    prep = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3)
    zip_path = write_bundle(
        tmp_path / "out",
        model=model,
        classes=["a", "b", "c"],
        preprocessing=prep,
        metrics={"val_accuracy": 1.0},
        card={"backbone": "tiny", "strategy": {"name": "linear"}},
    )
    folder = unpack_bundle(zip_path, tmp_path / "unpacked")
    assert {p.name for p in folder.iterdir()} >= {
        "model.torchscript.pt",
        "model.onnx",
        "labels.json",
        "preprocessing.json",
        "metrics.json",
        "model_card.md",
        "graft.json",
    }
    card = json.loads((folder / "graft.json").read_text())
    assert card["classes"] == ["a", "b", "c"]
    assert card["onnx"]["opset"] and card["onnx"]["max_abs_diff"] < 1e-4
    assert {"python", "torch", "torchvision", "timm", "onnx", "onnxruntime"} <= set(card["versions"])
    assert "ONNX" in (folder / "model_card.md").read_text()
    predictor = Predictor(folder)
    img = predictor.decode(image_bytes(size=(48, 40), seed=3))
    (preds,) = predictor.predict([img], k=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(predictor._transform(img))[None]).softmax(1)[0]
    assert [p.label for p in preds] == [["a", "b", "c"][i] for i in expected.argsort(descending=True)]
    assert abs(preds[0].score - expected.max().item()) < 1e-5


def test_model_card_says_why_and_escapes_user_text(tmp_path):
    hostile = "<script>alert(1)</script> | *bold* [x](y)"
    decisions = [
        {
            "what": "representation",
            "chosen": hostile,
            "candidates": [
                {"name": "top @ 224 px", "score": 0.91, "seconds": 1.5, "detail": {}},
                {"name": hostile, "score": 0.9375, "seconds": 2.0, "detail": {}},
                {"name": "blocks.3 @ 64 px", "score": None, "seconds": 0.0, "detail": {}},
            ],
            "reason": "the plain top-layer probe stays unless another beats it by 1.0%",
            "metric": "5-fold CV accuracy on 40 training images",
            "seconds": 3.5,
        },
        {
            "what": "learning_rate",
            "chosen": "0.38x",
            "candidates": [
                {"name": "range test", "score": None, "seconds": 2.0, "detail": {"blew_up_at": 0.000759}},
                {"name": "0.38x", "score": 0.99, "seconds": 90.0, "detail": {}},
            ],
            "reason": "capped at a tenth of where the loss blew up",
            "metric": "best accuracy on 400 held-out training images",
            "seconds": 2.0,
        },
    ]
    zip_path = write_bundle(
        tmp_path / "out",
        model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval(),
        classes=["a|b", "<c>"],
        preprocessing=Preprocessing(input_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3),
        metrics={"val_accuracy": 1.0},
        card={"strategy": {"name": "linear"}, "decisions": decisions},
    )
    text = (unpack_bundle(zip_path, tmp_path / "unpacked") / "model_card.md").read_text()
    escaped = r"\<script\>alert(1)\</script\> \| \*bold\* \[x\](y)"
    assert "## Why this model" in text
    assert f"- **representation: {escaped}** — the plain top-layer probe stays" in text
    assert "5-fold CV accuracy on 40 training images" in text
    assert f"{escaped} 93.8% (kept)" in text and "top @ 224 px 91.0%;" in text
    assert "blocks.3 @ 64 px not measured" in text
    assert "range test blew up at 0.000759; 0.38x 99.0% (kept)" in text  # what it measured instead of a score
    assert "<script>" not in text and "<c>" not in text and "a|b" not in text
    assert json.loads((tmp_path / "unpacked" / "graft.json").read_text())["decisions"] == decisions


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_onnx_export_agrees_with_pytorch(tmp_path):
    model = tiny_model(0)
    prep = Preprocessing(input_size=24, resize_size=28, mean=(0.5,) * 3, std=(0.25,) * 3)
    info = export_onnx(model, prep, tmp_path / "model.onnx")
    assert info["max_abs_diff"] < 1e-4
    assert info["input"] == "image" and info["output"] == "logits"
    # Any batch size, at the bundle's input size.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 24, 24)
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)


def test_onnx_parity_check_rejects_a_different_model(tmp_path):
    prep = Preprocessing(input_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3)
    export_onnx(tiny_model(0), prep, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="disagrees"):
        check_onnx_parity(tiny_model(1), tmp_path / "model.onnx", prep.input_size)


def test_flip_tta_model_exports_and_averages_the_mirror(tmp_path):
    from ml.finetune import with_flip_average

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential(body, nn.Linear(4, 3)).eval()
    tta = with_flip_average(model).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2  # the head is linear: averaged features = averaged logits
        torch.testing.assert_close(tta(x), expected)
    prep = Preprocessing(input_size=24, resize_size=28, mean=(0.5,) * 3, std=(0.25,) * 3)
    info = export_onnx(tta, prep, tmp_path / "model.onnx")
    assert info["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    export_torchscript(tta, prep, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(tmp_path / "model.pt")(x), expected, atol=1e-5, rtol=1e-5)


class _BatchAsInt(nn.Module):
    """Reads its batch size as a Python int: a trace bakes in the batch it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 14 * 14, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        return self.head(self.conv(x).reshape(n, -1))


def test_torchscript_is_traced_and_a_trace_that_baked_in_its_batch_is_scripted_instead(tmp_path):
    prep = Preprocessing(input_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.randn(3, 3, 16, 16)
    for model in (tiny_model(0), _BatchAsInt().eval()):
        export_torchscript(model, prep, tmp_path / "model.pt")
        loaded = torch.jit.load(tmp_path / "model.pt")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    # The trace's batch of one (`reshape(.., [1, -1])`) failed the check: the batch is read, as scripted.
    assert "torch.size(x)" in loaded.code and "[1, -1]" not in loaded.code
