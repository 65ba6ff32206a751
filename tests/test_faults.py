"""Faults users hit: a corrupt checkpoint, a resume with other settings, a huge row, file-system errors.
Each is one line naming the key or path, raised before anything loads where it can be checked up front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import LABELS, ROOT, compose_train
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from safetensors.torch import load_file
from test_export import lora_export, tiny_model  # noqa: F401  (a fixture: a tiny exported LoRA model)

from loralab.cli.evaluate import main as evaluate_main
from loralab.cli.predict import main as predict_main
from loralab.config import check
from loralab.config.changes import changed, describe, refused
from loralab.core.checkpoint import CHECKSUMS, STATE, WEIGHTS, load_train_state, load_weights, save_train_state
from loralab.data.demo import write_demo
from loralab.data.prepare import PrepareConfig, prepare
from loralab.data.records import MAX_ROW_BYTES, load_records
from loralab.data.splits import build_splits
from loralab.data.text import MAX_CHARS_PER_TOKEN, clip, serialize, tokenize
from loralab.errors import CheckpointError, ConfigError
from loralab.inference import evaluate_file, predict_file
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


# --- checkpoint checksums -------------------------------------------------------------------------------------------


def linear_parts():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return dict(
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )


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


# --- resume with other settings ----------------------------------------------------------------------------------


def test_changed_keys_ignore_how_a_run_is_driven_and_allow_by_key_or_group():
    saved_cfg = {
        "optim": {"lr": 1e-3, "batch_size": 8},
        "hardware": {"torch_threads": None, "precision": "fp32"},
        "resume": None,
        "paths": {"output_dir": "/a"},
        "tracking": {"uri": "sqlite:///a.db"},
    }
    used = {
        "optim": {"lr": 1e-2, "batch_size": 8},
        "hardware": {"torch_threads": 2, "precision": "bf16"},
        "resume": "auto",
        "paths": {"output_dir": "/b"},
        "tracking": {"uri": "sqlite:///b.db"},
    }
    changes = changed(saved_cfg, used)
    assert changes == {"optim.lr": (1e-3, 1e-2), "hardware.precision": ("fp32", "bf16")}
    assert refused(changes, False) == ["hardware.precision", "optim.lr"]
    assert refused(changes, ["optim"]) == ["hardware.precision"]
    assert refused(changes, True) == []
    assert describe(changes) == "hardware.precision: 'fp32' -> 'bf16', optim.lr: 0.001 -> 0.01"


def test_a_config_saved_before_a_key_existed_resumes_under_the_value_it_ran_with():
    """``hardware.packing`` is newer than some checkpoints: theirs ran padded, so padded resumes them unchanged."""
    saved_cfg = {"hardware": {"precision": "fp32"}}
    assert changed(saved_cfg, {"hardware": {"precision": "fp32", "packing": False}}) == {}
    assert changed(saved_cfg, {"hardware": {"precision": "fp32", "packing": True}}) == {
        "hardware.packing": (False, True)
    }


@pytest.mark.parametrize(
    ("value", "ok"), [("true", True), ("false", True), ("[optim.lr,data]", True), ("maybe", False), ("[1]", False)]
)
def test_resume_allow_changes_is_true_false_or_keys(value, ok):
    if ok:
        check(compose_train(f"resume_allow_changes={value}"))
        return
    with pytest.raises(ConfigError) as err:
        check(compose_train(f"resume_allow_changes={value}"))
    assert one_line(err).startswith("resume_allow_changes=")
    assert "must be true, false or a list of keys" in str(err.value)


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
    cfg = compose_train(
        "data=jsonl",
        f"data.train_file={train}",
        f"data.val_file={val}",
        "data.cache_dir=null",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=48",
        "export.zip=false",
        "baseline=none",
        "quiet=true",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        *overrides,
    )
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
    """A truncated last/trainer_state.pt used to be a traceback before the run reopened (it stayed KILLED). Now one
    line, before the run is reopened: a FINISHED run stays FINISHED (its results stand); one that had not finished
    (KILLED here) ends FAILED with the error, so the UI says why it cannot go on."""
    path = copy_of["run"] / "checkpoints" / "last" / name
    damage(path)
    with pytest.raises(CheckpointError) as err:
        copy_of["resume"]()
    assert one_line(err).startswith(f"{path}: ")
    state, tags = status(copy_of)
    assert state == "FINISHED" and "error" not in tags
    copy_of["client"].set_terminated(copy_of["run_id"], "KILLED")
    with pytest.raises(CheckpointError):
        copy_of["resume"]()
    state, tags = status(copy_of)
    assert state == "FAILED" and tags["error"].startswith(f"CheckpointError: {path}: ")


@pytest.mark.slow
def test_a_resume_that_succeeds_after_a_failed_one_clears_the_error_tag(copy_of):
    path = copy_of["run"] / "checkpoints" / "last" / STATE
    intact = path.read_bytes()
    truncate(path)
    with pytest.raises(CheckpointError):
        copy_of["resume"]()
    path.write_bytes(intact)
    copy_of["resume"]()
    state, tags = status(copy_of)
    assert state == "FINISHED" and "error" not in tags and "error_type" not in tags


@pytest.mark.slow
def test_a_corrupt_ranked_epoch_is_refused_by_name_not_skipped(copy_of):
    """``last`` is fine but the top-k epoch the best model would be reloaded from is not: refused up front, by
    path, rather than training on and choosing the best among the rest."""
    path = copy_of["run"] / "checkpoints" / "epoch_001" / WEIGHTS
    flip_bit(path, -4)
    with pytest.raises(CheckpointError) as err:
        copy_of["resume"]()
    assert one_line(err).startswith(f"{path}: sha256 does not match")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"id,features,label", "invalid_json"),  # a CSV export fed as JSONL: header ...
        (b"7,x=1,long", "invalid_json"),  # ... and rows
        (b"[" * 10_000 + b"]" * 10_000, "invalid_json"),  # nesting past Python's recursion limit
        (json.dumps({"id": [1], "features": {"x": 1}, "label": "long"}).encode(), "missing_id"),  # a list id
    ],
    ids=["csv-header", "csv-row", "deep-nesting", "list-id"],
)
def test_hostile_lines_are_dropped_and_counted(tmp_path, line, reason):
    good = json.dumps({"id": 1, "features": {"x": 1}, "label": "long"}).encode()
    (tmp_path / "f.jsonl").write_bytes(line + b"\n" + good + b"\n")
    records, report = load_records(tmp_path / "f.jsonl", LABELS)
    assert [r.id for r in records] == [1] and report.dropped == {reason: 1}


# --- one huge row -------------------------------------------------------------------------------------------------

HUGE = 20 * 2**20  # a 20 MB line: once 6+ GB of RAM and most of a minute to read and tokenize


def huge_line(rid: str = "huge") -> bytes:
    return json.dumps({"id": rid, "features": {"text": "ab " * (HUGE // 3)}, "label": "long"}).encode()


def with_huge_row(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSONL with the huge line in the middle."""
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(len(lines) // 2, huge_line())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """Peak Python heap while ``fn`` runs (tracemalloc) and its result."""
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_one_huge_row_is_dropped_unread_by_the_training_reader(tmp_path):
    rows = [{"id": i, "features": {"x": i}, "label": LABELS[i % 3]} for i in range(40)]
    path = with_huge_row(tmp_path / "train.jsonl", rows)
    peak, (records, report) = peak_bytes(load_records, path, LABELS)
    assert [r.id for r in records] == list(range(40))  # the rows after it are read as usual
    assert report.dropped == {"row_too_large": 1} and report.examples == {"row_too_large": 21}
    assert peak < 3 * MAX_ROW_BYTES  # the 20 MB line is skipped in pieces, never held whole


def test_a_line_at_the_cap_is_kept_one_byte_over_is_dropped(tmp_path):
    line = json.dumps({"id": 1, "features": {"x": "y"}, "label": "long"}).encode()
    path = tmp_path / "f.jsonl"
    path.write_bytes(line + b"\n" + line.replace(b'"id": 1', b'"id": 2') + b"\n")
    assert load_records(path, LABELS, max_row_bytes=len(line) + 1)[1].dropped == {}  # the newline counts
    records, report = load_records(path, LABELS, max_row_bytes=len(line) - 1)
    assert records == [] and report.dropped == {"row_too_large": 2}


def test_long_texts_are_cut_before_tokenizing_to_the_same_tokens():
    """Tokenizing a whole long text only to keep its first max_length tokens cost memory and time in its size."""
    _, tokenizer, _, _ = tiny_model(lora=False)
    text = serialize({"text": "alpha beta gamma " * 30_000})  # 510k characters, under the row cap
    for side in ("right", "left"):
        tokenizer.truncation_side = side
        whole = tokenizer(text, truncation=True, max_length=48)["input_ids"]
        assert tokenize([text], tokenizer, 48) == [whole]
    assert clip(text, 48, "right") == text[: 48 * MAX_CHARS_PER_TOKEN]


def test_predict_with_one_huge_row_costs_what_predict_without_it_costs(lora_export, tmp_path):  # noqa: F811
    """A 10 MB row once took predict to 2.8 GB: the row is now dropped unread, and memory and time stay flat."""
    rows = [{"id": r["id"], "features": r["features"]} for r in lora_export["rows"]]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    huge = with_huge_row(tmp_path / "huge.jsonl", rows)
    t0 = time.perf_counter()
    base, _ = peak_bytes(predict_file, lora_export["dir"], plain, tmp_path / "a.jsonl", device="cpu")
    t1 = time.perf_counter()
    peak, stats = peak_bytes(predict_file, lora_export["dir"], huge, tmp_path / "b.jsonl", device="cpu")
    t2 = time.perf_counter()
    assert stats["rows_kept"] == len(rows) and stats["dropped_by_reason"] == {"row_too_large": 1}
    assert peak < base + 3 * MAX_ROW_BYTES, (base, peak)
    assert t2 - t1 < 2 * (t1 - t0) + 5
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_train_predict_evaluate_and_prepare_drop_the_same_rows_for_the_same_reasons(lora_export, tmp_path):  # noqa
    """One reader: a row any of them drops, all of them drop, under the same reason and line number."""
    good = [
        {"id": r["id"], "features": r["features"], "label": LABELS[i % 3]} for i, r in enumerate(lora_export["rows"])
    ]
    lines = [json.dumps(r).encode() for r in good]
    bad = [
        huge_line(),
        b'{"id": "j", "features": ',
        b'{"id": "u", "features": {"x": "\xff"}, "label": "long"}',
        json.dumps(good[0]).encode(),
        b"[1, 2]",
        json.dumps({"features": {"x": 1}, "label": "long"}).encode(),
    ]
    for i, line in enumerate(bad):
        lines.insert(2 * i + 1, line)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {
        "row_too_large": 1,
        "invalid_json": 1,
        "invalid_utf8": 1,
        "duplicate_id": 1,
        "not_object": 1,
        "missing_id": 1,
    }
    reports = {
        "train": build_splits(str(path), str(path), LABELS).report["train_file"],
        "prepare": prepare(PrepareConfig(input=str(path), output_dir=str(tmp_path / "split")))["input"],
        "predict": predict_file(lora_export["dir"], path, tmp_path / "p.jsonl", device="cpu"),
        "evaluate": evaluate_file(lora_export["dir"], path, tmp_path / "m.json", device="cpu")["input"],
    }
    for name, report in reports.items():
        assert (report["rows_read"], report["rows_kept"]) == (len(lines), len(good)), name
        assert report["dropped_by_reason"] == expected, name
    assert len({json.dumps(r["first_line_by_reason"]) for r in reports.values()}) == 1
    split_text = "".join((tmp_path / "split" / f"{s}.jsonl").read_text() for s in ("train", "val", "test"))
    assert "\ufffd" not in split_text  # prepare drops invalid UTF-8 as training does, never rewrites it


# --- file-system errors -------------------------------------------------------------------------------------------

ROOT_USER = os.geteuid() == 0  # root reads and writes through permission bits unless its capabilities are dropped


def check_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        check(compose_train("data=jsonl", *overrides))
    return one_line(err)


def test_a_directory_as_train_file_says_it_is_a_directory(tmp_path):
    """It used to say "file not found"."""
    assert check_error(f"data.train_file={tmp_path}") == f"data.train_file='{tmp_path}': is a directory, not a file"


def unprivileged(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` in a process that file permissions bind. As root (CI runs so) that needs the
    capabilities that let root read and write past them dropped (``setpriv``), so users' permission errors are tested
    there too."""
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"] if ROOT_USER else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.run(
        [*drop, sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


UNREADABLE = """
import sys
from conftest import LABELS, compose_train
from loralab.config import ConfigError, check
from loralab.data.records import DataError, load_records
try:
    check(compose_train("data=jsonl", f"data.train_file={sys.argv[1]}"))
except ConfigError as err:
    print(err)
try:
    load_records(sys.argv[1], LABELS)
except DataError as err:
    print(err)
"""


@pytest.mark.slow  # a process without root's file capabilities
def test_an_unreadable_train_file_is_one_line(tmp_path):
    path = write_demo(tmp_path, n_train=10, n_val=5)[0]
    path.chmod(0)
    proc = unprivileged(UNREADABLE, str(path))
    config_line, data_line = proc.stdout.splitlines()
    assert config_line == f"data.train_file='{path}': cannot be read (Permission denied)", proc.stderr[-2000:]
    assert data_line.startswith(f"{path}: cannot be read")


@pytest.fixture
def small_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val = write_demo(tmp_path / "data", n_train=30, n_val=12)
    return lambda run_dir, *o: tiny_cfg(tmp_path, run_dir, train, val, *o)


def refused_before_mlflow(cfg, tmp_path) -> str:
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # before any MLflow run, data or model
    return one_line(err)


def test_an_unwritable_checkpoints_dir_is_refused_before_training(small_run, tmp_path):
    """It used to be a PermissionError traceback after a full epoch. (A file where the dir goes: root can make it.)"""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("in the way")
    message = refused_before_mlflow(small_run(tmp_path / "run"), tmp_path)
    assert message.startswith(f"hydra.run.dir: {tmp_path / 'run' / 'checkpoints'} is not a writable directory (")


READ_ONLY_RUN = """
import sys
from pathlib import Path
from test_faults import tiny_cfg
from loralab.errors import ConfigError
from loralab.lifecycle import run
tmp = Path(sys.argv[1])
try:
    run(tiny_cfg(tmp, tmp / "run", tmp / "data" / "train.jsonl", tmp / "data" / "val.jsonl"))
except ConfigError as err:
    print(err)
"""


@pytest.mark.slow  # a process without root's file capabilities
def test_a_read_only_checkpoints_dir_is_refused_before_training(tmp_path):
    write_demo(tmp_path / "data", n_train=30, n_val=12)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").chmod(0o555)
    proc = unprivileged(READ_ONLY_RUN, str(tmp_path))
    assert proc.stdout.strip().endswith("is not a writable directory (Permission denied)"), proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # before any MLflow run, data or model


def test_an_unusable_run_dir_or_cache_dir_is_one_line(small_run, tmp_path):
    (tmp_path / "file").write_text("x")
    message = refused_before_mlflow(small_run(tmp_path / "file" / "run"), tmp_path)
    assert message.startswith(f"hydra.run.dir: {tmp_path / 'file' / 'run'} is not a writable directory (")
    message = refused_before_mlflow(small_run(tmp_path / "run", f"data.cache_dir={tmp_path / 'file'}"), tmp_path)
    assert message.startswith(f"data.cache_dir: {tmp_path / 'file'} is not a writable directory (")


def test_predict_and_evaluate_check_options_and_paths_before_loading_the_model(tmp_path, capsys):
    """batch_size=0 and output=<a directory> were tracebacks, the latter after scoring and with a .tmp left behind.
    The model path here does not exist: each error is raised before anything tries to load it."""
    src = write_demo(tmp_path / "data", n_train=10, n_val=5)[1]
    model = f"model={tmp_path / 'absent.zip'}"
    assert predict_main([model, f"input={src}", f"output={tmp_path / 'o.jsonl'}", "batch_size=0"]) == 2
    assert capsys.readouterr().err.strip() == "loralab-predict: error: batch_size=0: must be > 0"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert predict_main([model, f"input={src}", f"output={out_dir}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"loralab-predict: error: ConfigError: output: {out_dir} is a directory; give a file path"
    )
    assert evaluate_main([model, f"input={src}", f"output={out_dir}"]) == 2
    assert f"output: {out_dir} is a directory" in capsys.readouterr().err
    assert predict_main([model, f"input={tmp_path / 'data'}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert f"DataError: {tmp_path / 'data'}: is a directory, not a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # nothing written, no .tmp
    assert list(out_dir.iterdir()) == []


def test_prepare_checks_its_output_dir_before_reading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        prepare(PrepareConfig(input=str(tmp_path / "absent.jsonl"), output_dir=str(tmp_path / "file" / "out")))
    assert one_line(err).startswith(f"output_dir: {tmp_path / 'file' / 'out'} is not a writable directory (")


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_train_py_with_an_unusable_run_or_sweep_dir_is_one_line_before_hydra_makes_it(tmp_path, multirun):
    """Hydra creates the run dir before any loralab code runs; it used to end in Hydra's traceback."""
    (tmp_path / "file").write_text("x")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *(["-m", "seed=1,2"] if multirun else []),
        f"{key}={tmp_path / 'file' / 'out'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr == f"ConfigError: {key}: {tmp_path / 'file' / 'out'} is not a writable directory (Not a "
        "directory)\n"
    )
    assert not (tmp_path / "mlflow.db").exists()
