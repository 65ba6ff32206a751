"""DDP through torchrun on CPU (gloo, 2 processes) against one process with the same global batch.

Tolerance: with an epoch that splits evenly into global batches and an unweighted loss, the two runs see the same
samples per optimizer step and average the same gradients; only the order of float additions differs (all-reduce
of two half-batch gradients vs one batch), so losses and weights agree to float32 rounding (~1e-7, docs/performance.md).
An epoch that does not split evenly would differ by design (each rank drops the epoch's leftover batches), as would
class-weighted means per half-batch.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import new_store
from safetensors.torch import load_file

from loralab.data.demo import write_demo

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6  # float32 rounding of a different addition order, over 24 optimizer steps
# The weights: 90k adapted parameters (LoRA on every linear layer) drift further by rounding (1.4e-6 measured)
# than the metrics; a real divergence of the two runs is orders of magnitude more.
WEIGHT_TOL = 5e-6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, tmp_path, name, data, *extra, db=None):
    run_dir = tmp_path / name
    args = [
        *extra,
        "data=jsonl",
        f"data.train_file={data}/train.jsonl",
        f"data.val_file={data}/val.jsonl",
        "trainer.max_epochs=2",
        "trainer.group_by_length=false",
        "data.oversample_to=null",
        "loss.class_weights=none",
        "model.tokenizer_vocab_size=300",
        "export.zip=false",
        "lora.lora_dropout=0.0",  # dropout masks are drawn per rank: equal only without them
        "baseline=none",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(tmp_path / f'{db or name}.db')}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    data = tmp_path / "data"
    write_demo(data, n_train=192, n_val=64)  # 192 = 12 global batches of 16: no partial batch
    ddp = run(TORCHRUN, tmp_path, "ddp", data)
    single = run([sys.executable], tmp_path, "single", data)

    h_ddp, h_single = (json.loads((d / "training_summary.json").read_text()) for d in (ddp, single))
    assert h_ddp["world_size"] == 2 and h_single["world_size"] == 1
    for a, b in zip(h_ddp["history"], h_single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOL)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)
        assert a["val_macro_f1"] == b["val_macro_f1"]
    w_ddp, w_single = (load_file(d / "checkpoints" / "last" / "weights.safetensors") for d in (ddp, single))
    assert w_ddp.keys() == w_single.keys()
    worst = max((w_ddp[k] - w_single[k]).abs().max().item() for k in w_ddp)
    assert worst <= WEIGHT_TOL, worst  # the trained weights themselves, not only the metrics they produce

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/ddp.db")
    runs = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, whatever the number of processes
    assert (ddp / "metrics.json").is_file() and (ddp / "checkpoints" / "last").is_dir()
    assert not list(tmp_path.glob("ddp/**/*.tmp"))

    # Resume under DDP: rank 0's epoch-1 checkpoint, loaded by both ranks, replays epoch 2 exactly.
    shutil.copytree(ddp, tmp_path / "resumed")
    resumed = run(TORCHRUN, tmp_path, "resumed", data, f"resume={tmp_path}/resumed/checkpoints/epoch_001", db="ddp")
    h_resumed = json.loads((resumed / "training_summary.json").read_text())["history"]
    assert h_resumed[1]["val_loss"] == h_ddp["history"][1]["val_loss"]
    wa, wb = (load_file(d / "checkpoints" / "last" / "weights.safetensors") for d in (ddp, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
