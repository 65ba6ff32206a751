"""Every CUDA profile's code path, trained on the CPU: the profile as shipped with only ``hardware.device=cpu`` (and
one intra-op thread) changed. The precision, not the device, decides the base's dtype, the autocast and the
GradScaler, so what runs here is what a GPU runs: a 16-bit frozen base under fp32 LoRA weights, autocast, the
micro-batch with accumulation, activation checkpointing (rtx3050), data-loader workers and pinned memory (a100).
fp16 matmuls are emulated on CPUs, hence a tiny shape; a GPU runs the same paths at real size
(``bench/device_check.py``, docs/hardware.md)."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, compose_run, compose_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

import loralab
from loralab.config import check, resolve_hardware
from loralab.inference import predict_file
from loralab.lifecycle import run as train

SRC = str(Path(loralab.__file__).parent)
ON_CPU = ["hardware.device=cpu", "hardware.torch_threads=1"]  # the device swap; one thread: 2-core CI
# The knobs that choose a code path (name, device, workers, memory and the preflight do not).
PATH_KNOBS = ["precision", "micro_batch_size", "gradient_checkpointing", "attn_implementation", "load_in_4bit"]


def loralab_deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    """Deprecation warnings raised at a call in loralab's own code (a library warns at its caller's line)."""
    return [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        and w.filename.startswith(SRC)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "profile, precision",
    [
        ("rtx3050", "fp16"),  # fp16 + GradScaler as shipped: the one fp16 run (emulated on CPUs: tiny and short)
        ("a100", "bf16"),  # h100 is the same path with micro-batch 32 (test below)
    ],
)
def test_a_gpu_profile_trains_resumes_and_exports_on_cpu(profile, precision, tmp_path):
    trains_resumes_and_exports(profile, precision, ON_CPU, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("profile, precision", [("rtx3050", "fp16"), ("h100", "bf16")])
def test_a_gpu_profile_trains_resumes_and_exports_on_cuda(profile, precision, tmp_path):
    trains_resumes_and_exports(profile, precision, [], tmp_path)


def trains_resumes_and_exports(profile: str, precision: str, on_device: list[str], tmp_path: Path) -> None:
    """Two epochs, then a second run resumed from the first epoch's checkpoint: same evaluations and weights
    (model, optimizer, schedule, scaler and RNG states restored); the export reloads with stock transformers and
    peft to the in-memory logits, and predicts; loralab's own calls raise no deprecation warning."""
    overrides = [f"hardware={profile}", *on_device, "pretrain=none", "baseline=none", "trainer.max_epochs=2"]
    overrides += ["export.zip=false", "calibration=none"]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_run(tmp_path, "ref", *overrides))
        train(compose_run(tmp_path, "resumed", *overrides, f"resume={ref / 'checkpoints' / 'epoch_001'}"))
    assert not loralab_deprecations(caught)
    assert_same_run(ref, resumed)

    used = OmegaConf.load(ref / "config.yaml").hardware  # the config as the run used it
    shipped = OmegaConf.load(Path(__file__).parents[1] / "conf" / "hardware" / f"{profile}.yaml")
    assert used.device == ("cpu" if on_device else shipped.device) and used.precision == precision
    assert {k: used[k] for k in PATH_KNOBS} == {k: shipped[k] for k in PATH_KNOBS}
    summary = json.loads((ref / "training_summary.json").read_text())
    assert summary["accumulation_steps"] == 8 // min(8, shipped.micro_batch_size)
    state = torch.load(ref / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    assert bool(state["scaler"]) == (precision == "fp16")  # an enabled GradScaler's scale and growth tracker
    weights = load_file(ref / "checkpoints" / "last" / "weights.safetensors")
    assert any("lora_" in k for k in weights) and {t.dtype for t in weights.values()} == {torch.float32}

    meta = json.loads((ref / "loralab.json").read_text())
    assert meta["parts"] == ["merged", "adapter", "base"]
    assert max(meta["verification"]["max_abs_diff"].values()) <= meta["verification"]["atol"]
    stats = predict_file(ref, tmp_path / "data" / "val.jsonl", tmp_path / "pred.jsonl", device="cpu")
    assert stats["rows_kept"] == 16 and stats["model_part"] == "merged"


def test_h100_is_the_a100_path_with_larger_micro_batches(fake_cuda):
    a100, h100 = (check(compose_train(f"hardware={p}")).hardware for p in ("a100", "h100"))
    differ = {k for k in OmegaConf.to_container(a100) if a100[k] != h100[k]}
    assert differ == {"name", "micro_batch_size"}


@pytest.mark.parametrize("gib, bf16, same_path_as", [(4.0, False, "rtx3050"), (80.0, True, "h100")])
def test_auto_picks_a_path_trained_above(gib, bf16, same_path_as, fake_cuda):
    """``hardware=auto`` on a small GPU without bf16 chooses the rtx3050 path, on a large one the h100 path."""
    fake_cuda(gib, bf16)
    auto = resolve_hardware(check(compose_train("hardware=auto")))[0].hardware
    shipped = check(compose_train(f"hardware={same_path_as}")).hardware
    assert {k: auto[k] for k in PATH_KNOBS} == {k: shipped[k] for k in PATH_KNOBS}
    assert auto.device == "cuda"


def test_gpu_extras_stay_optional():
    """bitsandbytes (4-bit QLoRA) is the ``gpu`` extra, never a dependency; without it the 4-bit path says how to
    get it."""
    import importlib.util
    import tomllib

    from loralab.models.build import quantization_4bit

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("bitsandbytes") for d in project["dependencies"])
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["gpu"])
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match=r"pip install loralab\[gpu\]"):
            quantization_4bit(torch.bfloat16)
