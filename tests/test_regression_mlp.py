"""MarketSentinel: HDF5 + schema loading, file-order batches, the summed per-head loss, the best-only checkpoint,
and whole runs through the Hydra config (compose API and train.py) tracked in a temporary MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import new_store
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from sklearn.metrics import mean_squared_error
from torch.utils.data import SequentialSampler

from loralab.config import ConfigError
from loralab.core import loaders
from loralab.core.loaders import TaskData
from loralab.data.hdf5 import H5Regression, read_schema
from loralab.data.records import DataError
from loralab.data.regression_demo import write_tabular_demo
from loralab.lifecycle import run as train
from loralab.losses import SummedHeadMSE
from loralab.metrics import regression_metrics
from loralab.models import mlp as mlp_module
from loralab.models.mlp import MLPRegressor, load_best, save_best
from loralab.tasks.tabular_regression import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
CKPT_KEYS = {"model_state_dict", "input_dim", "hidden_dim", "epoch", "val_loss"}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module; each test uses its own experiment."""
    return new_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def tabular(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tabular")
    train_h5, val_h5, schema = write_tabular_demo(
        out / "train.h5", out / "val.h5", out / "feature_schema.txt", n_train=200, n_val=64
    )
    return {"train": train_h5, "val": val_h5, "schema": schema, "dir": out}


def compose_ms(
    data: dict[str, Path], out_dir: Path, *overrides: str, uri: str | None = None, experiment: str = "marketsentinel"
):
    uri = uri or f"sqlite:///{out_dir}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=marketsentinel",
                "data.demo=false",
                f"data.train_file={data['train']}",
                f"data.val_file={data['val']}",
                f"data.schema_file={data['schema']}",
                f"paths.output_dir={out_dir}",
                f"tracking.uri={uri}",
                f"tracking.experiment={experiment}",
                *overrides,
            ],
        )


def make_loaders(train, val, schema, device="cpu"):
    """The task's datasets batched by the lifecycle's loader builder (file order, no length grouping)."""
    dim = len(read_schema(schema))
    data = TaskData(H5Regression(train, dim, 2), H5Regression(val, dim, 2), shuffle=False)
    hardware = OmegaConf.create({"micro_batch_size": None, "num_workers": 0, "pin_memory": True, "device": device})
    trainer = OmegaConf.create({"group_by_length": True, "eval_batch_size": 16})
    return loaders.make_loaders(data, batch_size=16, hardware=hardware, trainer=trainer, seed=0)[:2]


def only_run(uri: str, experiment: str = "marketsentinel"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_experiment_composes_the_frozen_loop(tabular, tmp_path):
    cfg = compose_ms(tabular, tmp_path)
    assert cfg.task.name == "tabular_regression" and cfg.lora.enabled is False
    assert cfg.model._target_.endswith("MLPRegressor") and cfg.model.hidden_dim == 128
    assert cfg.loss._target_.endswith("SummedHeadMSE")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size) == (1e-3, 1e-4, 16)
    assert (cfg.trainer.monitor, cfg.trainer.monitor_mode, cfg.trainer.early_stopping.patience) == (
        "val_loss",
        "min",
        5,
    )
    assert cfg.objective == "val_loss" and cfg.hardware.num_workers == 0
    # The command line still wins over the experiment; without an experiment the task stays classification.
    assert compose_ms(tabular, tmp_path, "optim.lr=5e-4").optim.lr == 5e-4
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("train").task.name == "classification"


def test_schema_sets_input_dim_and_a_width_mismatch_fails_clearly(tabular, tmp_path):
    names = read_schema(tabular["schema"])
    with h5py.File(tabular["train"]) as fh:
        assert fh["X"].shape[1] == len(names)
    short = tmp_path / "schema.txt"
    short.write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(DataError, match=rf"X has shape .*{len(names)}\).*schema lists {len(names) - 1} features"):
        make_loaders(str(tabular["train"]), str(tabular["val"]), str(short))
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(DataError, match="duplicate"):
        read_schema(dup)


def test_batches_come_in_file_order(tabular):
    train_loader, val_loader = make_loaders(str(tabular["train"]), str(tabular["val"]), str(tabular["schema"]))
    with h5py.File(tabular["train"]) as fh:
        x_file, y_file = fh["X"][...], fh["y"][...]
    batches = list(train_loader)
    assert [len(b["features"]) for b in batches[:-1]] == [16] * (len(batches) - 1)
    np.testing.assert_array_equal(torch.cat([b["features"] for b in batches]).numpy(), x_file)
    np.testing.assert_array_equal(torch.cat([b["labels"] for b in batches]).numpy(), y_file)
    for loader in (train_loader, val_loader):
        assert isinstance(loader.sampler, SequentialSampler) and loader.num_workers == 0
        assert loader.pin_memory is False  # CPU
    cuda_loader, _ = make_loaders(str(tabular["train"]), str(tabular["val"]), str(tabular["schema"]), "cuda")
    assert cuda_loader.pin_memory is True  # built, not iterated: no GPU needed


def test_y_width_and_non_finite_rows_are_refused(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as fh:
        fh["X"], fh["y"] = np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(DataError, match=r"y has shape \(4, 3\), expected \(N, 2\)"):
        H5Regression(path, 3, 2)
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with h5py.File(path, "w") as fh:
        fh["X"], fh["y"] = x, np.zeros((4, 2), np.float32)
    with pytest.raises(DataError, match="1 rows of X hold NaN/Inf.*row 2"):
        H5Regression(path, 3, 2)


def test_loss_is_mse_of_head_0_plus_mse_of_head_1():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(32, 2, generator=gen), torch.randn(32, 2, generator=gen)
    expected = sum(mean_squared_error(target[:, i], pred[:, i]) for i in range(2))
    assert SummedHeadMSE()(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_metrics_per_head_agree_with_their_definitions():
    gen = np.random.default_rng(0)
    y, p = gen.normal(size=(50, 2)), gen.normal(size=(50, 2))
    m = regression_metrics(y, p, ["a", "b"])
    for i, name in enumerate("ab"):
        err = p[:, i] - y[:, i]
        assert m[f"val_mae_{name}"] == pytest.approx(np.abs(err).mean())
        assert m[f"val_rmse_{name}"] == pytest.approx(np.sqrt((err**2).mean()))
        assert m[f"val_r2_{name}"] == pytest.approx(1 - (err**2).sum() / ((y[:, i] - y[:, i].mean()) ** 2).sum())
    assert m["val_mae"] == pytest.approx((m["val_mae_a"] + m["val_mae_b"]) / 2)


def test_best_checkpoint_is_weights_only_and_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "model_best.pt"
    model = MLPRegressor(5, 8)
    save_best(path, model, epoch=3, val_loss=0.5)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == CKPT_KEYS and (ckpt["input_dim"], ckpt["hidden_dim"], ckpt["epoch"]) == (5, 8, 3)

    def crash(obj, fh, *args, **kwargs):  # half a file, then the process "dies"
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mlp_module.torch, "save", crash)
    with pytest.raises(OSError):
        save_best(path, MLPRegressor(5, 8), epoch=4, val_loss=0.4)
    monkeypatch.undo()
    reloaded, record = load_best(path)
    assert record["epoch"] == 3 and list(path.parent.iterdir()) == [path]  # old best intact, no temp left
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


@pytest.mark.slow
def test_marketsentinel_run_end_to_end(tabular, tmp_path, mlflow_uri):
    out = tmp_path / "run"
    # min_delta larger than any change: epochs 2 and 3 cannot improve, so early stopping ends the run after epoch 3
    cfg = compose_ms(
        tabular,
        out,
        "trainer.max_epochs=4",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=1e9",
        uri=mlflow_uri,
        experiment="ms-e2e",
    )
    objective = train(cfg)

    history = json.loads((out / "training_history.json").read_text())
    meta = json.loads((out / "training_metadata.json").read_text())
    val_losses = [h["val_loss"] for h in history]
    best = int(np.argmin(val_losses)) + 1
    assert objective == min(val_losses) and meta["best_epoch"] == best
    assert meta["data"]["input_dim"] == len(read_schema(tabular["schema"]))

    # The checkpoint is the best epoch and reproduces its val loss from the file alone.
    model, ckpt = load_best(out / CHECKPOINT)
    assert set(ckpt) == CKPT_KEYS and ckpt["epoch"] == best and ckpt["val_loss"] == pytest.approx(min(val_losses))
    with h5py.File(tabular["val"]) as fh:
        x, y = fh["X"][...], fh["y"][...]
    with torch.no_grad():
        pred = model(features=torch.from_numpy(x)).logits.numpy()
    assert sum(mean_squared_error(y[:, i], pred[:, i]) for i in range(2)) == pytest.approx(min(val_losses), rel=1e-4)

    for name in ("loss_curves.png", "per_dimension_mae.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client, run = only_run(cfg.tracking.uri, "ms-e2e")
    assert run.info.status == "FINISHED" and run.data.params["model.hidden_dim"] == "128"
    assert len(history) == 3 and run.data.tags["stop_reason"] == "early_stopping: no val_loss improvement for 2 epochs"
    for key in ("val_loss", "train_loss", "val_mse_head_0", "val_mae_head_1", "val_rmse_head_0", "val_r2_head_1"):
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == [h["epoch"] for h in history]
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_history.json", "training_metadata.json", "checkpoints", "plots"} <= artifacts


def test_bad_data_ends_the_mlflow_run_failed(tabular, tmp_path, mlflow_uri):
    schema = tmp_path / "schema.txt"
    schema.write_text("only_one_feature\n")
    cfg = compose_ms({**tabular, "schema": schema}, tmp_path, uri=mlflow_uri, experiment="ms-failed")
    with pytest.raises(DataError, match="schema lists 1 features"):
        train(cfg)
    run = only_run(mlflow_uri, "ms-failed")[1]
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "DataError"
    assert "schema lists 1 features" in run.data.tags["error"]


def test_config_errors_fail_before_anything_loads(tabular, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(compose_ms(tabular, tmp_path, "model.hidden_dim=0"))
    assert str(err.value) == "model.hidden_dim=0: must be > 0"
    with pytest.raises(ConfigError, match="trainer.monitor='val_r2_head_9'"):
        train(compose_ms(tabular, tmp_path, "trainer.monitor=val_r2_head_9"))
    assert not (tmp_path / "mlflow.db").exists()  # no run was even started


def test_demo_files_are_deterministic(tmp_path):
    a = write_tabular_demo(tmp_path / "a" / "t.h5", tmp_path / "a" / "v.h5", tmp_path / "a" / "s.txt", 50, 20)
    b = write_tabular_demo(tmp_path / "b" / "t.h5", tmp_path / "b" / "v.h5", tmp_path / "b" / "s.txt", 50, 20)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.slow
def test_train_py_cli(tabular, tmp_path):
    """The user's command: python train.py experiment=marketsentinel …, a real process with Hydra's run dir."""
    run_dir = tmp_path / "cli"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=marketsentinel",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(run_dir / 'mlflow.db')}",
        "data.demo=false",
        f"data.train_file={tabular['train']}",
        f"data.val_file={tabular['val']}",
        f"data.schema_file={tabular['schema']}",
        "trainer.max_epochs=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((run_dir / "training_summary.json").read_text())
    lowest = min(best["history"], key=lambda h: h["val_loss"])  # the frozen loop keeps the lowest val loss
    ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == best["best_epoch"] == lowest["epoch"] and len(best["history"]) == 2
    assert ckpt["val_loss"] == pytest.approx(lowest["val_loss"])
    assert only_run(f"sqlite:///{run_dir}/mlflow.db")[1].info.status == "FINISHED"
