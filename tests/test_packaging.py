"""A non-editable install carries conf/ inside the package and runs from any directory."""

import os
import subprocess
import sys

from tests import runs
from tests.conftest import ROOT


def test_non_editable_install_runs_from_elsewhere(tmp_path, fmnist_root):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert (target / "resnet_lab" / "conf" / "dataset" / "fashion_mnist.yaml").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import resnet_lab; print(resnet_lab.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))
    run_dir = elsewhere / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_lab", "debug=smoke", f"dataset.root={fmnist_root}",
         "dataset.download=false", "device=cpu", f"hydra.run.dir={run_dir}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert runs.epochs(run_dir) == [1]


def test_user_config_dir_adds_options(tmp_path, fmnist_root):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_resnet.yaml").write_text("defaults: [resnet18, _self_]\nname: my_resnet\nwidth: 4\nlayers: [1, 1, 1, 1]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_lab", "--config-dir", str(tmp_path), "model=my_resnet",
         "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "width: 4" in proc.stdout and "- 1" in proc.stdout
