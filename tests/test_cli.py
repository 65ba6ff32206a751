"""The command-line tools: one key=value style, --help from the options dataclass, one-line errors with exit 2."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.cli import args as cli_args
from loralab.paths import conf_dir

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {  # module -> options its --help must list
    "predict": [
        "model",
        "input",
        "output",
        "batch_size",
        "device",
        "trust_remote_code",
        "format",
        "id_column",
        "label_column",
    ],
    "evaluate": ["model", "input", "output", "prefix", "batch_size", "device", "format", "id_column", "label_column"],
    "prepare": [
        "input",
        "output_dir",
        "train_ratio",
        "val_ratio",
        "test_ratio",
        "seed",
        "score_tiers",
        "format",
        "id_column",
        "label_column",
    ],
    "compare": ["target", "tracking_uri"],
    "preflight": ["model", "lora", "hardware", "experiment"],
}


def tool_main(name: str):
    return importlib.import_module(f"loralab.cli.{name}").main


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    return lines[0]


@pytest.mark.parametrize("name", TOOLS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_option_and_exits_0(name, flag, capsys):
    assert tool_main(name)(["x=1", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: loralab-{name} ")
    description = out.split("\n\n")[1]
    assert len(description.split()) > 15  # a paragraph, not a stub
    option_lines = out.split("options (key=value):\n")[1].splitlines()
    for option in TOOLS[name]:
        line = next(line for line in option_lines if line.split()[0] == option)
        assert len(line.split()) >= 4, line  # name, type, default or "required", help


def test_help_shows_types_defaults_and_required(capsys):
    tool_main("evaluate")(["--help"])
    options = capsys.readouterr().out.split("options (key=value):\n")[1]
    rows = {line.split()[0]: line.split()[1:3] for line in options.splitlines()}
    assert rows["model"] == ["str", "required"] and rows["batch_size"] == ["int", "64"]
    assert rows["output"] == ["str|null", "null"] and rows["trust_remote_code"] == ["bool", "false"]


@pytest.mark.parametrize(
    "name, argv, key",
    [
        ("predict", ["model=m.zip", "input=in.jsonl"], "missing output="),
        ("evaluate", [], "missing model=..., input=..."),
        ("prepare", ["input=a.jsonl"], "missing output_dir="),
        ("compare", [], "missing target="),
        ("predict", ["model=m", "input=i", "output=o", "batch_size=many"], "batch_size: "),
        ("prepare", ["input=a", "output_dir=b", "seeds=3"], "seeds: unknown option"),
        ("evaluate", ["model=m", "input=i", "trust_remote_code=maybe"], "trust_remote_code: "),
        ("predict", ["model.zip"], "'model.zip': expected key=value"),
        ("compare", ["sweep_a", "sweep_b"], "'sweep_b': expected key=value"),
        ("preflight", ["model=no_such_model"], "model/no_such_model"),
        ("preflight", ["hardware"], "hardware"),
    ],
)
def test_bad_or_missing_option_is_one_line_and_exit_2(name, argv, key, capsys):
    assert tool_main(name)(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"loralab-{name}: error: ") and key in line


def test_errors_of_the_work_itself_are_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "features": {"x": 1}, "label": "a"}\n')
    assert tool_main("predict")([f"model={tmp_path / 'none.zip'}", f"input={src}", f"output={tmp_path / 'o'}"]) == 2
    assert "ExportError: model not found" in one_line_error(capsys)
    assert tool_main("predict")([f"model={tmp_path / 'none.zip'}", "input=i", "output=o"]) == 2
    assert "DataError: i: file not found" in one_line_error(capsys)  # paths are checked before the model loads
    argv = [f"input={src}", f"output_dir={tmp_path / 'out'}", "train_ratio=0.5", "val_ratio=0.2", "test_ratio=0.2"]
    assert tool_main("prepare")(argv) == 2
    assert "ConfigError: ratios=" in one_line_error(capsys) and not (tmp_path / "out").exists()
    assert tool_main("compare")([str(tmp_path)]) == 2  # a dir without a sweep record
    assert "holds no sweep parent record" in one_line_error(capsys)


def test_compare_takes_its_target_bare_or_as_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an experiment name is looked up in ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LORALAB_ROOT", raising=False)
    for argv in (["no_such_experiment"], ["target=no_such_experiment"]):
        assert tool_main("compare")(argv) == 2
        assert f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'} (no such file)" in one_line_error(capsys)
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    for env in ({"MLFLOW_TRACKING_URI": uri}, {}):  # from the environment or given: never created empty
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert tool_main("compare")(["no_such_experiment", *([] if env else [f"tracking_uri={uri}"])]) == 2
        assert f"no MLflow store at {uri}" in one_line_error(capsys)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "other.db").exists()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # the store exists now, without that experiment
    assert tool_main("compare")(["no_such_experiment", f"tracking_uri={uri}"]) == 2
    assert "no MLflow experiment 'no_such_experiment'" in capsys.readouterr().err.splitlines()[-1]


def test_preflight_fits_and_misfits(capsys):
    main = tool_main("preflight")
    assert main(["model=qwen2_5_0_5b", "hardware=rtx3050"]) == 0
    assert capsys.readouterr().out.startswith("fits: qwen2_5_0_5b (lora=r=8) on hardware=rtx3050")
    assert main(["model=qwen2_5_7b", "hardware=rtx3050", "lora=none"]) == 1
    line = one_line_error(capsys)
    assert "qwen2_5_7b (lora=none)" in line and "> 4.0 GiB" in line
    assert main(["model=qwen2_5_0_5b", "hardware=rtx3050", "hardware.precision=fp8"]) == 1
    assert "hardware.precision='fp8'" in one_line_error(capsys)
    assert main(["experiment=marketsentinel"]) == 0  # an MLP: nothing to estimate
    assert "nothing to check" in capsys.readouterr().out


def test_preflight_turns_lora_on_for_a_lora_key_like_training(capsys):
    assert tool_main("preflight")(["model=qwen2_5_0_5b", "lora.r=4"]) == 0  # LoRA is on by default
    assert "(lora=r=4)" in capsys.readouterr().out
    assert tool_main("preflight")(["model=tiny_qwen2", "lora.r=4"]) == 0  # the training rows will decide
    assert "(lora=auto: r=4 under 5000 training rows, none from there)" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_py_shim_keeps_the_old_spelling():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "model=m.zip", "input=in.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "loralab-predict: error: missing output=... (required; see loralab-predict --help)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("override", ["lora.rank=16", "+lora.rank=16"])
def test_an_unknown_key_is_one_line_and_exit_2_with_or_without_plus(override, tmp_path):
    """Without ``+`` Hydra refuses the override itself (five lines, exit 1, before loralab runs); with it the schema
    does. Either way: the same one line and exit 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), override, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "ConfigError" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].endswith(
        "ConfigError: lora.rank=16: unknown key (known: enabled, task_type, r, lora_alpha, lora_dropout, "
        "target_modules, bias, full_from_rows, full_lr)"
    )


def test_conf_dir_is_the_checkout_conf_here():
    assert conf_dir() == ROOT / "conf" and (conf_dir() / "train.yaml").is_file()


def test_outputs_mlflow_and_demo_data_resolve_against_the_current_directory(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.delenv("LORALAB_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.paths.root_dir == str(tmp_path)
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.data.train_file == f"{tmp_path}/data/demo/train.jsonl"
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/outputs/") and cfg.hydra.sweep.dir.startswith(
        f"{tmp_path}/multirun/"
    )
    monkeypatch.setenv("LORALAB_ROOT", "/shared/loralab")
    assert cfg.tracking.uri == "sqlite:////shared/loralab/mlflow.db"


def test_dataclass_post_init_errors_are_usage_errors():
    from dataclasses import dataclass

    @dataclass
    class Opts:
        n: int = cli_args.option(1, "a positive number")

        def __post_init__(self):
            if self.n <= 0:
                raise ValueError(f"n={self.n}: must be > 0")

    tool = cli_args.Tool("loralab-x", "test tool", Opts)
    assert cli_args.parse(tool, ["n=3"]) == Opts(3)
    with pytest.raises(cli_args.UsageError, match=r"^n=-1: must be > 0$"):
        cli_args.parse(tool, ["n=-1"])
