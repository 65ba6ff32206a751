"""Faults users hit (issue 17): a corrupt checkpoint, a resume with other settings, a huge row, file-system errors.
Each is one line naming the key or path, raised before anything loads where it can be checked up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from safetensors.torch import load_file

from loralab.config.changes import changed, describe, refused
from loralab.core.checkpoint import CHECKSUMS, STATE, WEIGHTS, load_train_state, load_weights, save_train_state
from loralab.data.demo import write_demo
from loralab.errors import CheckpointError, ConfigError
from loralab.lifecycle import run


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- checkpoint checksums (item 5) ----------------------------------------------------------------------------------

def linear_parts():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return dict(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                scaler=torch.amp.GradScaler("cpu", enabled=False))


def saved(tmp_path: Path) -> Path:
    parts = linear_parts()
    return save_train_state(tmp_path / "ckpt", **parts, loop_state={"epoch": 1}, meta={"mlflow_run_id": "r"})


def test_a_finite_bit_flip_in_the_weights_is_refused(tmp_path):
    """A flipped low mantissa bit keeps every value finite: it used to load silently."""
    ckpt = saved(tmp_path)
    flip_bit(ckpt / WEIGHTS, -4)  # the lowest byte of the last float32
    assert torch.isfinite(load_file(ckpt / WEIGHTS)["weight"]).all()
    with pytest.raises(CheckpointError) as err:
        load_weights(ckpt, torch.nn.Linear(3, 2))
    assert one_line(err).startswith(f"{ckpt / WEIGHTS}: sha256 does not match {CHECKSUMS}")


@pytest.mark.parametrize("name", [WEIGHTS, STATE])
@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksums", "older-checkpoint"])
def test_a_truncated_checkpoint_file_is_one_line(tmp_path, name, with_checksums):
    """A truncated file used to end in safetensors'/torch's traceback; without checksums.json (a checkpoint written
    before them) the readers still turn it into one line naming the file."""
    ckpt = saved(tmp_path)
    truncate(ckpt / name)
    if not with_checksums:
        (ckpt / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError) as err:
        load_train_state(ckpt, **linear_parts())
    assert one_line(err).startswith(f"{ckpt / name}: ")


def test_checksums_are_part_of_the_atomic_checkpoint(tmp_path):
    ckpt = saved(tmp_path)
    manifest = json.loads((ckpt / CHECKSUMS).read_text())
    assert sorted(manifest["sha256"]) == [STATE, WEIGHTS] and manifest["meta"] == {"mlflow_run_id": "r"}
    assert load_train_state(ckpt, **linear_parts())["loop"] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp left beside it


# --- resume with other settings (item 4) ----------------------------------------------------------------------------

def test_changed_keys_ignore_how_a_run_is_driven_and_allow_by_key_or_group():
    saved_cfg = {"optim": {"lr": 1e-3, "batch_size": 8}, "hardware": {"torch_threads": None, "precision": "fp32"},
                 "resume": None, "paths": {"output_dir": "/a"}, "tracking": {"uri": "sqlite:///a.db"}}
    used = {"optim": {"lr": 1e-2, "batch_size": 8}, "hardware": {"torch_threads": 2, "precision": "bf16"},
            "resume": "auto", "paths": {"output_dir": "/b"}, "tracking": {"uri": "sqlite:///b.db"}}
    changes = changed(saved_cfg, used)
    assert changes == {"optim.lr": (1e-3, 1e-2), "hardware.precision": ("fp32", "bf16")}
    assert refused(changes, False) == ["hardware.precision", "optim.lr"]
    assert refused(changes, ["optim"]) == ["hardware.precision"]
    assert refused(changes, True) == []
    assert describe(changes) == "hardware.precision: 'fp32' -> 'bf16', optim.lr: 0.001 -> 0.01"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished one-epoch run (tiny model) with its store: tests resume copies of it."""
    tmp = tmp_path_factory.mktemp("trained")
    train, val = write_demo(tmp / "data", n_train=60, n_val=24)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root (./mlruns) lands here, not in the checkout
        run(tiny_cfg(tmp, tmp / "run", train, val))
    return {"dir": tmp, "train": train, "val": val}


def tiny_cfg(tmp: Path, run_dir: Path, train: Path, val: Path, *overrides: str):
    cfg = compose_train("data=jsonl", f"data.train_file={train}", f"data.val_file={val}", "data.cache_dir=null",
                        "trainer.max_epochs=1", "model.tokenizer_vocab_size=300", "model.max_length=48",
                        "export.zip=false", "baseline=none", "quiet=true", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                        *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture
def copy_of(trained, tmp_path, monkeypatch):
    """A copy of the trained run dir and its store, and a function resuming it with overrides."""
    shutil.copytree(trained["dir"] / "run", tmp_path / "run")
    shutil.copy(trained["dir"] / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (mlflow_run,) = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)

    def resume(*overrides: str):
        return run(tiny_cfg(tmp_path, tmp_path / "run", trained["train"], trained["val"], "resume=auto", *overrides))

    return {"run": tmp_path / "run", "resume": resume, "client": client, "run_id": mlflow_run.info.run_id}


def status(copy) -> tuple[str, dict[str, str]]:
    r = copy["client"].get_run(copy["run_id"])
    return r.info.status, r.data.tags


@pytest.mark.slow
def test_resume_with_another_lr_is_refused_naming_the_key_before_the_run_reopens(copy_of):
    """resume=auto with another optim.lr used to run to FINISHED while MLflow's params kept the old value."""
    with pytest.raises(ConfigError) as err:
        copy_of["resume"]("optim.lr=0.01", "hardware.torch_threads=1")  # threads: not a change that counts
    assert one_line(err).startswith("resume=auto: 1 setting(s) differ from the checkpoint's run (optim.lr: ")
    assert "-> 0.01" in str(err.value) and "resume_allow_changes=[optim.lr]" in str(err.value)
    assert status(copy_of)[0] == "FINISHED"  # the MLflow run was not reopened


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_naming_the_file(copy_of, trained):
    train = trained["train"]
    original = train.read_bytes()
    try:
        train.write_bytes(original + original.splitlines(keepends=True)[0].replace(b'"id": "', b'"id": "new-'))
        with pytest.raises(ConfigError) as err:
            copy_of["resume"]()
    finally:
        train.write_bytes(original)
    assert "(data.train_file.sha256: '" in one_line(err)


@pytest.mark.slow
def test_an_allowed_change_is_logged_and_tagged(copy_of, caplog):
    copy_of["resume"]("optim.lr=0.01", "resume_allow_changes=[optim.lr]")
    state, tags = status(copy_of)
    assert state == "FINISHED" and tags["resume_changes"].startswith("optim.lr: ")
    assert "accepted changes since the checkpoint: optim.lr" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, lambda p: flip_bit(p, -4)], ids=["truncated", "bit-flip"])
@pytest.mark.parametrize("name", [STATE, WEIGHTS])
def test_a_corrupt_last_checkpoint_fails_the_run_in_one_line(copy_of, damage, name):
    """A truncated last/trainer_state.pt used to be a traceback before the run reopened (it stayed KILLED)."""
    path = copy_of["run"] / "checkpoints" / "last" / name
    damage(path)
    with pytest.raises(CheckpointError) as err:
        copy_of["resume"]()
    assert one_line(err).startswith(f"{path}: ")
    state, tags = status(copy_of)
    assert state == "FAILED" and tags["error"].startswith(f"CheckpointError: {path}: ")


@pytest.mark.slow
def test_a_corrupt_ranked_epoch_is_refused_by_name_not_skipped(copy_of):
    """``last`` is fine but the top-k epoch the best model would be reloaded from is not: refused up front, by
    path, rather than training on and choosing the best among the rest."""
    path = copy_of["run"] / "checkpoints" / "epoch_001" / WEIGHTS
    flip_bit(path, -4)
    with pytest.raises(CheckpointError) as err:
        copy_of["resume"]()
    assert one_line(err).startswith(f"{path}: sha256 does not match")
