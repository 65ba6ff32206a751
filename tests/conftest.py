"""Shared helpers: JSONL writing, Hydra composition, and tiny training runs as real subprocesses."""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from loralab.data.demo import write_demo

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
LABELS = ["long", "short", "skip"]

# Pretrained bases (pretrain=clm) go to a cache made for this test run, never the
# checkout's .cache/: the run's tests share it as sweep jobs do, and no base of an older code version is reused.
os.environ["LORALAB_CACHE"] = tempfile.mkdtemp(prefix="loralab-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORALAB_CACHE"], True)


# Under pytest-xdist (``make test`` runs two workers) each worker, and every run it starts, trains with one torch
# thread: two workers at torch's default of all cores would oversubscribe a small machine and spin, not compute.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# The files whose tests take longest (``--durations``) start first: under ``make test``'s two workers, each taking
# whole files, the last long file then never runs alone at the end. Order only: every test runs either way.
LONGEST_FIRST = (
    "test_resume.py",
    "test_device_check.py",
    "test_sweeps.py",
    "test_pretrain.py",
    "test_steps.py",
    "test_distributed.py",
    "test_mlflow_model.py",
    "test_new_task.py",
    "test_faults.py",
    "test_configs.py",
    "test_mlflow_ui.py",
    "test_interrupted.py",
    "test_end_to_end.py",
    "test_tracking_faults.py",
    "test_package.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@functools.cache
def empty_store() -> Path:
    """An empty SQLite MLflow store, created (and migrated) by MLflow once per test process: creating a store runs
    MLflow's schema migrations, about a second of CPU, where copying one takes milliseconds. Under xdist each worker
    makes its own. Its Default experiment's artifact root (``./mlruns`` when created) is the store's own dir."""
    from mlflow.tracking import MlflowClient

    home = Path(tempfile.mkdtemp(prefix="loralab-test-store-"))
    atexit.register(shutil.rmtree, home, True)
    with contextlib.chdir(home):
        MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_experiments()
    return home / "mlflow.db"


def new_store(path: Path) -> str:
    """The URI of the SQLite MLflow store at ``path``, which starts as a copy of ``empty_store()`` when there is none
    yet (a run then opens a store as MLflow made it, not migrating one of its own). Experiments created in it take
    their artifact roots from the process that creates them, as in any store."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_store(), path)
    return f"sqlite:///{path}"


def row(rid: Any, label: str | None = "long", **features: Any) -> dict[str, Any]:
    """One record as written to JSONL; features default to a single valid value."""
    out = {"id": rid, "features": features or {"x": 1}}
    if label is not None:
        out["label"] = label
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any] | str | bytes]) -> Path:
    """Dicts are JSON-encoded; str and bytes lines are written verbatim (for malformed input)."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_table(path: Path, rows: list[dict[str, Any]], id_column: str = "id", label_column: str = "label") -> Path:
    """Flat rows (id, label, features side by side; None = null/empty) in the format of ``path``'s suffix: JSONL
    records, CSV as a pandas export writes it, or Parquet with one arrow type per column."""
    if path.suffix == ".jsonl":
        return write_jsonl(
            path,
            [
                {
                    "id": r[id_column],
                    "label": r[label_column],
                    "features": {k: v for k, v in r.items() if k not in (id_column, label_column)},
                }
                for r in rows
            ],
        )
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def compose_train(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed as ``python train.py <overrides>`` would compose it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def typed_conf(*overrides: str):
    """The typed config a run reads (``config.check`` ▸ ``config.typed``) for ``python train.py <overrides>``; the
    run dir, which only the Hydra app knows, is a placeholder."""
    from loralab import config

    return config.typed(config.check(compose_train("paths.output_dir=unused", *overrides)))


@functools.cache
def shipped_conf():
    """The typed config of ``python train.py`` with no overrides (composed once per session)."""
    return typed_conf()


def trainer_conf(
    max_epochs: int = 1,
    *,
    monitor: str = "acc",
    mode: str = "max",
    patience: int = 100,
    min_delta: float = 0.0,
    grace: int = 0,
    **knobs: Any,
):
    """The shipped ``trainer`` settings (conf/trainer/default.yaml) for a loop test: these values in place, raw
    (unsmoothed) early stopping watching from the first evaluation unless ``grace`` says otherwise, the step-level
    knobs and gates off unless ``knobs`` set them."""
    from loralab.config.choices import MonitorMode

    base = shipped_conf().trainer
    stopping = dataclasses.replace(
        base.early_stopping, patience=patience, patience_steps=0, min_delta=min_delta, smoothing=0.0, grace=grace
    )
    values = dict(
        max_epochs=max_epochs,
        monitor=monitor,
        monitor_mode=MonitorMode(mode),
        early_stopping=stopping,
        gates=None,
        log_every_n_steps=None,
        val_check_interval=None,
        max_steps=None,
    )
    return dataclasses.replace(base, **{**values, **knobs})


def optim_conf(
    optimizer: str = "torch.optim.SGD",
    *,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    scheduler: str = "constant",
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = None,
):
    """The shipped ``optim`` settings with ``optimizer`` (a class path), a constant lr and no clipping unless
    given."""
    base = shipped_conf().optim
    return dataclasses.replace(
        base,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        scheduler=scheduler,
        max_grad_norm=max_grad_norm,
        optimizer=dataclasses.replace(base.optimizer, _target_=optimizer, lr=lr, weight_decay=weight_decay),
    )


def run_result(**values: Any):
    """A ``RunResult`` of a one-epoch run, with ``values`` in place of the defaults."""
    from loralab.result import RunResult

    base = dict(
        task="classification",
        objective_key="val_macro_f1",
        objective=0.5,
        best_epoch=1,
        best_step=1,
        best={"val_macro_f1": 0.5, "val_loss": 1.0},
        stop_reason="max_epochs",
        epochs_run=1,
        history=[],
        val_checks=[],
        wall_time_s=1.0,
        fit_time_s=1.0,
        train_samples_per_s=10.0,
        optimizer_steps=1,
        skipped_steps=0,
        accumulation_steps=1,
        max_epochs=1,
        device="cpu",
        world_size=1,
        resumed_from=None,
        provenance={},
        run_dir="/r",
    )
    return RunResult(**{**base, **values})


def tiny_run_overrides(tmp: Path, train_file: Path, val_file: Path, test_file: Path) -> list[str]:
    """A one-epoch LoRA run of the tiny model on these JSONL files (no pretrain stage, a quick baseline), its run
    dir ``tmp/run`` and its store ``tmp/mlflow.db``: the in-process runs that a module's serving tests share."""
    return [
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        "pretrain=none",
        f"data.test_file={test_file}",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        "optim.batch_size=8",
        "baseline.threads=1",
        "baseline.params.max_iter=20",
        f"paths.output_dir={tmp / 'run'}",
        f"tracking.uri={new_store(tmp / 'mlflow.db')}",
        "data.cache_dir=null",
        "quiet=true",
    ]


def run_trains(*runs: tuple[Path, list[str]]) -> list[tuple[int, str]]:
    """``python train.py`` subprocesses on the tiny model, each with its run dir, MLflow store and artifact root
    (``./mlruns`` of its working dir) under its ``run_dir``; returns (exit code, console output) per run. All start
    at once and use one thread each, so on a small machine they share the cores instead of oversubscribing them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORALAB_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for run_dir, overrides in runs:
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"hydra.run.dir={run_dir}",
            f"tracking.uri=sqlite:///{run_dir}/mlflow.db",
            "model.tokenizer_vocab_size=300",
            "trainer.max_epochs=2",
            *overrides,
        ]
        with (run_dir / "console.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT))
    return [(proc.wait(timeout=600), (run_dir / "console.log").read_text()) for proc, (run_dir, _) in zip(procs, runs)]


def compose_run(
    tmp_path: Path,
    name: str,
    *extra: str,
    n_train: int = 32,
    n_val: int = 16,
    lora: str = "default",
    max_length: int = 48,
) -> DictConfig:
    """A LoRA run of one short epoch on small demo files in ``tmp_path/data``, its run dir ``tmp_path/name`` and
    its MLflow store ``tmp_path/mlflow.db``, composed for ``lifecycle.run`` (in process)."""
    train_file, val_file = write_demo(tmp_path / "data", n_train=n_train, n_val=n_val)
    overrides = [
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        f"lora={lora}",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        f"model.max_length={max_length}",
        "optim.batch_size=8",
        f"paths.output_dir={tmp_path / name}",
        f"tracking.uri={new_store(tmp_path / 'mlflow.db')}",
        *extra,
    ]
    return compose_train(*overrides)


TIMINGS = ("train_samples_per_s", "epoch_train_time_s", "eval_samples_per_s")


def history(run_dir: Path) -> list[dict[str, Any]]:
    """A run's evaluations (``training_summary.json``) without the timings, which differ between equal runs."""
    return [
        {k: v for k, v in h.items() if k not in TIMINGS}
        for h in json.loads((run_dir / "training_summary.json").read_text())["history"]
    ]


def assert_same_run(a: Path, b: Path) -> None:
    """Val metrics and weights identical. The logged train loss of an epoch interrupted mid-way is summed in a
    different grouping (the running sum is flushed at the interrupt), so it matches to float rounding only."""
    import torch
    from safetensors.torch import load_file

    ha, hb = history(a), history(b)
    assert [{k: v for k, v in h.items() if k != "train_loss"} for h in ha] == [
        {k: v for k, v in h.items() if k != "train_loss"} for h in hb
    ]
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-6)
    wa, wb = (load_file(d / "checkpoints" / "last" / "weights.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def checkout_mlruns() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / "mlruns").rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Tests never write into the checkout. A SQLite store created without an artifact root puts artifacts under
    ``./mlruns`` of the working dir, so test-run and module fixtures work in a temporary dir, each test in its own
    (``own_cwd``), subprocess runs in their run's dir; and the test run fails if the checkout's ``mlruns/`` gained
    anything anyway."""
    before = checkout_mlruns()
    previous = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
    added = checkout_mlruns() - before
    assert not added, f"tests wrote into the checkout's mlruns/: {sorted(added)[:5]}"


@pytest.fixture(autouse=True)
def own_cwd(tmp_path, monkeypatch):
    """Each test works in its own temporary dir: an in-process store's default artifact root is its own."""
    monkeypatch.chdir(tmp_path)


# Malformed lines appended to the end-to-end train file, each with the drop reason it must be counted under.
BAD_TRAIN_LINES = [
    ("invalid_json", '{"id": "bad-1", "features": '),
    ("unknown_label", json.dumps(row("bad-2", "maybe"))),
    ("non_finite_value", '{"id": "bad-3", "features": {"x": NaN}, "label": "long"}'),
    ("missing_features", json.dumps({"id": "bad-4", "label": "skip"})),
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Any]:
    """Small demo train/val files; train gets the malformed lines above, a blank line and one val row (a leak)."""
    out = tmp_path_factory.mktemp("tiny_data")
    train, val = write_demo(out, n_train=80, n_val=30)
    clean = [json.loads(line) for line in train.read_text().splitlines()]
    leaked = json.loads(val.read_text().splitlines()[0])
    write_jsonl(train, [*clean, leaked, "", *(line for _, line in BAD_TRAIN_LINES)])
    return {
        "train": train,
        "val": val,
        "train_rows": [*clean, leaked],
        "leaked_id": leaked["id"],
        "val_rows": [json.loads(line) for line in val.read_text().splitlines()],
    }


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees one CUDA device of ``fake_cuda(gib, bf16)`` GiB (default 80, bf16), so GPU profiles and ``auto``
    can be checked and resolved on a CPU-only machine. Nothing may allocate on it."""
    import torch

    def use(gib: float = 80.0, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=int(gib * 2**30))
        )

    use()
    return use


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must not inherit this process's MLflow target."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **extra}


def serve_predictions(model_uri: str, tracking_uri: str, records: list[dict], home: Path) -> list[dict]:
    """``mlflow models serve -m MODEL_URI --env-manager local`` on 127.0.0.1, as the docs show: POST ``records``
    to /invocations and return its predictions; the server is stopped whatever happens."""
    import urllib.request

    from loralab.tracking.server import free_port, stop, wait_for

    port = free_port()
    bin_dir = Path(sys.executable).parent  # the venv's uvicorn, which `mlflow models serve` runs, as if activated
    env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with (home / "serve.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_for(f"http://127.0.0.1:{port}/ping", timeout_s=300, proc=proc)
            except (RuntimeError, TimeoutError) as err:
                raise AssertionError((home / "serve.log").read_text()[-3000:]) from err
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                json.dumps({"dataframe_records": records}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.load(response)["predictions"]
        finally:
            stop(proc)
