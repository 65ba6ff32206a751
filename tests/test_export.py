"""Export round trips (merged and adapter, reloaded with stock transformers/peft), the zip and its safety checks,
and predict/evaluate on an exported tiny LoRA model."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from loralab.archive import safe_extract, zip_dir
from loralab.calibrate import probabilities
from loralab.cli.predict import main as predict_main
from loralab.data.demo import make_rows
from loralab.data.records import DataError
from loralab.data.text import serialize
from loralab.export import ExportError, export_model, verify_export
from loralab.inference import evaluate_file, load_exported, predict_file
from loralab.models.build import ModelSource
from loralab.models.lora import apply_lora

LABELS = ["long", "short", "skip"]
MAX_LENGTH = 48
TEMPERATURE = 1.7


def tiny_model(lora: bool, seed: int = 0, save_base_to=None):
    """The shipped tiny Qwen2 (random init) with a small tokenizer; with ``lora``, adapters and head perturbed so
    the adapter really changes the logits (LoRA's B starts at zero)."""
    torch.manual_seed(seed)
    rows = make_rows(24, seed=seed)
    source = ModelSource(
        name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", max_length=MAX_LENGTH, tokenizer_vocab_size=300
    )
    tokenizer = source.load_tokenizer([serialize(r["features"]) for r in rows])
    model = source.load_model(LABELS, tokenizer)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    if save_base_to is not None:
        model.save_pretrained(save_base_to)  # stands in for a hub checkpoint
    if lora:
        model = apply_lora(
            model,
            LoraConfig(
                task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
            ),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
    return model.eval(), tokenizer, rows, base_state


def make_batch(tokenizer, rows):
    enc = [tokenizer(serialize(r["features"]), truncation=True, max_length=MAX_LENGTH) for r in rows]
    return DataCollatorWithPadding(tokenizer)(enc)


@torch.inference_mode()
def one_by_one_logits(model, tokenizer, rows):
    """Reference logits: each row alone (no padding), straight from the in-memory model."""
    return np.stack(
        [
            model(**tokenizer(serialize(r["features"]), truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
            .logits[0]
            .numpy()
            for r in rows
        ]
    )


def meta():
    return {
        "labels": LABELS,
        "temperature": TEMPERATURE,
        "calibration": {"n_bins": 15},
        "serialization": {"template": "{features}", "truncation_side": "right"},
        "max_length": MAX_LENGTH,
        "allow_null": False,
        "gates": {"val_accuracy": ">= 0.0"},
    }


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_export")
    model, tokenizer, rows, base_state = tiny_model(lora=True)
    batch = make_batch(tokenizer, rows[:8])
    with torch.inference_mode():
        reference = model(**batch).logits.clone()
        with model.disable_adapter():
            base_only = model(**batch).logits.clone()
    row_logits = one_by_one_logits(model, tokenizer, rows)
    result = export_model(model, tokenizer, out, batch, meta=meta(), base_location=None, save_base=True)
    return {
        "dir": out,
        "batch": batch,
        "reference": reference,
        "base_only": base_only,
        "rows": rows,
        "row_logits": row_logits,
        "meta": result,
        "base_state": base_state,
    }


def test_lora_export_layout_and_config(lora_export):
    out = lora_export["dir"]
    for name in (
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base/model.safetensors",
        "loralab.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "merged/config.json").read_text())
    assert config["num_labels"] == 3 and config["id2label"] == {"0": "long", "1": "short", "2": "skip"}
    assert config["label2id"] == {"long": 0, "short": 1, "skip": 2}
    assert config["problem_type"] == "single_label_classification" and config["pad_token_id"] is not None
    with safe_open(out / "adapter/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any(k.endswith("score.weight") for k in keys)  # head included
    meta = json.loads((out / "loralab.json").read_text())
    assert meta["parts"] == ["merged", "adapter", "base"] and meta["temperature"] == TEMPERATURE
    assert set(meta["files"]) == {
        p.relative_to(out).as_posix() for d in meta["parts"] for p in (out / d).rglob("*") if p.is_file()
    }


def test_base_dir_is_the_untouched_base(lora_export):
    saved = load_file(lora_export["dir"] / "base/model.safetensors")
    for key, value in saved.items():
        assert torch.equal(value, lora_export["base_state"][key]), key  # score head included: not the trained one


def test_merged_and_adapter_round_trip(lora_export):
    out, batch, reference = lora_export["dir"], lora_export["batch"], lora_export["reference"]
    assert (lora_export["base_only"] - reference).abs().max() > 1e-2  # the adapter matters, so the check can fail
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(out / "base").eval()
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.inference_mode():
        assert (merged(**batch).logits - reference).abs().max() <= 1e-4
        assert (adapted(**batch).logits - reference).abs().max() <= 1e-4
    assert max(lora_export["meta"]["verification"]["max_abs_diff"].values()) <= 1e-4


def test_verification_refuses_a_mismatch(lora_export):
    out, batch = lora_export["dir"], lora_export["batch"]
    wrong = lora_export["reference"] + 1e-3
    label_kwargs = lora_export["meta"]["base"]["label_config"]
    with pytest.raises(ExportError, match="merged/ logits differ"):
        verify_export(
            out,
            wrong,
            batch,
            atol=1e-4,
            base_location=out / "base",
            label_kwargs=label_kwargs,
            trust_remote_code=False,
            device=torch.device("cpu"),
            adapter=True,
        )


def test_full_finetune_export_and_pretrained_base_location(tmp_path):
    model, tokenizer, rows, _ = tiny_model(lora=False, seed=1)
    batch = make_batch(tokenizer, rows[:4])
    result = export_model(model, tokenizer, tmp_path / "ft", batch, meta=meta(), base_location=None, save_base=True)
    assert result["parts"] == ["merged"] and not (tmp_path / "ft/adapter").exists()
    assert not (tmp_path / "ft/base").exists()
    # A "pretrained" base: the adapter's base is loaded from its recorded location, not copied into the export.
    hub_dir = tmp_path / "hub_base"
    model, tokenizer, rows, _ = tiny_model(lora=True, seed=2, save_base_to=hub_dir)
    batch = make_batch(tokenizer, rows[:4])
    result = export_model(
        model, tokenizer, tmp_path / "lora", batch, meta=meta(), base_location=str(hub_dir), save_base=False
    )
    assert result["parts"] == ["merged", "adapter"] and result["base"]["location"] == str(hub_dir)


def test_predict_file_with_bad_rows(lora_export, tmp_path, capsys):
    zip_path = zip_dir(lora_export["dir"], tmp_path / "model_final.zip", include=["merged", "loralab.json"])
    rows = lora_export["rows"]
    lines = [json.dumps({"id": r["id"], "features": r["features"]}) for r in rows]
    bad = [
        "{not json",
        json.dumps({"id": "b1"}),
        json.dumps({"id": "b2", "features": {"x": [1]}}),
        json.dumps({"features": {"x": 1}}),
        '{"id": "b3", "features": {"x": NaN}}',
        json.dumps([1, 2]),
    ]
    for i, line in enumerate(bad):
        lines.insert(3 * i + 1, line)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    # through the CLI: batches of 7 mix lengths, so ordering bugs would show
    assert (
        predict_main(
            [f"model={zip_path}", f"input={src}", f"output={tmp_path / 'out.jsonl'}", "batch_size=7", "device=cpu"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"scored {len(rows)} of {len(rows) + len(bad)} rows" in printed and "rows/s" in printed
    for reason in (
        "invalid_json",
        "missing_features",
        "features_not_flat",
        "missing_id",
        "non_finite_value",
        "not_object",
    ):
        assert f"{reason}=1" in printed
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # input order, despite length-sorted batches
    expected = probabilities(lora_export["row_logits"], TEMPERATURE)
    got = np.array([[o["probs"][label] for label in LABELS] for o in out])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [o["label"] for o in out] == [LABELS[i] for i in expected.argmax(1)]
    assert predict_main([f"model={zip_path}", f"input={src}"]) == 2  # a one-line error, no traceback
    assert "missing output=" in capsys.readouterr().err


def test_predict_refuses_no_valid_rows_and_tampering(lora_export, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("nope\n")
    with pytest.raises(DataError, match="no valid rows"):
        predict_file(lora_export["dir"], src, tmp_path / "o.jsonl", device="cpu")
    tampered = tmp_path / "tampered"
    with zipfile.ZipFile(zip_dir(lora_export["dir"], tmp_path / "m.zip", include=["merged", "loralab.json"])) as zf:
        zf.extractall(tampered)
    config = tampered / "merged/config.json"
    config.write_text(config.read_text().replace('"long"', '"lonG"'))
    with pytest.raises(ExportError, match="sha256"):
        load_exported(tampered)
    (tampered / "merged/pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExportError, match="pickle"):
        load_exported(tampered)


def test_adapter_only_load_and_evaluate(lora_export, tmp_path):
    zip_path = zip_dir(lora_export["dir"], tmp_path / "a.zip", include=["adapter", "base", "loralab.json"])
    exported = load_exported(zip_path)
    assert exported.part == "adapter"
    rows = lora_export["rows"]
    src = tmp_path / "test.jsonl"
    src.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + json.dumps({**rows[0], "id": "u", "label": "flat"}) + "\n"
    )
    m = evaluate_file(zip_path, src, device="cpu")
    y = [LABELS.index(r["label"]) for r in rows]
    pred = lora_export["row_logits"].argmax(1)
    assert m["test_accuracy"] == pytest.approx(np.mean(pred == np.array(y)))
    assert m["input"]["dropped_by_reason"] == {"unknown_label": 1}
    assert {"test_nll", "test_ece", "test_brier", "test_nll_calibrated"} <= set(m)
    assert m["gates"]["test_accuracy"]["passed"] is True
    assert json.loads((tmp_path / "test.metrics.json").read_text())["test_macro_f1"] == m["test_macro_f1"]


# ------------------------------------------------------------------------------------------------ zip safety


def _zip_with(path, name, data=b"x", symlink=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "name,symlink",
    [
        ("../evil.txt", False),
        ("a/../../evil.txt", False),
        ("/tmp/evil.txt", False),
        ("..\\evil.txt", False),
        ("C:\\evil.txt", False),
        ("link", True),
    ],
)
def test_zip_slip_refused(tmp_path, name, symlink):
    dest = tmp_path / "dest"
    zip_path = _zip_with(tmp_path / "evil.zip", name, b"/etc/passwd" if symlink else b"x", symlink)
    with pytest.raises(ExportError, match="refusing entry"):
        safe_extract(zip_path, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "ok.txt").exists()  # nothing extracted


def test_safe_extract_ok_and_bomb_limit(tmp_path):
    zip_path = _zip_with(tmp_path / "fine.zip", "sub/data.bin", b"0" * 4096)
    assert (safe_extract(zip_path, tmp_path / "d") / "sub/data.bin").read_bytes() == b"0" * 4096
    with pytest.raises(ExportError, match="uncompressed"):
        safe_extract(zip_path, tmp_path / "d2", max_mb=2048 / 2**20)
    with pytest.raises(ExportError, match="not a readable zip"):
        safe_extract(tmp_path / "d/sub/data.bin", tmp_path / "d3")


def test_size_gate_refuses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(64 * 1024))  # random bytes do not compress
    with pytest.raises(ExportError, match="max_size_mb"):
        zip_dir(src, tmp_path / "m.zip", max_mb=32 * 1024 / 2**20)
    assert list(tmp_path.glob("m.zip*")) == []  # nothing left behind
    assert zip_dir(src, tmp_path / "m.zip", max_mb=128 * 1024 / 2**20).is_file()


def test_lora_over_a_16_bit_base_exports_from_an_fp32_copy(tmp_path):
    """What a CUDA run holds (frozen base in bf16, adapters + head in fp32) mixes dtypes outside autocast; the run's
    export step (``classification_export.export``) casts to fp32 on CPU first, and the export then verifies."""
    from conftest import run_result, typed_conf
    from torch.utils.data import DataLoader

    from loralab.data.demo import write_demo
    from loralab.reporting.provenance import PACKAGES
    from loralab.tasks.base import RunContext
    from loralab.tasks.classification_export import export

    model, tokenizer, rows, _ = tiny_model(lora=True)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    batch = make_batch(tokenizer, rows[:4])
    with pytest.raises(RuntimeError, match="dtype"):  # the mixed model cannot even score without autocast
        with torch.inference_mode():
            model(**batch)
    source = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", max_length=MAX_LENGTH)
    enc = [tokenizer(serialize(r["features"]), truncation=True, max_length=MAX_LENGTH) for r in rows[:8]]
    loader = DataLoader(enc, batch_size=8, collate_fn=DataCollatorWithPadding(tokenizer))
    prov = {"git_commit": "abc", "git_dirty": "False", **{f"version.{p}": "0" for p in PACKAGES}}
    train, val = write_demo(tmp_path / "data", n_train=8, n_val=4)
    conf = typed_conf("lora=default", "export.zip=false", f"data.train_file={train}", f"data.val_file={val}")
    summary = run_result(history=[{conf.trainer.monitor: 0.5}], best={conf.trainer.monitor: 0.5}, provenance=prov)
    metrics = {"temperature": 1.0, "calibration": {"method": "none"}}
    ctx = RunContext(out_dir=tmp_path, device=torch.device("cpu"), tracker=None)
    export(conf, model, tokenizer, source, loader, metrics, summary, ctx)
    assert json.loads((tmp_path / "loralab.json").read_text())["parts"] == ["merged", "adapter", "base"]


def test_auto_zip_parts_fall_back_to_the_adapter_when_merged_is_too_big(tmp_path):
    from loralab.tasks.classification_export import zip_parts

    for part, size in (("merged", 3 << 20), ("adapter", 1 << 10), ("loralab.json", None)):
        if size is None:
            (tmp_path / part).write_text("{}")
        else:
            (tmp_path / part).mkdir()
            (tmp_path / part / "w.bin").write_bytes(b"0" * size)
    assert zip_parts(tmp_path, "auto", max_mb=10) == ["merged", "adapter", "loralab.json"]
    assert zip_parts(tmp_path, "auto", max_mb=1) == ["adapter", "loralab.json"]
    assert zip_parts(tmp_path, ["merged", "base", "loralab.json"], max_mb=1) == ["merged", "loralab.json"]
