"""The throughput benchmark, in its tiny mode: it runs every pipeline and writes the full JSON."""

import json
import math
import subprocess

from tests.conftest import ROOT

PIPELINES = ("baseline", "bare", "resnet_lab", "bare_best", "resnet_lab_best")
FIELDS = ("images_per_s", "images_per_s_rounds", "peak_rss_mb", "main_rss_mb", "cuda_peak_mb",
          "warmup_s", "model", "precision", "channels_last", "compile")


def test_benchmark_tiny_run_writes_every_field(fmnist_root, tmp_path, python):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "throughput.py"), "--root", str(fmnist_root), "--device", "cpu",
         "--steps", "4", "--rounds", "2", "--warmup", "1", "--width", "4", "--batch-size", "32",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["steps"] == 4 and result["rounds"] == 2
    assert set(result["conditions"]) == {"seconds", "loadavg_start", "loadavg_end", "cpu_wait_share",
                                         "cpu_steal_share"}
    assert set(result["results"]) == set(PIPELINES)
    for name, r in result["results"].items():
        assert set(FIELDS) <= set(r), name
        assert len(r["images_per_s_rounds"]) == 2 and r["images_per_s"] > 0
        assert r["peak_rss_mb"] >= r["main_rss_mb"] > 0 and r["cuda_peak_mb"] is None
    # The baseline's DataLoader workers are counted in its peak.
    assert result["results"]["baseline"]["peak_rss_mb"] > result["results"]["baseline"]["main_rss_mb"]
    speed = {n: r["images_per_s"] for n, r in result["results"].items()}
    assert math.isclose(result["ratios"]["resnet_lab/bare"], speed["resnet_lab"] / speed["bare"])
    assert math.isclose(result["ratios"]["resnet_lab_best/baseline"], speed["resnet_lab_best"] / speed["baseline"])
    assert "resnet_lab/bare" in proc.stdout  # the printed table


def test_benchmark_says_where_the_data_is_missing(tmp_path, python):
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "throughput.py"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train-images-idx3-ubyte" in proc.stderr and str(tmp_path) in proc.stderr
