"""``bench/device_check.py --dry``: the GPU check's every section at tiny shapes on the CPU, so the command a CUDA
machine runs (docs/hardware.md) does not rot between GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_check_runs_dry_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "device_check.py"), "--dry", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "device_check.json").read_text())
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert proc.returncode == 0, json.dumps(report, indent=1)[-3000:]
    assert statuses == {
        "rtx3050": "ok",
        "rtx3050_1_5b": "ok",
        "reload": "ok",
        "sigkill_resume": "ok",
        "torchrun": "ok",
        "throughput_0_5b": "ok",
        "throughput_1_5b": "skipped",  # dry: one throughput run covers the path
        "qlora": "skipped",  # no bitsandbytes, no CUDA
    }
    s = report["sections"]
    assert s["sigkill_resume"]["killed_at_epoch"] == 1 and s["sigkill_resume"]["weights_max_abs_diff"] == 0.0
    assert s["rtx3050_1_5b"]["estimate_gib"] > s["rtx3050"]["estimate_gib"]
    assert s["throughput_0_5b"]["loralab"]["samples_per_s"] > 0 and "4*N" in s["throughput_0_5b"]["flops_convention"]
    assert "| sigkill_resume | ok |" in (tmp_path / "device_check.md").read_text()
