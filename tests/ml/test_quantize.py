"""The int8 step (ml.quantize): its rule keeps or refuses the int8 model, the bundle and its card say
which, and the server and the bundle's predict.py run the model it kept.

A tiny network and tiny images keep these fast; the real models' figures are bench_engine's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ml import predict, quantize, standalone_predict
from ml.bundle import write_bundle
from ml.bundle_format import INT8_FILE, read_bundle
from ml.dataset import index_dataset
from ml.errors import DatasetError
from ml.predict import Predictor, arithmetic_of, int8_arithmetic, int8_served
from ml.preprocessing import Preprocessing
from tests.conftest import image_bytes, make_zip

PREP = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Red and blue squares, 30 of each, each with its own noise."""
    members = {}
    for i in range(30):
        members[f"red/r{i}.png"] = image_bytes(color=(200, 40, 40), seed=2 * i)
        members[f"blue/b{i}.png"] = image_bytes(color=(40, 40, 200), seed=2 * i + 1)
    return make_zip(tmp_path_factory.mktemp("data") / "colours.zip", members)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle whose network tells red from blue by its mean colour."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(0.5)
        for c in range(8):
            net[0].weight[c, c % 3, 1, 1] = 1.0
        blue_minus_red = [-1.0, 0.0, 1.0] * 2 + [-1.0, 0.0]  # channel c reads colour c % 3
        net[4].weight.copy_(torch.tensor([blue_minus_red, [-w for w in blue_minus_red]]))
        net[4].bias.zero_()
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(out, model=net, classes=["blue", "red"], preprocessing=PREP, metrics={}, card={})
    return out / "bundle"


@pytest.fixture(autouse=True)
def int8_is_faster(monkeypatch):
    """The tiny network's int8 model is no faster than its fp32 one (its quantize and dequantize nodes cost
    more than its one convolution saves), and a model no faster is refused: here the step times the two as
    a real model's would time, int8 the faster."""
    monkeypatch.setattr(quantize, "time_forwards", lambda forwards, *a, **k: {"fp32": 0.004, "int8": 0.003})


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "bundle")


def test_a_model_that_holds_is_kept_in_the_bundle_and_served(bundle, dataset, tmp_path):
    folder = _copy(bundle, tmp_path)
    ticks = []
    check = quantize.quantize_bundle(
        folder, dataset, index_dataset(dataset), val_fraction=0.2, seed=0, progress=lambda *t: ticks.append(t)
    )
    assert check.kept and check.file == INT8_FILE and (folder / INT8_FILE).is_file(), check.reason
    # 48 training images: half calibrate (at most 64), the rest are the check; 12 validation images
    assert (check.calibration_images, check.check_images, check.val_images) == (24, 24, 12)
    assert check.agreement >= quantize.MIN_AGREEMENT and check.accuracy_fp32 == 1.0
    assert check.val_accuracy_int8 is not None and check.batch_1_ms_int8 > 0 and check.seconds > 0
    assert check.fp32_convolutions == 0 and "; the head in fp32" in check.method  # the whole network holds in int8
    assert check.designs_tried == 1 and check.refit_agreement == 1.0 and check.refit_accuracy_int8 is not None
    assert check.held
    assert {t[0] for t in ticks} >= {"decode", "design", "check"}
    card = read_bundle(folder).card
    assert card["int8"] == check.to_json() and check.arithmetic == int8_arithmetic()
    assert (
        "## Int8 model" in (folder / "model_card.md").read_text()
        and check.reason in (folder / "model_card.md").read_text()
    )

    # The server runs the int8 model (ONNX Runtime, no TorchScript to time), or fp32 when told to.
    served = Predictor(folder)
    assert (served.precision, served.runtime) == ("int8", "onnxruntime")
    assert Predictor(folder, precision="fp32").precision == "fp32"
    assert Predictor(folder, runtime="torchscript").precision == "fp32"  # TorchScript has no int8 model
    red = image_bytes(color=(200, 40, 40), seed=99)
    assert served.predict_bytes([red])[0][0].label == "red"

    # The bundle's predict.py runs it too, and the fp32 model when asked.
    (tmp_path / "red.png").write_bytes(red)
    for precision in ("auto", "fp32", "int8"):
        proc = subprocess.run(
            [sys.executable, str(folder / "predict.py"), str(tmp_path / "red.png"), "--precision", precision],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["predictions"][0]["label"] == "red"


AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 ssse3 sse4_1 avx fma avx2 bmi2\n\n"


def test_the_designs_are_made_in_turn_and_the_first_that_holds_on_its_calibration_views_is_checked(
    bundle, dataset, tmp_path, monkeypatch
):
    """Each design must first hold on the calibration images, shifted and with noise (images the rule
    never reads); the rule then tests the model that was made."""
    shares: list[float] = []
    make, holds = quantize.Int8Maker.make, quantize._holds
    monkeypatch.setattr(quantize.Int8Maker, "make", lambda me, t, share=0.0: shares.append(share) or make(me, t, share))
    monkeypatch.setattr(quantize, "FP32_SHARES", (0.0, 1.0))  # the tiny network has one convolution
    judged: list[quantize.Tally] = []  # the first verdict (the whole network's calibration views) is "no"
    monkeypatch.setattr(quantize, "_holds", lambda t: bool(judged.append(t) or len(judged) > 1) and holds(t))
    check = quantize.quantize_bundle(_copy(bundle, tmp_path), dataset, index_dataset(dataset), val_fraction=0.2)
    assert shares == [0.0, 1.0] and check.designs_tried == 2
    assert judged[0].n == judged[1].n == 3 * check.calibration_images  # each image, shifted, and with noise
    assert check.calibration_agreement == 1.0 and check.kept, check.reason  # fp32 with an fp32 head is itself
    assert check.fp32_convolutions == 1 and "the first 1 of its 1 convolutions and the head in fp32" in check.method
    assert "(with the first 1 of its 1 convolutions and the head in fp32)" in check.reason

    # Where no design holds on its calibration views, it is refused whatever the check images say.
    monkeypatch.setattr(quantize, "_holds", lambda t: False)
    check = quantize.quantize_bundle(
        _copy(bundle, tmp_path / "again"), dataset, index_dataset(dataset), val_fraction=0.2
    )
    assert not check.kept and check.designs_tried == 2 and check.file is None
    assert "Refused: with the first 1 of its 1 convolutions and the head in fp32" in check.reason
    assert "over its calibration images" in check.reason


def test_heads_refitted_fold_by_fold_answer_images_they_never_saw():
    """The check images' own head knows them; a head refitted on the other folds does not, so an image
    near a boundary stays near it, and int8's rounding can move it across."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    fp32 = (rng.standard_normal((100, 4)) + 1.5 * (2 * y[:, None] - 1)).astype(np.float32)
    same = quantize.refit_tally(fp32, fp32.copy(), y, seed=0)
    assert (same.n, same.same) == (100, 100) and same.right_fp32 == same.right_int8 > 90
    noisy = quantize.refit_tally(fp32, fp32 + rng.standard_normal(fp32.shape).astype(np.float32), y, seed=0)
    assert noisy.n == 100 and 70 < noisy.same < 100  # moved answers, counted image by image
    # Its folds are stratified: a class with a single image cannot be held out and fitted at once.
    assert quantize.refit_tally(fp32[:51], fp32[:51], y[:51], seed=0) == quantize.Tally()


def test_the_cpu_s_int8_arithmetic_is_read_from_its_flags():
    assert arithmetic_of("x86_64", AVX2) == "saturating"  # VPMADDUBSW: pairs of products clip at 32,767
    assert arithmetic_of("x86_64", AVX2.replace("avx2", "avx2 avx512f avx512bw")) == "saturating"
    assert arithmetic_of("x86_64", AVX2.replace("avx2", "avx2 avx512f avx512_vnni")) == "exact"
    assert arithmetic_of("x86_64", AVX2.replace("avx2", "avx2 avx_vnni")) == "exact"
    assert arithmetic_of("x86_64", AVX2.replace("avx2", "avx2 amx_int8")) == "exact"
    assert arithmetic_of("aarch64", "") == arithmetic_of("arm64", "") == "exact"
    assert arithmetic_of("x86_64", "") == "saturating"  # flags it cannot read
    # Where it is served: a CPU that multiplies exactly serves every kept model; a saturating one
    # only models checked on a saturating CPU (a check from before the field ran on a VNNI CPU).
    kept = {"kept": True}
    assert int8_served({**kept, "arithmetic": "exact"}, "exact") and int8_served(
        {**kept, "arithmetic": "saturating"}, "exact"
    )
    assert int8_served({**kept, "arithmetic": "saturating"}, "saturating")
    assert not int8_served({**kept, "arithmetic": "exact"}, "saturating") and not int8_served(kept, "saturating")
    assert int8_served(kept, "exact")
    assert not int8_served({"kept": False, "arithmetic": "exact"}, "exact") and not int8_served(None, "exact")


@pytest.mark.parametrize("host", ["exact", "saturating"])
def test_a_kept_model_serves_int8_only_where_the_cpu_multiplies_as_its_check_did(
    bundle, dataset, tmp_path, monkeypatch, host
):
    folder = _copy(bundle, tmp_path)
    check = quantize.quantize_bundle(folder, dataset, index_dataset(dataset), val_fraction=0.2, seed=0)
    assert check.kept, check.reason
    card = json.loads((folder / "graft.json").read_text())
    card["int8"]["arithmetic"] = "exact"  # checked on a VNNI CPU, say
    (folder / "graft.json").write_text(json.dumps(card))
    monkeypatch.setattr(predict, "int8_arithmetic", lambda: host)
    monkeypatch.setattr(standalone_predict, "_int8_arithmetic", lambda: host)
    expected = "int8" if host == "exact" else "fp32"
    assert Predictor(folder).precision == expected
    assert standalone_predict.Model(folder).file.name == ("model.int8.onnx" if host == "exact" else "model.onnx")
    # Asked for by name, it runs anywhere (to measure it, say).
    assert Predictor(folder, precision="int8").precision == "int8"
    assert standalone_predict.Model(folder, precision="int8").file.name == "model.int8.onnx"
    # Checked on a saturating CPU, it serves on both kinds.
    card["int8"]["arithmetic"] = "saturating"
    (folder / "graft.json").write_text(json.dumps(card))
    assert Predictor(folder).precision == "int8"
    assert standalone_predict.Model(folder).file.name == "model.int8.onnx"


def test_a_model_that_does_not_hold_is_refused_and_left_out(bundle, dataset, tmp_path, monkeypatch):
    folder = _copy(bundle, tmp_path)
    (folder / INT8_FILE).write_bytes(b"an int8 model an earlier run kept")
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # more than any model can agree
    check = quantize.quantize_bundle(folder, dataset, index_dataset(dataset), val_fraction=0.2)
    assert not check.kept and check.file is None and check.reason.startswith("Refused") and check.held is False
    assert "must agree on 101%" in check.reason
    assert not (folder / INT8_FILE).exists()  # the earlier one goes too: the card speaks of this run
    assert read_bundle(folder).card["int8"]["kept"] is False
    text = (folder / "model_card.md").read_text()
    assert text.count("## Int8 model") == 1 and "the fp32 model is served" in text
    assert Predictor(folder).precision == "fp32"
    with pytest.raises(FileNotFoundError, match="no int8 model"):
        Predictor(folder, precision="int8")


def _timed(monkeypatch, seconds: dict[int, tuple[float, float]]) -> list[int]:
    """The step's timings, fp32's and int8's by batch size; returns the batch sizes it timed."""
    batches: list[int] = []

    def time_forwards(forwards, size, *, batch=1, **_):
        batches.append(batch)
        return dict(zip(("fp32", "int8"), seconds[batch], strict=True))

    monkeypatch.setattr(quantize, "time_forwards", time_forwards)
    return batches


def test_a_model_that_holds_but_is_no_faster_is_refused(bundle, dataset, tmp_path, monkeypatch):
    """More of the network in fp32 would only be slower: no other design is tried."""
    batches = _timed(monkeypatch, {1: (0.004, 0.004), 8: (0.02, 0.021)})
    folder = _copy(bundle, tmp_path)
    check = quantize.quantize_bundle(folder, dataset, index_dataset(dataset), val_fraction=0.2)
    assert set(batches) == {1, 8}  # a lone request's pass, and the server's batch under load
    assert not check.kept and check.file is None and not (folder / INT8_FILE).exists()
    assert check.reason.startswith(
        "Refused: it would serve no faster than fp32 here (4.00 against 4.00 ms a pass at batch 1; "
        "21.00 against 20.00 ms a pass at batch 8)"
    )
    assert "though it held: top-1 agreement 100.0%" in check.reason and check.designs_tried == 1 and check.held
    assert (check.batch_1_ms_fp32, check.batch_1_ms_int8, check.batch_ms_fp32, check.batch_ms_int8) == (4, 4, 20, 21)


def test_a_model_faster_only_at_the_servers_batch_is_kept(bundle, dataset, tmp_path, monkeypatch):
    """Under load the server runs batches: int8 as fast as fp32 alone and faster there serves faster."""
    _timed(monkeypatch, {1: (0.00078, 0.00079), 8: (0.004, 0.0021)})
    folder = _copy(bundle, tmp_path)
    check = quantize.quantize_bundle(folder, dataset, index_dataset(dataset), val_fraction=0.2)
    assert check.kept and (folder / INT8_FILE).exists() and check.batch == 8
    card = (folder / "model_card.md").read_text()
    assert "Forward pass at batch 1: 0.79 ms (fp32: 0.78 ms); at batch 8: 2.1 ms (fp32: 4.0 ms)" in card


def test_int8_serves_faster_where_it_is_clearly_faster_at_one_batch_size_and_not_much_slower_at_the_other():
    assert quantize.serves_faster(10, 7, 60, 40)
    assert quantize.serves_faster(0.78, 0.79, 4.0, 2.1)  # 1.3% slower alone, 1.9x faster batched
    assert quantize.serves_faster(10, 9, 60, 62)
    assert not quantize.serves_faster(10, 10, 60, 60)  # no faster at either
    assert not quantize.serves_faster(10, 9.8, 60, 59)  # 1-2% faster: within the timing's noise
    assert not quantize.serves_faster(10, 11, 60, 30)  # 10% slower for a lone request
    assert not quantize.serves_faster(10, 7, 60, 66)


def test_the_rule_allows_a_point_or_one_image():
    def rule(n: int, same: int, lost: int, moved_same: float = 1.0) -> bool:
        check = quantize.Tally(n, same, n, n - lost)
        moved = quantize.Tally(2 * n, round(2 * n * moved_same), 2 * n, 2 * n)
        return quantize._rule(check, moved, quantize.Tally())[0]

    assert rule(100, 99, 1)
    assert not rule(200, 197, 3)  # 1.5 points, 3 images
    assert rule(50, 49, 1)  # one image of 50 is two points
    # One image of n is allowed whatever n (rounding the shares to 4 places used to refuse n = 60, 99 ...;
    # from 17 images on, one disagreement in 3n views is within 98%)
    assert all(rule(n, n - 1, 1) for n in range(17, 101))
    assert not any(rule(n, n - 2, 2) for n in range(34, 101))  # two images, more than a point below 200
    # Agreement counts every view together: the images, shifted and with noise.
    assert not rule(400, 400, 0, moved_same=0.96)
    assert rule(400, 400, 0, moved_same=0.975)  # (400 + 780) / 1200 = 98.3%
    # Where heads could be refitted, their answers must hold the same way.
    images, views = quantize.Tally(100, 100, 100, 100), quantize.Tally(200, 200, 200, 200)
    assert quantize._rule(images, views, quantize.Tally(100, 98, 95, 95))[0]
    assert not quantize._rule(images, views, quantize.Tally(100, 97, 95, 95))[0]  # agreement 97%
    assert not quantize._rule(images, views, quantize.Tally(200, 198, 190, 187))[0]  # 3 images, 1.5 points lost
    assert (
        "heads refitted on the other images: agreement 97.0%"
        in quantize._rule(images, views, quantize.Tally(100, 97, 95, 95))[1]
    )
    assert np.isclose(quantize.MAX_ACCURACY_DROP, 0.01)


def test_data_the_model_was_not_trained_on_is_refused_with_a_reason(bundle, dataset, tmp_path):
    """The check images must be images the model trained on: other data (a version deleted since, the
    wrong zip on the command line) would test it on images it never saw, or on its validation split."""
    folder = _copy(bundle, tmp_path)
    card_path = folder / "graft.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "data_hash": "0" * 64}))
    with pytest.raises(DatasetError, match="not the data the model was trained on"):
        quantize.quantize_bundle(folder, dataset, index_dataset(dataset), val_fraction=0.2)
    assert not (folder / INT8_FILE).exists() and "int8" not in json.loads(card_path.read_text())


def test_the_split_is_the_fit_s_own_by_default(bundle, dataset, tmp_path, monkeypatch):
    """With no seed given, the card's seed splits the data, as the fit did."""
    index = index_dataset(dataset)
    folder = _copy(bundle, tmp_path)
    card_path = folder / "graft.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "seed": 7, "data_hash": index.content_hash}))
    info = read_bundle(folder)
    members = {seed: [s.member for s in quantize._read(dataset, index, info, 0.2, seed, print).val] for seed in (0, 7)}
    assert members[0] != members[7]  # the seed decides which images are validation images here
    read, seeds = quantize._read, []
    monkeypatch.setattr(quantize, "_read", lambda *a: seeds.append(a[4]) or read(*a))
    assert quantize.quantize_bundle(folder, dataset, index, val_fraction=0.2).kept
    assert seeds == [7]


def test_the_head_stays_fp32_and_its_bias_takes_up_the_backbone_s_mean_error(tmp_path):
    """The int8 backbone's rounding moves its features on average; the head, left in fp32, has its bias
    shifted so that over the calibration images the int8 model's mean logits are fp32's."""
    import onnx

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU6(), nn.Conv2d(16, 16, 3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():  # one channel 100x the others': per-tensor activation steps swamp the rest
        net[2].weight[0] *= 100
    write_bundle(tmp_path, model=net, classes=["a", "b", "c"], preprocessing=PREP, metrics={}, card={})
    source, target = tmp_path / "bundle" / "model.onnx", tmp_path / "int8.onnx"
    x = np.random.default_rng(0).standard_normal((32, 3, 32, 32), dtype=np.float32)
    done = quantize.quantize(source, target, x)

    model = onnx.load(str(target))
    head = quantize._head(model)
    weights = {t.name: t for t in model.graph.initializer}
    assert head.op_type == "Gemm" and weights[head.input[1]].data_type == onnx.TensorProto.FLOAT  # not quantized
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)  # the convolutions are
    fp32, int8 = predict.onnx_forward(source), predict.onnx_forward(target)
    np.testing.assert_allclose(int8(x).mean(0), fp32(x).mean(0), atol=1e-5, rtol=1e-5)
    # Only the bias moved, by what the step reports (the uncorrected model missed fp32's mean by that).
    shift = onnx.numpy_helper.to_array(weights[head.input[2]]) - net[6].bias.detach().numpy()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weights[head.input[1]]), net[6].weight.detach().numpy())
    assert done["head_bias_shift"] == round(float(np.abs(shift).max()), 4) and np.abs(shift).max() > 1e-3
    assert (done["fp32_convolutions"], done["convolutions"]) == (0, 2)

    # With a share of the convolutions in fp32, the first ones are left as they were; the rest are int8.
    done = quantize.quantize(source, target, x, fp32_share=0.5)
    model = onnx.load(str(target))
    weights = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert (done["fp32_convolutions"], done["convolutions"]) == (1, 2)
    assert [c.input[1] in weights and weights[c.input[1]].data_type == onnx.TensorProto.FLOAT for c in convs] == [
        True,
        False,  # its weights come through a DequantizeLinear
    ]
