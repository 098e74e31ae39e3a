"""Graft's transfer-learning engine: a plain PyTorch library (never imports Django).

Fit a classifier on a dataset zip, then predict with the bundle it wrote:

    from ml import Predictor, fit
    result = fit("hymenoptera.zip", "model/")
    print(Predictor(result.artifacts["bundle_dir"]).predict_bytes([open("ant.jpg", "rb").read()]))

The names below are the public face; each loads its module on first use, so reading a bundle
(`read_bundle`, `Predictor` with ONNX Runtime) never imports torch, and `import ml` alone is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    # fit a model
    "fit": "ml.fit",
    "FitConfig": "ml.config",
    "FitResult": "ml.fit",
    "Known": "ml.fit",
    "Progress": "ml.run",
    # inspect a dataset: likely label errors, near-duplicates, outliers
    "find_issues": "ml.finders",
    "FinderConfig": "ml.finders",
    "Findings": "ml.finders",
    # read a bundle and predict with it
    "read_bundle": "ml.bundle_format",
    "unpack_bundle": "ml.bundle_format",
    "BundleInfo": "ml.bundle_format",
    "Preprocessing": "ml.preprocessing",
    "Predictor": "ml.predict",
    "Prediction": "ml.predict",
    # what goes wrong, in words a user can act on
    "MLError": "ml.errors",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:
    from ml.bundle_format import BundleInfo as BundleInfo
    from ml.bundle_format import read_bundle as read_bundle
    from ml.bundle_format import unpack_bundle as unpack_bundle
    from ml.config import FitConfig as FitConfig
    from ml.errors import MLError as MLError
    from ml.finders import FinderConfig as FinderConfig
    from ml.finders import Findings as Findings
    from ml.finders import find_issues as find_issues
    from ml.fit import FitResult as FitResult
    from ml.fit import Known as Known
    from ml.fit import fit as fit
    from ml.predict import Prediction as Prediction
    from ml.predict import Predictor as Predictor
    from ml.preprocessing import Preprocessing as Preprocessing
    from ml.run import Progress as Progress


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ml' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
