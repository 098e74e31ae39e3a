import subprocess
import sys

from tests.conftest import ROOT


def test_ml_imports_without_django():
    code = (
        "import sys; sys.modules['django'] = None\n"  # any Django import would now fail
        "import ml.cli, ml.fit, ml.predict, ml.bundle, ml.dataset, ml.backbones, ml.finders, cleanlab.filter\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
