"""The built wheel, installed into a fresh venv and run from another directory: configs inside the package, every
console script on PATH, outputs resolving against the directory the user runs in."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["loralab-predict", "loralab-evaluate", "loralab-prepare", "loralab-compare", "loralab-preflight"]


def sh(*cmd, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv holding only the wheel; dependencies come from this venv's site-packages through a plain path entry
    in a .pth, which does not run this venv's own .pth files, so an editable ``src/`` install cannot leak in."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORALAB_ROOT", "MLFLOW_TRACKING_URI")}
    built = sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        tmp / "dist",
        ROOT,
        cwd=tmp,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("loralab-*.whl")
    venv = tmp / "venv"
    assert sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp, env=env).returncode == 0
    python = venv / "bin" / "python"
    site = Path(
        sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp, env=env).stdout.strip()
    )
    (site / "_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = sh(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        wheel,
        cwd=tmp,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    return {"bin": venv / "bin", "python": python, "site": site, "env": env, "cwd": work}


@pytest.mark.slow
def test_the_wheel_carries_its_configs_and_is_what_runs(installed):
    probe = sh(
        installed["python"],
        "-c",
        "import loralab, loralab.paths; print(loralab.__file__); print(loralab.paths.conf_dir())",
        cwd=installed["cwd"],
        env=installed["env"],
    )
    assert probe.returncode == 0, probe.stderr
    module, conf = (Path(line) for line in probe.stdout.split())
    assert module == installed["site"] / "loralab" / "__init__.py"  # not src/ of a checkout
    assert conf == installed["site"] / "loralab" / "conf" and (conf / "train.yaml").is_file()
    assert (installed["site"] / "loralab" / "models" / "configs" / "qwen2_5_7b.json").is_file()


@pytest.mark.slow
def test_console_scripts_work_from_another_directory(installed):
    def run(tool, *args):
        return sh(installed["bin"] / tool, *args, cwd=installed["cwd"], env=installed["env"])

    train_help = run("loralab-train", "--help")
    assert train_help.returncode == 0 and "model: hf, mlp, qwen2_5_0_5b" in train_help.stdout, train_help.stderr
    resolved = run("loralab-train", "--cfg", "job", "--resolve")
    assert f"root_dir: {installed['cwd']}\n" in resolved.stdout, resolved.stderr
    assert f"uri: sqlite:///{installed['cwd']}/mlflow.db" in resolved.stdout
    for tool in TOOLS:
        shown = run(tool, "--help")
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {tool} "), shown.stderr

    fits = run("loralab-preflight", "model=qwen2_5_0_5b", "hardware=rtx3050")
    assert fits.returncode == 0 and fits.stdout.startswith("fits: qwen2_5_0_5b"), fits.stderr
    misfit = run("loralab-preflight", "model=qwen2_5_7b", "hardware=rtx3050", "lora=none")
    assert misfit.returncode == 1 and not misfit.stdout
    (line,) = misfit.stderr.strip().splitlines()
    assert line.startswith("loralab-preflight: error: hardware.preflight: qwen2_5_7b (lora=none)")
    assert list(installed["cwd"].iterdir()) == []  # nothing written where it ran


def test_the_readme_install_lines_and_commands_are_what_the_package_has():
    """Every extra the README's install lines name exists, and installs what the README's sweep commands load; every
    loralab-* command it shows is a console script."""
    import importlib
    import re
    import tomllib

    readme = (ROOT / "README.md").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {
        e for group in re.findall(r'pip install -c constraints\.txt "\.\[([\w,]+)\]"', readme) for e in group.split(",")
    }
    assert extras == {"sweep"} and extras <= set(project["optional-dependencies"])
    for plugin in ("hydra_optuna_sweeper", "hydra_joblib_launcher", "hydra_submitit_launcher"):  # sweep=optuna,
        importlib.import_module(f"hydra_plugins.{plugin}")  # hydra/launcher=local_parallel|slurm
    assert set(re.findall(r"\bloralab-[a-z]+\b", readme)) <= set(project["scripts"])
