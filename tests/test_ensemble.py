"""``ensemble=blend``: the blend lands with the winner whichever side wins, no fold's weight sees the rows it is
scored on, the baseline survives skops (and nothing untrusted loads), and through a real tiny run the exported
zip (predict, evaluate, the manifest) serves exactly the blend's val probabilities."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_result
from scipy.special import log_softmax
from sklearn.datasets import make_classification
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split

from loralab.ensemble import (
    BASELINE_FILE,
    blend,
    calibrated_baseline,
    choose_weight,
    cross_fit,
    folds,
    load_baseline,
    save_baseline,
    scores,
    weight_grid,
)
from loralab.errors import ExportError
from loralab.export import write_meta


def tabular(seed: int, label_noise: float = 0.0):
    """A 3-class synthetic table, HGB fit on its train part (``label_noise``: share of train labels shuffled,
    which weakens the baseline only), and the val part's labels and HGB probabilities."""
    x, y = make_classification(
        n_samples=900, n_features=8, n_informative=5, n_classes=3, class_sep=1.2, random_state=seed
    )
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    noisy = rng.random(len(y_tr)) < label_noise
    y_tr = np.where(noisy, rng.integers(0, 3, len(y_tr)), y_tr)
    hgb = HistGradientBoostingClassifier(max_iter=60, random_state=seed).fit(x_tr, y_tr)
    return y_val, hgb.predict_proba(x_val)


def synthetic_model_logits(y: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """Logits of a stand-in "learned model": the true class lifted by ``strength`` over Gaussian noise."""
    rng = np.random.default_rng(seed)
    return strength * np.eye(3)[y] + rng.normal(0, 1, (len(y), 3))


@pytest.mark.parametrize("winner", ["baseline", "model"])
def test_blend_lands_with_the_winner(winner):
    y, base = tabular(0, label_noise=0.0 if winner == "baseline" else 0.6)
    logits = synthetic_model_logits(y, 0.8 if winner == "baseline" else 4.0, seed=1)
    report, _ = cross_fit(logits, base, y, temperature=1.0, k=5, seed=0)
    oof = report["oof"]
    assert max(oof, key=lambda who: oof[who]["macro_f1"]) in (winner, "blend")
    gap = oof[winner]["macro_f1"] - oof["model" if winner == "baseline" else "baseline"]["macro_f1"]
    assert gap > 0.1  # the set is as meant: one side clearly wins
    assert oof["blend"]["macro_f1"] >= oof[winner]["macro_f1"] - 0.01
    assert report["choice"] in (winner, "blend") and len(report["fold_weights"]) == 5


def test_no_fold_weight_sees_its_own_rows():
    """Two folds where each side is perfect on one fold and wrong on the other: a weight chosen on the other fold
    picks the side that is wrong on the held-out one, so the honest out-of-fold accuracy is 0; a weight that saw
    its own rows would score them well."""
    n = 40
    y = np.tile([0, 1], n // 2)
    right, wrong = np.eye(2)[y] * 0.98 + 0.01, np.eye(2)[1 - y] * 0.98 + 0.01
    a, b = np.arange(n // 2), np.arange(n // 2, n)
    model = np.vstack([right[a], wrong[b]])  # the model is right on fold a, the baseline on fold b
    base = np.vstack([wrong[a], right[b]])
    report, _ = cross_fit(np.log(model), base, y, temperature=1.0, calibrate=False, fold_rows=[a, b])
    assert report["fold_weights"] == [0.0, 1.0]  # fold a scored with the baseline's weight, chosen on b
    assert report["oof"]["blend"]["accuracy"] == 0.0


def test_each_fold_weight_is_the_argmax_on_the_other_folds():
    y, base = tabular(3)
    logits = synthetic_model_logits(y, 1.5, seed=4)
    report, exported = cross_fit(logits, base, y, temperature=1.0, k=4, seed=7, calibrate=False)
    rows = folds(y, 4, 7)
    probs = np.exp(log_softmax(logits, axis=1))
    for held_out, w in zip(rows, report["fold_weights"]):
        others = np.setdiff1d(np.arange(len(y)), held_out)
        assert w == choose_weight(probs[others], base[others], y[others], weight_grid(11))
    assert report["weight"] == choose_weight(probs, base, y, weight_grid(11))
    np.testing.assert_allclose(exported, blend(probs, base, report["weight"]))
    blended = np.vstack([blend(probs[h], base[h], w) for h, w in zip(rows, report["fold_weights"])])
    order = np.concatenate(rows)
    assert report["oof"]["blend"] == scores(blended, y[order])


def test_blend_endpoints_and_rows_sum_to_one():
    p, q = np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([[0.4, 0.6], [0.0, 1.0]])
    assert np.array_equal(blend(p, q, 1.0), p) and np.array_equal(blend(p, q, 0.0), q)
    mid = blend(p, q, 0.5)
    np.testing.assert_allclose(mid.sum(1), 1.0)
    assert mid[0, 0] == pytest.approx(np.sqrt(0.28) / (np.sqrt(0.28) + np.sqrt(0.18)))


def test_baseline_round_trips_through_skops_and_untrusted_types_are_refused(tmp_path):
    from sklearn.preprocessing import FunctionTransformer

    from loralab.baseline import build_estimator

    rows = [{"x": float(i % 7), "venue": "ab"[i % 2]} for i in range(60)]
    y = [i % 3 for i in range(60)]
    model = build_estimator("hgb", 0, {"max_iter": 10}).fit(rows, y)
    path = save_baseline(model, tmp_path / BASELINE_FILE)
    np.testing.assert_array_equal(load_baseline(path).predict_proba(rows), model.predict_proba(rows))
    foreign = save_baseline(FunctionTransformer(os.getcwd), tmp_path / "foreign.skops")  # any function: refused
    with pytest.raises(ExportError, match=r"refusing to load untrusted types \['posix.getcwd'\]"):
        load_baseline(foreign)
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not a readable skops file"):
        load_baseline(tmp_path / "junk.skops")


def test_console_report_and_run_line_show_model_baseline_and_blend_side_by_side():
    from rich.console import Console

    from loralab.reporting.console import print_summary, run_line
    from loralab.reporting.report import render_report

    y, base = tabular(5)
    report, _ = cross_fit(synthetic_model_logits(y, 1.0, seed=6), base, y, temperature=1.0, k=3, seed=0)
    m = {
        "val_macro_f1": report["oof"]["model"]["macro_f1"],
        "gates": {},
        "best_epoch": 1,
        "ensemble": report,
        "baseline": {
            "name": "hgb",
            "train_rows": 540,
            "fit_time_s": 0.1,
            "scalars": {"val_macro_f1": report["oof"]["baseline"]["macro_f1"]},
        },
    }
    summary = run_result(metrics=m, objective=m["val_macro_f1"])
    oof = {who: f"{s['macro_f1']:.4f}" for who, s in report["oof"].items()}
    console = Console(record=True, width=250)
    print_summary(summary, console)
    text = console.export_text()
    assert (
        f"macro-F1 model {oof['model']}, baseline {oof['baseline']}, blend {oof['blend']}; the export serves "
        f"{report['choice']} (model weight {report['weight']:g})"
    ) in text
    assert f"ensemble {report['choice']} w={report['weight']:g} oof macro-F1 {oof['blend']}" in run_line(summary)
    md = render_report(
        metrics=m,
        data_report={},
        result=summary,
        plots={},
        overrides=None,
        run_id=None,
        tracking_uri=None,
        run_dir="/r",
    )
    assert f"| blend | {oof['blend']} |" in md and "fold weights" in md


# --- one tiny run with ensemble=blend ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory) -> dict:
    """A tiny LoRA run on demo-shaped data (no pretrain stage) with ``ensemble=blend``."""
    from conftest import CONF_DIR, tiny_run_overrides
    from hydra import compose, initialize_config_dir

    from loralab.data.demo import make_rows, write_demo
    from loralab.data.records import write_rows
    from loralab.lifecycle import run as train

    tmp = tmp_path_factory.mktemp("blend")
    train_file, val_file = write_demo(tmp / "data", n_train=48, n_val=30)
    test_file = write_rows(tmp / "data" / "test.jsonl", make_rows(20, seed=99, start_id=1000))
    overrides = [
        *tiny_run_overrides(tmp, train_file, val_file, test_file),
        "ensemble=blend",
        "ensemble.folds=3",
        "decision=precision",  # on the blend's probabilities, cross-fit on its folds
        "decision.targets.long=0.4",
        "decision.targets.short=0.4",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    run_dir = tmp / "run"
    val = {r["id"]: r for r in map(json.loads, (run_dir / "ensemble_val.jsonl").read_text().splitlines())}
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "val_file": val_file,
        "test_file": test_file,
        "val": val,
        "labels": list(cfg.data.labels),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


def probs_of(rows: list[dict], labels: list[str]) -> np.ndarray:
    return np.array([[r[label] for label in labels] for r in rows])


@pytest.mark.slow
def test_run_reports_the_blend_and_predict_serves_it_from_the_zip(blend_run, capsys):
    from mlflow.tracking import MlflowClient

    from loralab.cli.predict import main as loralab_predict
    from loralab.inference import evaluate_file, predict_file

    run_dir, labels, val = blend_run["run_dir"], blend_run["labels"], blend_run["val"]
    e = blend_run["metrics"]["ensemble"]
    assert set(e["oof"]) == {"model", "baseline", "blend"}
    assert e["choice"] == {1.0: "model", 0.0: "baseline"}.get(e["weight"], "blend")  # what the chosen weight serves
    assert e["oof"]["baseline"]["macro_f1"] == pytest.approx(
        blend_run["metrics"]["baseline"]["scalars"]["val_macro_f1"]
    )
    assert e["oof"]["model"]["macro_f1"] == pytest.approx(blend_run["metrics"]["val_macro_f1"])  # T keeps argmax
    meta = json.loads((run_dir / "loralab.json").read_text())
    assert "baseline" in meta["parts"] and BASELINE_FILE in meta["files"]
    assert meta["ensemble"]["weight"] == e["weight"]
    client = MlflowClient(f"sqlite:///{blend_run['tmp'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    assert run.data.tags["ensemble.choice"] == e["choice"]
    assert run.data.metrics["ensemble.weight"] == e["weight"]
    assert run.data.metrics["ensemble.blend.oof_macro_f1"] == pytest.approx(e["oof"]["blend"]["macro_f1"])
    assert run.data.metrics["ensemble.blend.test_macro_f1"] == pytest.approx(e["test"]["blend"]["macro_f1"])
    assert e["test"]["model"]["macro_f1"] == pytest.approx(blend_run["metrics"]["test_macro_f1"])
    report = (run_dir / "report.md").read_text()
    assert "## Ensemble" in report and f"{e['oof']['blend']['macro_f1']:.4f}" in report
    assert "| test macro-F1 |" in report and f"{e['test']['blend']['macro_f1']:.4f} |" in report

    assert (
        loralab_predict(
            [
                f"model={run_dir / 'model_final.zip'}",
                f"input={blend_run['val_file']}",
                f"output={blend_run['tmp'] / 'pred.jsonl'}",
                "device=cpu",
            ]
        )
        == 0
    )
    assert f"probs: model + baseline blend, model weight {e['weight']:g}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (blend_run["tmp"] / "pred.jsonl").read_text().splitlines()]
    expected = probs_of([val[r["id"]]["blend"] for r in rows], labels)
    assert np.abs(probs_of([r["probs"] for r in rows], labels) - expected).max() <= 1e-5
    decided = {r["id"]: r for r in map(json.loads, (run_dir / "decisions_val.jsonl").read_text().splitlines())}
    assert np.abs(probs_of([decided[r["id"]]["probs"] for r in rows], labels) - expected).max() <= 1e-12
    assert [r["label"] for r in rows] == [decided[r["id"]]["decision"] for r in rows]  # thresholds on the blend
    scored = evaluate_file(
        run_dir / "model_final.zip",
        blend_run["val_file"],
        blend_run["tmp"] / "val.metrics.json",
        prefix="val_",
        device="cpu",
    )
    assert scored["val_macro_f1"] == pytest.approx(blend_run["metrics"]["val_macro_f1"])  # gates: the model itself
    assert scored["ensemble"]["weight"] == e["weight"]
    y = [labels.index(val[r["id"]]["label"]) for r in rows]
    assert scored["ensemble"]["val_macro_f1"] == pytest.approx(scores(expected, y)["macro_f1"])
    on_test = evaluate_file(run_dir / "model_final.zip", blend_run["test_file"], device="cpu")  # test_ prefix
    assert on_test["ensemble"]["test_macro_f1"] == pytest.approx(e["test"]["blend"]["macro_f1"])
    assert on_test["ensemble"]["test_log_loss"] == pytest.approx(e["test"]["blend"]["log_loss"], rel=1e-4)

    # Whatever weight this tiny run chose, an interior one blends both sides exactly as the run's components say.
    half_dir = blend_run["tmp"] / "half_weight"  # a copy: the module's run dir stays as the run left it
    shutil.copytree(run_dir, half_dir, ignore=shutil.ignore_patterns("checkpoints", "mlruns"), dirs_exist_ok=True)
    meta["ensemble"]["weight"] = 0.5
    write_meta(half_dir, meta)  # a deliberate change, with its digest: a hand edit alone is refused
    predict_file(half_dir, blend_run["val_file"], blend_run["tmp"] / "half.jsonl", device="cpu")
    half = [json.loads(line) for line in (blend_run["tmp"] / "half.jsonl").read_text().splitlines()]
    model = probs_of([val[r["id"]]["model"] for r in half], labels)
    base = probs_of([val[r["id"]]["baseline"] for r in half], labels)
    base = calibrated_baseline(base, e["baseline_temperature"])
    assert np.abs(probs_of([r["probs"] for r in half], labels) - blend(model, base, 0.5)).max() <= 1e-5


@pytest.mark.slow
def test_mlflow_model_serves_the_blend_and_a_tampered_baseline_is_refused(blend_run):
    import shutil
    import zipfile

    import mlflow

    from loralab.inference import load_exported
    from loralab.reporting.runs import using_store

    labels, val = blend_run["labels"], blend_run["val"]
    rows = [json.loads(line) for line in blend_run["val_file"].read_text().splitlines()][:8]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{blend_run['tmp'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    with using_store(f"sqlite:///{blend_run['tmp'] / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    out = model.predict([{"id": r["id"], "features": r["features"]} for r in rows])
    expected = probs_of([val[r["id"]]["blend"] for r in rows], labels)
    assert np.abs(probs_of(out["probs"], labels) - expected).max() <= 1e-5

    tampered = blend_run["tmp"] / "tampered"
    with zipfile.ZipFile(blend_run["run_dir"] / "model_final.zip") as zf:
        zf.extractall(tampered)
    skops_file = tampered / BASELINE_FILE
    data = bytearray(skops_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    skops_file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{BASELINE_FILE} does not match its sha256"):
        load_exported(tampered)
    shutil.rmtree(tampered / "baseline")
    with pytest.raises(ExportError, match="baseline/ is missing"):
        load_exported(tampered)


@pytest.mark.slow
@pytest.mark.parametrize("degenerate", ["one class in train", "a class missing from val"])
def test_degenerate_splits_with_a_blend_still_train_and_export(degenerate, tmp_path):
    """Degenerate data never loses the trained model: a one-class baseline answers that class for every row (it
    used to raise in the blend's cross-fit), and a class val lacks leaves the blend's scores to the classes it has;
    the run finishes, blends and exports."""
    from conftest import compose_train, row, write_jsonl

    from loralab.baseline import fit_estimator, predict_proba
    from loralab.data.records import Record
    from loralab.lifecycle import run

    one = [Record(i, {"x": float(i)}, "long") for i in range(10)]
    (model, _) = fit_estimator("hgb", one, ["long", "short", "skip"], 0)
    assert predict_proba(model, one[:2], 3).tolist() == [[1.0, 0.0, 0.0]] * 2

    train_labels = ["long"] if degenerate == "one class in train" else ["long", "short", "skip"]
    val_labels = ["long"] if degenerate == "one class in train" else ["long", "skip"]
    train = write_jsonl(
        tmp_path / "train.jsonl", [row(i, train_labels[i % len(train_labels)], x=i % 7, y=i % 3) for i in range(48)]
    )
    val = write_jsonl(
        tmp_path / "val.jsonl", [row(100 + i, val_labels[i % len(val_labels)], x=i % 7, y=i % 3) for i in range(16)]
    )
    cfg = compose_train(
        "data=jsonl",
        f"data.train_file={train}",
        f"data.val_file={val}",
        "data.cache_dir=null",
        "pretrain=none",
        "ensemble=blend",
        "baseline=hgb",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=32",
        f"paths.output_dir={tmp_path / 'run'}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    )
    run(cfg)
    meta = json.loads((tmp_path / "run" / "loralab.json").read_text())
    assert meta["ensemble"]["method"] == "blend" and (tmp_path / "run" / "model_final.zip").is_file()
