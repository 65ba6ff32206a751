"""Sweeps end to end: Hydra multirun → one MLflow parent, a child per job, a summary; plus the configs composing.

The sweep tests run ``train.py -m`` in a subprocess on the tiny model (1 epoch, a few dozen rows) against a
temporary SQLite store, exactly as a user would.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
from conftest import new_store
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from loralab.cli.compare import main as compare_main
from loralab.data.demo import write_demo
from loralab.reporting import compare, runs
from loralab.tracking.mlflow import MLflowTracker
from loralab.tracking.sweep import close_orphans, get_or_create_parent, read_parent

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_demo(out, n_train=30, n_val=15)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module; each test uses its own experiment."""
    return new_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def run_train(tmp: Path, data: Path, uri: str, *overrides: str, multirun: bool = True) -> subprocess.CompletedProcess:
    """``train.py [-m]`` on ``data``: a dir with train.jsonl and val.jsonl, or one file to carve val from."""
    files = (
        [f"data.train_file={data}"]
        if data.is_file()
        else [
            f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'val.jsonl'}",
        ]
    )
    base = [
        "data=jsonl",
        *files,
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        "export.zip=false",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        f"hydra.run.dir={tmp / 'run'}",
        f"tracking.uri={uri}",
        f"tracking.experiment={tmp.name}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "train.py"), *(["-m"] if multirun else []), *base, *overrides]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def sweep_result(tmp: Path, proc: subprocess.CompletedProcess, failed: int = 0):
    """The sweep's parent and child runs; its exit code is 0 only when no job failed, else 1 and it says so."""
    assert proc.returncode == (1 if failed else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    if failed:
        assert f"{failed} of " in proc.stdout + proc.stderr and "sweep jobs failed" in proc.stdout + proc.stderr
    record = read_parent(tmp / "multirun")
    assert record is not None, "no parent record in the sweep dir"
    client = MlflowClient(record["uri"])
    return client, record["run_id"], runs.child_runs(client, record["run_id"])


def summary_csv(client: MlflowClient, parent_id: str, tmp: Path) -> list[dict[str, str]]:
    path = client.download_artifacts(parent_id, "summary/sweep_summary.csv", str(tmp))
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


# --- the sweeps (subprocess, tiny model) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_failing_job_is_a_failed_child_and_the_sweep_goes_on(tmp_path, demo_files, store, capsys):
    proc = run_train(tmp_path, demo_files, store, "loss.gamma=1.0,-1.0")
    client, parent_id, children = sweep_result(tmp_path, proc, failed=1)  # it finished, and exits 1

    by_gamma = {c.data.params["loss.gamma"]: c for c in children}
    assert by_gamma["1.0"].info.status == "FINISHED"
    failed = by_gamma["-1.0"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error_type"] == "ConfigError" and "loss.gamma" in failed.data.tags["error"]

    rows = {r["run_id"]: r for r in summary_csv(client, parent_id, tmp_path)}
    assert rows[failed.info.run_id]["status"] == "FAILED"
    assert "loss.gamma" in rows[failed.info.run_id]["error"]
    assert math.isnan(float(rows[failed.info.run_id]["objective"]))
    assert "| FAILED |" in (tmp_path / "multirun" / "sweep_summary.md").read_text()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_failed"] == 1

    capsys.readouterr()
    assert compare_main([str(tmp_path / "multirun" / "0")]) == 0  # a job dir finds its sweep
    table = capsys.readouterr().out
    assert table.index("FINISHED") < table.index("FAILED")  # best objective first, failed last


@pytest.mark.slow
def test_a_sweep_in_which_no_job_finished_ends_its_parent_failed(tmp_path, demo_files, store):
    proc = run_train(tmp_path, demo_files, store, "loss.gamma=-1.0,-2.0")
    client, parent_id, children = sweep_result(tmp_path, proc, failed=2)
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.metrics["jobs_failed"] == 2
    assert "best.objective" not in parent.data.metrics


@pytest.mark.slow
def test_optuna_sweep_runs_its_trials_and_optimises_the_returned_objective(tmp_path, demo_files, store):
    proc = run_train(tmp_path, demo_files, store, "sweep=optuna", "hydra.sweeper.n_trials=3")
    client, parent_id, children = sweep_result(tmp_path, proc)
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert len({c.data.params["loss.gamma"] for c in children}) == 3  # TPE sampled three points

    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    best = max(children, key=lambda c: c.data.metrics["best.val_macro_f1"])
    assert results.best_value == pytest.approx(best.data.metrics["best.val_macro_f1"])
    assert str(results.best_params["loss.gamma"]) == best.data.params["loss.gamma"]


@pytest.mark.slow
def test_single_run_with_a_bad_value_still_exits_non_zero(tmp_path, demo_files, store):
    proc = run_train(tmp_path, demo_files, store, "loss.gamma=-1.0", multirun=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "loss.gamma=-1.0" in proc.stdout + proc.stderr
    # A single run fails before any MLflow run exists (a typo leaves no noise); only sweep jobs record FAILED runs.
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(tmp_path.name)
    assert experiment is None or not client.search_runs([experiment.experiment_id])


# --- parent-run plumbing and the summary (real SQLite MLflow, no training) -----------------------------------------


def _parent_id(args):
    return get_or_create_parent(*args)


def test_parallel_processes_create_one_parent(tmp_path, store):
    with ProcessPoolExecutor(4, mp_context=get_context("fork")) as pool:
        ids = list(pool.map(_parent_id, [(tmp_path / "sweep", store, tmp_path.name)] * 4))
    assert len(set(ids)) == 1
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name(tmp_path.name).experiment_id])
    assert [r.info.run_id for r in found] == ids[:1]


def _child(
    uri: str,
    exp: str,
    parent: str,
    job: int,
    overrides: list[str],
    objective: float | None,
    status: str,
    **beside: float,
) -> str:
    tracker = MLflowTracker(uri, exp)
    tracker.start(
        {"objective": "val_macro_f1", "trainer": {"monitor_mode": "max"}},
        tags={"hydra.job.num": str(job), runs.OVERRIDES_TAG: json.dumps(overrides)},
        parent_run_id=parent,
    )
    if objective is not None:
        tracker.log_metrics({"best.val_macro_f1": objective, "best.val_f1_long": objective / 2, **beside})
    if status != "RUNNING":
        tracker.end(status)
    return tracker.run_id


def test_summary_rows_sorted_heatmap_only_for_a_grid_and_orphans_closed(tmp_path, store):
    exp = tmp_path.name
    parent = get_or_create_parent(tmp_path / "sweep", store, exp)
    values = {(1.0, 4): 0.5, (1.0, 8): 0.7, (2.0, 4): 0.6}
    for job, ((gamma, r), f1) in enumerate(values.items()):
        blended = {"ensemble.blend.oof_macro_f1": 0.8, "ensemble.weight": 0.3} if job == 1 else {}
        _child(
            store,
            exp,
            parent,
            job,
            ["lora=default", f"loss.gamma={gamma}", f"lora.r={r}"],
            f1,
            "FINISHED",
            **{"baseline.val_macro_f1": 0.65, **blended},
        )
    orphan = _child(store, exp, parent, 3, ["lora=default", "loss.gamma=2.0", "lora.r=8"], None, "RUNNING")
    client = MlflowClient(store)

    assert close_orphans(client, parent) == 1
    assert client.get_run(orphan).info.status == "FAILED"
    rows = runs.sweep_rows(store, parent)
    assert [r["objective"] for r in rows[:3]] == sorted(values.values(), reverse=True)
    assert rows[-1]["status"] == "FAILED" and rows[-1]["error"]
    assert compare.swept_keys(rows) == ["loss.gamma", "lora.r"]  # lora=default is constant
    paths = compare.write_summary(rows, tmp_path)
    assert [p.name for p in paths] == ["sweep_summary.csv", "sweep_summary.md", "sweep_summary_heatmap.png"]
    assert compare.heatmap(rows[:3], tmp_path / "partial.png") is None  # 3 of 4 grid points: not a grid
    # What ran beside the model: the baseline for every run that fitted one, the blend only where a job blended.
    header, cells = compare.columns(rows)
    assert header[-4:] == ["baseline_macro_f1", "blend_oof_f1", "blend_weight", "error"]
    assert [c[-4:-1] for c in cells[:3]] == [["0.6500", "0.8000", "0.3000"], ["0.6500", "", ""], ["0.6500", "", ""]]
    table = (tmp_path / "sweep_summary.csv").read_text().splitlines()
    assert "baseline_macro_f1,blend_oof_f1,blend_weight" in table[0] and ",0.65,0.8,0.3," in table[1]


# --- configs compose (compose API) ---------------------------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_gamma_rank_sweep_is_the_three_by_three_grid():
    cfg = _compose("sweep=gamma_rank")
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    assert len(jobs) == 9
    values = [dict(o.split("=", 1) for o in job) for job in jobs]
    assert {(v["loss.gamma"], v["lora.r"]) for v in values} == set(product(["1.0", "1.5", "2.0"], ["8", "16", "32"]))
    job = _compose(*jobs[-1])  # a job of the grid composes with LoRA on (the default; no lora=... needed)
    assert job.lora.r == 32 and job.loss.gamma == 2.0
    # the tiny model decides by rows: the demo's are under lora.full_from_rows, so every job trains its adapters
    demo_rows = inspect.signature(write_demo).parameters["n_train"].default
    assert job.lora.enabled == "auto" and demo_rows < job.lora.full_from_rows


def test_optuna_sweep_config():
    cfg = _compose("sweep=optuna", "hydra.sweeper.n_trials=7")
    s = cfg.hydra.sweeper
    assert s._target_.endswith("OptunaSweeper") and s.sampler._target_.endswith("TPESampler")
    assert s.direction == "maximize" and s.n_trials == 7
    # monitor_mode=min (losses, errors): Optuna minimises the objective
    assert _compose("sweep=optuna", "trainer.monitor_mode=min").hydra.sweeper.direction == "minimize"
    assert s.sampler.seed == cfg.seed
    assert set(s.params) == {"loss.gamma", "optim.lr"}


@pytest.mark.parametrize(
    "launcher, keys, target",
    [
        ("local_parallel", {"n_jobs": 3}, "JoblibLauncher"),
        ("slurm", {"partition": "gpu", "gpus_per_node": 2, "timeout_min": 30}, "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose_with_sweeps(launcher, keys, target):
    cfg = _compose(f"hydra/launcher={launcher}", "sweep=optuna", *(f"hydra.launcher.{k}={v}" for k, v in keys.items()))
    assert cfg.hydra.launcher._target_.endswith(target)
    assert {k: cfg.hydra.launcher[k] for k in keys} == keys
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.callbacks.sweep_tracking._target_ == "loralab.tracking.sweep_callback.SweepTracking"


# --- walk-forward folds: a sweep over data.fold summarised per setting -------------------------------------------


def test_a_sweep_over_folds_is_summarised_per_setting_mean_std_worst(tmp_path, store, capsys):
    exp = tmp_path.name
    parent = get_or_create_parent(tmp_path / "sweep", store, exp)
    scores = {("4", "1"): 0.6, ("4", "2"): 0.8, ("4", "3"): 0.7, ("8", "1"): 0.9, ("8", "2"): 0.4, ("8", "3"): None}
    for job, ((r, fold), f1) in enumerate(scores.items()):
        overrides = ["data.split=walk_forward", f"lora.r={r}", f"data.fold={fold}"]
        _child(store, exp, parent, job, overrides, f1, "FINISHED" if f1 is not None else "FAILED")
    rows = runs.sweep_rows(store, parent)
    settings = compare.fold_settings(rows)
    # Ranked by the mean over folds, not by the best single job (r=8's fold 1 is the best job at 0.9).
    assert [s["setting"]["lora.r"] for s in settings] == ["4", "8"]
    four, eight = settings
    assert four["mean"] == pytest.approx(0.7) and four["std"] == pytest.approx(np.std([0.6, 0.8, 0.7]))
    assert four["worst"] == pytest.approx(0.6) and four["folds"] == ["1", "2", "3"] and four["failed"] == 0
    assert eight["mean"] == pytest.approx(0.65) and eight["failed"] == 1 and eight["worst"] == pytest.approx(0.4)
    paths = {p.name: p for p in compare.write_summary(rows, tmp_path)}
    by_setting = list(csv.DictReader(io.StringIO(paths["sweep_summary_by_setting.csv"].read_text())))
    assert [(r["lora.r"], r["folds"], r["failed"]) for r in by_setting] == [("4", "1 2 3", "0"), ("8", "1 2", "1")]
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "Per setting over data.fold" in markdown and "| 4 | 1 2 3 | 0.7000 | 0.0816 | 0.6000 | 0 |" in markdown
    compare.print_table(rows, "folds")
    assert "per setting over data.fold" in capsys.readouterr().out
    assert compare.fold_settings([r for r in rows if r["override_values"]["data.fold"] == "1"]) == []


def time_ordered_trades(path: Path, n: int = 90) -> Path:
    """Demo records with trade ids that carry their day (3 records a day through November 2025), in time order."""
    rows = write_demo(path.parent / "plain", n_train=n, n_val=1)[0].read_text().splitlines()
    out = []
    for i, line in enumerate(rows):
        record = json.loads(line)
        record["id"] = f"6E-M1-202511{1 + i // 3:02d}-{12345 + i}"
        out.append(json.dumps(record))
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.slow
def test_walk_forward_sweep_reports_mean_std_and_worst_over_its_folds(tmp_path, store):
    data = time_ordered_trades(tmp_path / "trades.jsonl")
    proc = run_train(
        tmp_path,
        data,
        store,
        "pretrain=none",
        "baseline=none",
        "calibration=none",
        "trainer.max_steps=3",
        "data.split=walk_forward",
        "data.time_key=id",
        r"data.time_pattern='-(\d{8})-'",
        "data.time_format=%Y%m%d",
        "data.label_horizon=1",
        "data.folds=4",
        "data.fold=range(1,4)",
    )
    client, parent_id, children = sweep_result(tmp_path, proc)
    assert sorted(c.data.params["data.fold"] for c in children) == ["1", "2", "3"]
    # 4 blocks of 23, 23, 22, 22 records; a one-day horizon purges the train rows of the day before a block
    # starts and of its first day: 3 + 2 before block 1 (it starts on its day's third record), 3 + 1, 3 + 2.
    purged = {c.data.params["data.fold"]: c.data.metrics["split.purged"] for c in children}
    assert purged == {"1": 5, "2": 4, "3": 5}
    assert {c.data.tags["split.val_time"][:10] for c in children} == {"2025-11-08", "2025-11-16", "2025-11-23"}
    parent = client.get_run(parent_id)
    f1 = [c.data.metrics["best.val_macro_f1"] for c in children]
    assert parent.data.metrics["folds.mean.val_macro_f1"] == pytest.approx(np.mean(f1))
    assert parent.data.metrics["folds.std.val_macro_f1"] == pytest.approx(np.std(f1))
    assert parent.data.metrics["folds.worst.val_macro_f1"] == pytest.approx(min(f1))
    assert parent.data.tags["best_setting_folds"] == "1 2 3"
    settings = (tmp_path / "multirun" / "sweep_summary_by_setting.csv").read_text().splitlines()
    assert len(settings) == 2 and ",1 2 3," in settings[1]
    report = json.loads((tmp_path / "multirun" / "1" / "data_report.json").read_text())["time_split"]
    assert report["fold"] == 2 and report["train"]["rows"] + report["purged"] == 46 and report["val"]["rows"] == 22
