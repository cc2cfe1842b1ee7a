"""training.engine.import_deepspeed: deepspeed without its autotuner's mlflow import, mlflow untouched."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
from training.engine import import_deepspeed
deepspeed = import_deepspeed()
from deepspeed.autotuning import autotuner
print("has_mlflow", autotuner.has_mlflow, "mlflow_loaded", "mlflow" in sys.modules)
import mlflow  # still importable for raylm's own tracking
print("mlflow", mlflow.__name__, "engine", deepspeed.initialize.__name__)
"""


def test_import_deepspeed_skips_the_autotuners_mlflow_and_leaves_mlflow_importable():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "has_mlflow False mlflow_loaded False" in result.stdout, result.stdout
    assert "mlflow mlflow engine initialize" in result.stdout, result.stdout
