"""A run that dies leaves nothing behind that misleads: an MLflow run an attempt never closed (killed before its
first checkpoint) is marked KILLED by the next attempt in that run dir, a temp file of a write in flight is removed,
and a resume that meets a corrupt checkpoint is refused in one line before the finished run is reopened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from loralab.data.demo import write_demo


def runs_of(uri: str):
    client = MlflowClient(uri)
    return sorted(client.search_runs(client.search_experiments()[0].experiment_id), key=lambda r: r.info.start_time)


@pytest.mark.slow
def test_killed_before_a_checkpoint_then_run_again_then_a_corrupt_resume(tmp_path):
    data, run_dir, uri = tmp_path / "data", tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    write_demo(data, n_train=120, n_val=30)
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=jsonl",
        f"data.train_file={data}/train.jsonl",
        f"data.val_file={data}/val.jsonl",
        "data.cache_dir=null",
        "pretrain=clm",
        "pretrain.epochs=2",
        f"pretrain.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "baseline=logreg",  # the in-run baseline the other runs do not use
        "export.zip=false",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={uri}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run_dir / ".mlflow_run_id").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # while it pretrains: no checkpoint yet
    assert proc.wait() == -signal.SIGKILL and not (run_dir / "checkpoints" / "last").exists()
    assert [r.info.status for r in runs_of(uri)] == ["RUNNING"]
    stray = run_dir / "model_final.zip.4242-0123abcd.tmp"  # what a kill during the zip write leaves
    stray.write_bytes(b"partial")

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    killed, finished = runs_of(uri)
    assert (killed.info.status, finished.info.status) == ("KILLED", "FINISHED")
    assert "killed before its first checkpoint" in killed.data.tags["error"] and not stray.exists()
    baseline = json.loads((run_dir / "metrics.json").read_text())["baseline"]
    assert baseline["name"] == "logreg" and 0 <= baseline["scalars"]["val_macro_f1"] <= 1

    weights = run_dir / "checkpoints" / "last" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # corrupt: the checksum no longer holds
    resumed = subprocess.run([*cmd, "resume=auto"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 2 and "CheckpointError" in resumed.stderr + resumed.stdout
    assert [r.info.status for r in runs_of(uri)] == ["KILLED", "FINISHED"]  # the finished run was not reopened
