"""`python -m ml`: the pipeline without the web app.

python -m ml fit DATASET.zip --out DIR [--strategy auto|linear|stages|partial|full] [--backbone NAME]
                 [--budget SECONDS] [--max-epochs N] [--seed N] [--resolution auto|native] [--search N]
                 [--no-hflip] [--lr-find] [--checkpoint FILE] [--cache FILE.npz] [--json]
                 (the fit options, their bounds and defaults: ml/config.py)
python -m ml predict DIR_OR_BUNDLE_ZIP IMAGE... [-k 5] [--precision auto|fp32|int8]
python -m ml quantize BUNDLE_DIR DATASET.zip [--seed N] [--json]   (the int8 model: ml/quantize.py)
python -m ml inspect DATASET.zip [--backbone NAME] [--cache FILE.npz] [--json]
python -m ml backbones
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Never

from ml.config import FitConfig, Option, options_for
from ml.errors import MLError

if TYPE_CHECKING:
    from ml.features import EmbeddingCache


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except MLError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    from ml.backbones import DEFAULT_BACKBONE

    p = argparse.ArgumentParser(prog="python -m ml", description="Graft transfer-learning engine")
    sub = p.add_subparsers(required=True)
    f = sub.add_parser("fit", help="train a classifier from a dataset zip")
    f.add_argument("dataset", type=Path)
    f.add_argument("--out", type=Path, required=True)
    for option in options_for("user", "cli"):
        _add_option(f, option)
    f.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep the fine-tune's state here after each epoch; a fit cut short and run again goes on from it",
    )
    f.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="frozen features by image content, as `inspect --cache` writes them: read where they are held, "
        "otherwise extracted and written there",
    )
    f.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    f.set_defaults(func=_fit)
    pr = sub.add_parser("predict", help="top-k labels for images with a trained bundle")
    pr.add_argument("bundle", type=Path, help="bundle folder or bundle.zip")
    pr.add_argument("images", type=Path, nargs="+")
    pr.add_argument("-k", type=int, default=3)
    pr.add_argument(
        "--precision",
        choices=["auto", "fp32", "int8"],
        default="auto",
        help="auto: int8 where the bundle kept one and this CPU multiplies int8 as the one that tested it did",
    )
    pr.set_defaults(func=_predict)
    q = sub.add_parser("quantize", help="add an int8 model to a bundle folder, kept only where it predicts as fp32")
    q.add_argument("bundle", type=Path, help="the bundle folder `fit` wrote (OUT/bundle)")
    q.add_argument("dataset", type=Path, help="the dataset zip it was trained on")
    q.add_argument("--seed", type=int, default=None, help="the fit's seed, for its split (default: the card's)")
    q.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    q.set_defaults(func=_quantize)
    i = sub.add_parser("inspect", help="likely label errors, near-duplicates and outliers in a dataset zip")
    i.add_argument("dataset", type=Path)
    i.add_argument("--backbone", default=DEFAULT_BACKBONE)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", action="store_true", help="print the findings as JSON (last line)")
    i.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="embeddings by image content (.npz): read if it exists, then written with every image of this run",
    )
    i.set_defaults(func=_inspect)
    b = sub.add_parser("backbones", help="list backbones and whether their weights are here")
    b.set_defaults(func=_backbones)
    return p


def _add_option(parser: argparse.ArgumentParser, option: Option[Any]) -> None:
    """A fit option as ml.config declares it: `--max-epochs N`; a switch on by default as `--no-hflip`."""
    flag = "--" + option.name.replace("_", "-")
    default = option.default_value()
    if option.kind is bool:
        negated = bool(default)
        parser.add_argument(
            "--no-" + flag[2:] if negated else flag,
            dest=option.name,
            action="store_false" if negated else "store_true",
            help=_escaped(("turn off: " if negated else "") + option.help),
        )
        return
    choices = option.choices() if option.choices else None
    many = choices is not None and len(", ".join(choices)) > 40  # listed in the help, not in the usage line
    about = option.describe() + (f" (one of: {', '.join(choices)})" if many and choices else "")
    parser.add_argument(
        flag,
        dest=option.name,
        type=option.kind,
        default=default,
        choices=choices,
        metavar=option.name.upper() if many else None,
        help=_escaped(about + (f"; default {default}" if default is not None else "")),
    )


def _escaped(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def _fit_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of `fit`'s options (the rest of them keep the engine's defaults)."""
    return FitConfig(**{o.name: getattr(args, o.name) for o in options_for("user", "cli")})


def _fit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ml.checkpoint import FileCheckpoints
    from ml.fit import Known, fit
    from ml.run import Progress, about

    if not args.dataset.is_file():
        print(f"error: no such file: {args.dataset}", file=sys.stderr)
        return 2
    config = _fit_config(args)
    config.validate()  # before the bar: a bad option is one line of error, nothing else
    # One bar for the whole fit: its share of the planned work (ml.run), the step in words, the ETA.
    bar = tqdm(total=100, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}", file=sys.stderr)

    def progress(ev: Progress) -> None:
        if ev.message is not None:  # log lines as they are written, above the bar
            tqdm.write(ev.message, file=sys.stderr)
            return
        if ev.note:  # why the plan grew, or why the ETA rose
            tqdm.write(f"note: {ev.note}", file=sys.stderr)
        bar.set_description_str(ev.label or ev.phase, refresh=False)
        bar.n = round(100 * ev.fraction, 1)
        post = about(ev.eta_s) + " left" if ev.eta_s is not None and ev.fraction < 1 else ""
        if ev.row and "heldout_accuracy" in ev.row and ev.row.get("epoch") is not None:
            post += f" · epoch {ev.row['epoch']} held-out acc {ev.row['heldout_accuracy']:.3f}"
        bar.set_postfix_str(post, refresh=False)
        bar.refresh()

    checkpoints = FileCheckpoints(args.checkpoint) if args.checkpoint else None
    store = _read_store(args.cache)
    try:
        result = fit(
            args.dataset, args.out, config, known=Known(store=store), progress=progress, checkpoints=checkpoints
        )
    finally:
        bar.close()
    _write_store(args.cache, store)
    if args.json:
        summary = result.to_json()
        summary["metrics"] = {k: v for k, v in summary["metrics"].items() if k not in ("misclassified", "reliability")}
        print(json.dumps(summary))
    else:
        m = result.metrics
        print(f"strategy: {result.strategy.name} ({result.strategy.cell})")
        print(
            f"val accuracy {m.val_accuracy:.4f}, macro-F1 {m.macro_f1:.4f}, ECE {m.ece:.4f} "
            f"on {m.num_val} images; {len(m.misclassified)} misclassified"
        )
        print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
        print(f"bundle: {result.artifacts['bundle']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ml.bundle import unpack_bundle
    from ml.images import ImageDecodeError
    from ml.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.bundle
        if args.bundle.is_file():
            folder = unpack_bundle(args.bundle, Path(tmp))
        predictor = Predictor(folder, precision=args.precision)
        status = 0
        for image in args.images:
            try:
                (preds,) = predictor.predict_bytes([image.read_bytes()], k=args.k)
            except (OSError, ImageDecodeError) as exc:
                print(f"{image}: error: {exc}", file=sys.stderr)
                status = 2
                continue
            print(f"{image}: " + ", ".join(f"{p.label} {p.score:.3f}" for p in preds))
    return status


def _quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ml.config import VAL_FRACTION_OPTION
    from ml.dataset import index_dataset
    from ml.quantize import quantize_bundle

    if not args.dataset.is_file() or not args.bundle.is_dir():
        print(f"error: need a bundle folder and a dataset zip: {args.bundle}, {args.dataset}", file=sys.stderr)
        return 2
    index = index_dataset(args.dataset)
    with tqdm(total=1, desc="int8", unit="img") as bar:

        def progress(what: str, done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.set_description(f"int8: {what}")

        result = quantize_bundle(
            args.bundle,
            args.dataset,
            index,
            val_fraction=VAL_FRACTION_OPTION.default_value(),
            seed=args.seed,
            progress=progress,
        )
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        from ml.quantize import card_section

        print("\n".join(card_section(result)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ml.finders import FinderConfig, find_issues

    if not args.dataset.is_file():
        print(f"error: no such file: {args.dataset}", file=sys.stderr)
        return 2
    bars: dict[str, tqdm[Never]] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total, desc=phase, unit="img")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    # Without --cache nothing would keep the views only a fit reads: the finders then measure their own alone.
    cache = _read_store(args.cache)
    config = FinderConfig(backbone=args.backbone, seed=args.seed)
    findings = find_issues(args.dataset, config, cache=cache, progress=progress)
    for bar in bars.values():
        bar.close()
    _write_store(args.cache, cache)
    if args.json:
        print(json.dumps(findings.to_dict()))
        return 0
    probe = findings.probe
    print(
        f"{findings.num_images} images ({findings.embedded} embedded, the rest from the cache); "
        f"out-of-fold probe accuracy {probe['cv_accuracy']:.3f} ({_probe_view(probe)})"
    )
    print(f"likely label errors: {len(findings.label_issues)}")
    for issue in findings.label_issues[:20]:
        print(f"  {issue.member}: filed as {issue.label!r}, looks like {issue.suggested!r} ({issue.score:.2f})")
    print(f"near-duplicates: {len(findings.near_duplicates)}")
    for dup in findings.near_duplicates[:20]:
        print(f"  {dup.kind}: {dup.members[0]} ~ {dup.members[1]} ({dup.similarity:.3f})")
    print(f"outliers: {len(findings.outliers)}")
    for outlier in findings.outliers:
        print(f"  {outlier.member} ({outlier.score:.2f})")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in findings.timings.items()))
    return 0


def _read_store(path: Path | None) -> EmbeddingCache | None:
    """`--cache FILE.npz`: what it holds (an empty store when it does not exist yet); None without it."""
    from ml.features import EmbeddingCache

    if path is None:
        return None
    return EmbeddingCache.from_bytes(path.read_bytes()) if path.is_file() else EmbeddingCache()


def _write_store(path: Path | None, store: EmbeddingCache | None) -> None:
    if path is not None and store is not None:
        path.write_bytes(store.to_bytes())


def _backbones(args: argparse.Namespace) -> int:
    from ml.backbones import REGISTRY, available_backbones, weights_location

    for name, ok in available_backbones().items():
        file, directory = weights_location(REGISTRY[name])
        print(f"{name:20s} {'available' if ok else 'missing  '}  {directory / file}")
    return 0


def _probe_view(probe: dict[str, Any]) -> str:
    """What the label finder read, in words: 'top, C=0.01' or 'the mean of 5 views'."""
    if probe["C"] is None:
        return f"the mean of {len(probe['views']) - 1} views"
    return f"{probe['view']}, C={probe['C']:g}"
