from __future__ import annotations

import json

import torch
from torch import nn

from ml.backbones import Preprocessing
from ml.bundle import unpack_bundle, write_bundle
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
        "labels.json",
        "preprocessing.json",
        "metrics.json",
        "model_card.md",
        "graft.json",
    }
    assert json.loads((folder / "graft.json").read_text())["classes"] == ["a", "b", "c"]
    predictor = Predictor(folder)
    img = predictor.decode(image_bytes(size=(48, 40), seed=3))
    (preds,) = predictor.predict([img], k=3)
    with torch.no_grad():
        expected = model(predictor._transform(img)[None]).softmax(1)[0]
    assert [p.label for p in preds] == [["a", "b", "c"][i] for i in expected.argsort(descending=True)]
    assert abs(preds[0].score - expected.max().item()) < 1e-5
