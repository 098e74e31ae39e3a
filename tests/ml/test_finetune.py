"""The fine-tuning recipe on a tiny CPU model: LR rule, frozen BN, early stopping, sanity checks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ml.backbones import Backbone, BackboneSpec, Preprocessing, get_spec
from ml.finetune import (
    Batches,
    EarlyStopping,
    FinetuneConfig,
    Hooks,
    RangeSpan,
    SanityReport,
    Start,
    backbone_lr,
    check_initial_loss,
    check_loss_decreases,
    finetune,
    lr_range_test,
    make_scheduler,
    param_groups,
    trainable_stage,
)


def _stage(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyBody(nn.Module):
    """Laid out like timm's EfficientNet (stem, `blocks` of stages), so stage logic applies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(_stage(8, 8), _stage(8, 16, 2), _stage(16, 16), _stage(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.bn1(self.conv_stem(x)))).flatten(1)


def tiny_backbone(lr: float = 0.1) -> Backbone:
    torch.manual_seed(0)
    body = TinyBody()
    for m in body.modules():  # "pretrained" statistics that must survive fine-tuning
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = BackboneSpec(
        name="tiny",
        source="package",
        arch="tiny",
        weights_tag="none",
        preprocessing=Preprocessing(16, 16, (0.5,) * 3, (0.5,) * 3),
        train_lr=lr,
        train_batch_size=256,
        train_optimizer="sgd",
    )
    return Backbone(body, nn.Linear(16, 1000), spec).eval()


def toy_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = np.arange(n) % 2
    x = torch.randn(n, 3, 16, 16, generator=g)
    x[y == 1, 0] += 1.5  # class 1 is redder
    return x, y


def batches(x: torch.Tensor, y: np.ndarray, size: int = 16) -> Batches:
    return Batches(lambda i: x[i], y, size)


def test_lr_rule_is_a_tenth_of_the_original_scaled_with_batch():
    lite = get_spec("efficientnet_lite1")  # RMSProp at 0.016 per 256 images
    assert backbone_lr(lite, 256) == pytest.approx(0.0016)
    assert backbone_lr(lite, 32) == pytest.approx(0.0002)
    assert backbone_lr(get_spec("resnet18"), 64) == pytest.approx(0.1 / 10 * 64 / 256)


def test_depth_picks_the_top_stages_or_all():
    bb = tiny_backbone()
    assert trainable_stage(bb, "partial") == "blocks.3"
    assert trainable_stage(bb, "full") == "stem"  # "up to all": the stem trains too
    assert trainable_stage(tiny_backbone(), "partial") in bb.stages


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model.parameters(), 0.1, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


def test_warmup_then_cosine_decay():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, 4, 20)
    lrs = []
    for step in range(21):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert [round(v, 2) for v in lrs[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lrs[12] == pytest.approx(0.5)
    assert lrs[20] == pytest.approx(0.0, abs=1e-9)


def test_finetune_keeps_batchnorm_frozen_and_trains_only_the_top():
    bb = tiny_backbone()
    x, y = toy_data()
    bn_before = {k: v.clone() for k, v in bb.body.state_dict().items() if "running" in k}
    stem_before = bb.body.conv_stem.weight.clone()
    top_before = bb.body.blocks[3][0].weight.clone()
    head = nn.Linear(16, 2)
    result = finetune(
        Start(bb, head),
        batches(x, y),
        batches(x, y),
        FinetuneConfig(depth="partial", max_epochs=2, patience=5),
        device=torch.device("cpu"),
    )
    for k, v in bb.body.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bn_before[k]), f"{k} changed: BatchNorm statistics must stay frozen"
    assert torch.equal(bb.body.conv_stem.weight, stem_before)
    # The restored best epoch is epoch 0 or later; when later, the top stage moved.
    if result.best_epoch > 0:
        assert not torch.equal(bb.body.blocks[3][0].weight, top_before)
    assert [r.epoch for r in result.history][:1] == [0]
    assert result.hyperparameters.trainable_from == "blocks.3"
    assert result.hyperparameters.batchnorm.startswith("eval mode")


def test_early_stopping_restores_the_best_snapshot():
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stopper.update(1, 0.9, model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stopper.update(2, 0.7, model)
    assert stopper.update(3, 0.8, model)  # second epoch without improvement: stop
    stopper.restore(model)
    assert torch.all(model.weight == 1.0) and stopper.best_epoch == 1


def test_finetune_that_never_beats_the_probe_returns_the_probe():
    bb = tiny_backbone(lr=0.0)  # nothing can improve: every epoch ties epoch 0
    x, y = toy_data()
    head = nn.Linear(16, 2)
    head_before = head.weight.clone()
    result = finetune(
        Start(bb, head),
        batches(x, y),
        batches(x, y),
        FinetuneConfig(depth="full", max_epochs=3, patience=2, head_lr_multiplier=0.0),
        device=torch.device("cpu"),
    )
    assert result.best_epoch == 0
    assert torch.equal(result.model[1].weight, head_before)
    assert result.stopped.startswith("early stopping")


def test_sanity_checks_fire_on_a_broken_setup():
    report = SanityReport()
    check_initial_loss(report, math.log(10), 10, 0.25)
    check_initial_loss(report, 40.0, 10, 0.25)  # e.g. unnormalised inputs: huge initial logits
    check_loss_decreases(report, [0.7, 0.9, 1.3])
    assert [c.ok for c in report.checks] == [True, False, False]
    assert not report.ok
    # A lighter first epoch is left out of the comparison; the epochs after it still must go down.
    for losses, ok in (([0.10, 0.12], True), ([0.10, 0.12, 0.11], True), ([0.10, 0.12, 0.13, 0.125], False)):
        report = SanityReport()
        check_loss_decreases(report, losses, same_from=2)
        assert report.ok is ok, losses

    # A learning rate that blows up: the non-finite loss is caught, training stops, the probe survives.
    bb = tiny_backbone(lr=1e12)
    x, y = toy_data()
    x[:4] *= 1e6
    result = finetune(
        Start(bb, nn.Linear(16, 2)),
        batches(x, y),
        batches(x, y),
        FinetuneConfig(depth="full", max_epochs=3),
        device=torch.device("cpu"),
    )
    finite = next(c for c in result.sanity if c.check == "finite_loss")
    assert not finite.ok and "loss became" in finite.detail
    assert result.stopped == "non-finite loss" and result.best_epoch == 0
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_lr_range_test_uses_the_finetune_setup_and_leaves_the_model_alone():
    bb = tiny_backbone()
    x, y = toy_data()
    head = nn.Linear(16, 2)
    before = {k: v.clone() for k, v in nn.Sequential(bb.body, head).state_dict().items()}
    config = FinetuneConfig(depth="partial", batch_size=16)
    out = lr_range_test(Start(bb, head), batches(x, y), config, torch.device("cpu"), RangeSpan(steps=12))
    lrs = [p.lr for p in out.curve]
    assert len(lrs) >= 3 and lrs == sorted(lrs)
    assert lrs[0] <= out.suggested_lr <= lrs[-1]
    assert out.recipe_lr == pytest.approx(backbone_lr(bb.spec, 16))
    assert lrs[0] < out.recipe_lr < lrs[-1] or len(lrs) < 12  # the sweep brackets the rule
    assert all(torch.equal(v, before[k]) for k, v in nn.Sequential(bb.body, head).state_dict().items())
    assert all(math.isfinite(p.loss) for p in out.curve)


def test_overfit_check_passes_on_a_working_setup_and_fails_on_a_frozen_one():
    from ml.finetune import _prepare, check_overfits_a_batch

    bb = tiny_backbone(lr=1.0)
    x, y = toy_data(8)
    model, _, trainable, _ = _prepare(Start(bb, nn.Linear(16, 2)), FinetuneConfig(depth="full"), torch.device("cpu"))
    working, broken = SanityReport(), SanityReport()
    yt = torch.as_tensor(y)
    check_overfits_a_batch(working, model, trainable, (x, yt), ("sgd", 0.5), 40)
    check_overfits_a_batch(broken, model, trainable, (x, yt), ("sgd", 0.0), 40)  # a dead learning rate
    assert [c.check for c in working.checks] == ["initial_loss", "overfits_one_batch"]
    assert working.ok, working.checks
    assert [c.ok for c in broken.checks] == [True, False]  # starts at ln 2, never learns


def test_head_runs_in_fp32_under_autocast():
    from ml.finetune import _forward

    body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.fill_(1e4)  # a probe head with the scaler folded in: large weights
    logits = _forward(nn.Sequential(body, head), torch.randn(2, 3, 8, 8), torch.bfloat16)
    assert logits.dtype == torch.float32


def test_training_reads_the_device_once_per_epoch_not_per_step(monkeypatch):
    """Host syncs (`.item()`, `float(tensor)`) per epoch must not grow with the number of steps."""
    counts = []
    for batch_size in (4, 16):  # 16 vs 4 steps per epoch
        calls = [0]
        real_item, real_float = torch.Tensor.item, torch.Tensor.__float__

        def item(self, real=real_item, calls=calls):
            calls[0] += 1
            return real(self)

        def to_float(self, real=real_float, calls=calls):
            calls[0] += 1
            return real(self)

        monkeypatch.setattr(torch.Tensor, "item", item)
        monkeypatch.setattr(torch.Tensor, "__float__", to_float)
        x, y = toy_data()
        finetune(
            Start(tiny_backbone(), nn.Linear(16, 2)),
            batches(x, y, batch_size),
            batches(x, y),
            FinetuneConfig(
                depth="full", max_epochs=2, patience=5, pilot_epochs=5, batch_size=batch_size, overfit_steps=0
            ),
            device=torch.device("cpu"),
        )
        monkeypatch.undo()
        counts.append(calls[0])
    assert counts[0] == counts[1]


def test_uint8_batches_are_normalised_where_the_model_runs_as_the_float_transform_would():
    from PIL import Image

    from ml.preprocess import eval_transform

    prep = Preprocessing(16, 20, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)) for _ in range(5)]
    small, full = eval_transform(prep, uint8=True), eval_transform(prep)
    shipped = Batches(lambda i: small(images[i]), np.zeros(5, dtype=int), 4, (prep.mean, prep.std))
    reference = Batches(lambda i: full(images[i]), np.zeros(5, dtype=int), 4)

    assert small(images[0]).dtype == torch.uint8
    got = [x for x, _ in shipped(range(5), torch.device("cpu"))]
    want = [x for x, _ in reference(range(5), torch.device("cpu"))]
    assert [x.dtype for x in got] == [torch.float32, torch.float32]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_lr_range_test_reports_where_the_loss_blows_up():
    x, y = toy_data()
    config = FinetuneConfig(depth="full", batch_size=16)
    cpu = torch.device("cpu")
    # SGD at 0.1 x up to 1e4: the loss blows up, and where is reported, above the rule
    wild = lr_range_test(
        Start(tiny_backbone(), nn.Linear(16, 2)), batches(x, y), config, cpu, RangeSpan(factor_max=1e4, steps=30)
    )
    assert wild.diverged_lr is not None and wild.diverged_lr > wild.recipe_lr
    assert wild.diverged_lr == wild.curve[-1].lr and len(wild.curve) < 30
    # up to the rule itself it does not
    calm = lr_range_test(
        Start(tiny_backbone(), nn.Linear(16, 2)), batches(x, y), config, cpu, RangeSpan(factor_max=1.0, steps=8)
    )
    assert calm.diverged_lr is None and len(calm.curve) == 8 and calm.seconds >= 0


def test_rmsprop_second_moment_starts_from_the_first_gradients_not_from_one():
    from ml.finetune import make_optimizer, seed_second_moment

    for kind, seeded in (("rmsprop", True), ("sgd", False)):
        layer = nn.Linear(4, 2)
        opt = make_optimizer(kind, param_groups(layer.parameters(), 0.0, 0.0))
        layer(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()  # at LR 0: TF's RMSProp starts its mean of squared gradients at 1 here
        seed_second_moment(opt)
        state = opt.state[layer.weight]
        assert ("square_avg" in state) is seeded
        if seeded:
            torch.testing.assert_close(state["square_avg"], layer.weight.grad.square())


@pytest.mark.parametrize(
    "smoothed,best,k,blown",
    [
        (0.08, 0.02, 2, False),  # a near-perfect probe's noise: 4x, but nowhere near chance
        (0.30, 0.02, 2, True),
        (1.00, 0.30, 4, False),  # a quarter of the way to chance, but not 4x
        (1.30, 0.30, 4, True),
    ],
)
def test_range_test_blow_up_needs_4x_and_a_quarter_of_the_way_to_chance(smoothed, best, k, blown):
    from ml.finetune import loss_blew_up

    assert loss_blew_up(smoothed, best, k) is blown


def test_a_finetune_resumed_from_its_checkpoint_goes_on_as_if_never_stopped(tmp_path):
    """Stopped after epoch 2 and resumed from the checkpoint, the epochs after it match an unbroken run."""
    from ml.checkpoint import FileCheckpoints

    x, y = toy_data()
    cfg = FinetuneConfig(depth="full", max_epochs=4, patience=4, pilot_epochs=4, warmup_epochs=0.5)

    def run(**kw):
        return finetune(
            Start(tiny_backbone(), nn.Linear(16, 2)),
            batches(x, y),
            batches(x, y),
            cfg,
            device=torch.device("cpu"),
            **kw,
        )

    unbroken = run()
    store = FileCheckpoints(tmp_path / "ckpt.pt")
    seen: list[int] = []

    class Killed(Exception):
        pass

    def save_then_die_after_epoch_2(state: dict) -> None:
        store.save(state)
        if state["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run(hooks=Hooks(checkpoint=save_then_die_after_epoch_2))
    resumed = run(resume=store.load(), hooks=Hooks(on_epoch=lambda row: seen.append(row.epoch)))

    assert seen == [3, 4]  # epochs 1 and 2 were not trained again
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3, 4]
    for a, b in zip(unbroken.history[1:], resumed.history[1:], strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5, abs=1e-7)
        assert a.heldout_loss == pytest.approx(b.heldout_loss, rel=1e-5)
    for p, q in zip(unbroken.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
