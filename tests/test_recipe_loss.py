"""The shipped recipe, pinned (torchtune style): the train loss of the first optimizer steps of ``python train.py``
as it ships (demo records, ``serialize=bins``, the tiny Qwen2 base with LoRA on every linear layer, focal loss without
class weights, no oversampling, AdamW), run
through the real lifecycle and read back from MLflow. Any change to data, serialization, tokenizer, model, LoRA,
loss, sampler, optimizer, trainer or lifecycle that moves these numbers fails here; update them only for an
intended change, and say why in the commit. ``pretrain=none`` keeps it fast: the stage's own loop is the same
trainer. ``hardware.packing=true`` (one row per step, no pads) starts from the same loss and stays within LoRA
dropout's noise after it (its masks fall on a (1, tokens) row, not on (rows, longest): other draws, as any change
of batch shape gives); the share of pad tokens it leaves out reaches MLflow and ``training_summary.json``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, new_store
from mlflow import MlflowClient
from omegaconf import open_dict

from loralab.data.demo import write_demo
from loralab.lifecycle import run

PINNED = [
    1.01871288,
    0.62208962,
    0.70507449,
]  # step.train_loss at optimizer steps 1-3 (batch 16, focal gamma 1.0, no class weights, LoRA dropout 0.2, seed 42)
PINNED_FULL = [
    1.01871288,  # the same first loss: LoRA's zero-initialized B leaves the base's output unchanged
    0.63153952,
    0.68803775,
]  # every weight trains (lora=auto on a set of lora.full_from_rows rows or more), at lora.full_lr


@pytest.mark.slow
@pytest.mark.parametrize(
    "packing, full_from_rows", [(False, None), (True, None), (False, 96)], ids=["padded", "packed", "every-weight"]
)
def test_the_first_steps_of_the_shipped_recipe_keep_their_losses(tmp_path, packing, full_from_rows):
    """96 training rows: under lora.full_from_rows the adapters train; with the threshold at 96, every weight."""
    train, val = write_demo(tmp_path / "data", n_train=96, n_val=32)
    cfg = compose_train(
        "pretrain=none",
        f"data.train_file={train}",
        f"data.val_file={val}",
        "data.cache_dir=null",
        "baseline=none",
        "export.zip=false",
        "quiet=true",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        f"tracking.uri={new_store(tmp_path / 'mlflow.db')}",
        f"hardware.packing={packing}",
        *([f"lora.full_from_rows={full_from_rows}"] if full_from_rows else []),
    )
    shipped = (cfg.serialize._target_.endswith("Bins"), cfg.lora.target_modules, cfg.lora.lora_dropout)
    assert shipped == (True, "all-linear", 0.2) and cfg.loss.class_weights == "none"  # what this pins
    assert cfg.data.oversample_to is None
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    losses = [
        m.value for m in sorted(client.get_metric_history(found.info.run_id, "step.train_loss"), key=lambda m: m.step)
    ]
    adapters = full_from_rows is None
    pinned = PINNED if adapters else PINNED_FULL
    exact = 1 if packing else len(pinned)  # step 1: zero-initialized LoRA B, so dropout changes nothing yet
    torch.testing.assert_close(torch.tensor(losses[:exact]), torch.tensor(pinned[:exact]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(pinned), rtol=0, atol=1e-2)
    assert found.data.tags["resolved.lora.enabled"] == str(adapters)
    assert float(found.data.tags["resolved.optim.lr"]) == (cfg.optim.lr if adapters else cfg.lora.full_lr)
    assert (found.data.metrics["model.trainable_share"] < 0.5) is adapters  # the adapters: a few % of the weights
    assert found.data.params["lora.enabled"] == "auto"  # the config as given; the tags say what it became
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["packing"] is packing and found.data.params["hardware.packing"] == str(packing)
    assert 0 < summary["padding_share"]["train"] < 1 and 0 <= summary["padding_share"]["val"] < 1
    assert found.data.metrics["data.train_padding_share"] == pytest.approx(summary["padding_share"]["train"])
