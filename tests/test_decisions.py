"""``decision=precision``: thresholds that reach a precision target where argmax does not, measured out of fold
without a fold's threshold seeing its own rows; an unreachable target never acts; and through a real tiny run the
export (predict, evaluate, the MLflow model) decides every row exactly as the run did, while ``decision=argmax``
exports answer as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_result
from scipy.special import softmax

from loralab.decisions import choose_threshold, cross_fit, decide, report, thresholds_by_index, unreachable_line
from loralab.ensemble import folds
from loralab.errors import ExportError
from loralab.export import read_meta, write_meta

LABELS = ["long", "short", "skip"]
TARGETS = {"long": 0.6, "short": 0.6}


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (half skip) and probabilities with a weak lift of the true class: argmax is right on about half of the
    rows it calls long, the most confident ones more often."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.25, 0.25, 0.5])
    return y, softmax(0.9 * np.eye(3)[y] + rng.normal(0, 1, (n, 3)), axis=1)


def decision_report(probs, y, fold_rows, targets=TARGETS, min_rows=5, gates=None):
    return report(lambda fold, fit: probs, probs, y, fold_rows, LABELS, targets, "skip", min_rows, gates or {})


def test_thresholds_reach_the_target_out_of_fold_where_argmax_misses_it_and_test_agrees():
    y, probs = synthetic(1500, 0)
    argmax = probs.argmax(axis=1)
    assert (y[argmax == 0] == 0).mean() < 0.55  # the set is as meant: argmax's long precision misses 0.60
    rep, _ = decision_report(probs, y, folds(y, 5, 0))
    oof = rep["oof"]["long"]
    assert oof["precision"] >= 0.6 - 0.03 and oof["acted_in_folds"] == 5
    assert 0.05 < oof["coverage"] < (argmax == 0).mean()  # precision is bought with coverage
    assert rep["val"]["long"]["reachable"] and rep["thresholds"]["long"] > 1 / 3
    y_test, p_test = synthetic(4000, 100)  # fresh rows from the same source, decided with the exported thresholds
    decided, abstained = decide(p_test, *thresholds_by_index(rep, LABELS))
    precision = (y_test[decided == 0] == 0).mean()
    spread = oof["precision_folds"]
    assert spread["min"] <= precision <= spread["max"], (precision, spread)
    assert abstained.mean() > 0.3 and np.array_equal(decided[abstained], np.full(abstained.sum(), 2))


def test_under_a_blend_each_fold_decides_on_the_blends_out_of_fold_probabilities():
    """The decisions' fold probabilities are the blend the ensemble's cross-fit scored on the same held-out fold
    (its temperatures and weight, fit on the other folds), so both reports measure one served model."""
    from conftest import shipped_conf

    from loralab.ensemble import cross_fit as blend_cross_fit
    from loralab.ensemble import scores
    from loralab.tasks.classification_decisions import fold_probabilities

    y, base = synthetic(600, 3)
    logits = np.log(synthetic(600, 3)[1]) * 2 + np.random.default_rng(4).normal(0, 1, (600, 3))
    rows = folds(y, 4, 0)
    ensemble, _ = blend_cross_fit(logits, base, y, temperature=1.0, k=4, seed=0, fold_rows=rows)
    probs_for = fold_probabilities(shipped_conf(), logits, y, base, ensemble)
    held_out = np.vstack([probs_for(i, np.setdiff1d(np.arange(600), h))[h] for i, h in enumerate(rows)])
    assert scores(held_out, y[np.concatenate(rows)]) == pytest.approx(ensemble["oof"]["blend"], rel=1e-12)


def test_no_fold_threshold_sees_its_own_rows():
    """Two folds that disagree: in fold a the rows at p(long) = 0.8 are long, in fold b they are skip. Chosen on
    the other fold, a's threshold is none (b reaches no 0.6) and b's is 0.5 (from a: between 0.2 and 0.8), which is
    wrong on b's rows: out of fold long never acts on a and is never right on b. A threshold that saw its own rows
    would act on a at precision 1."""
    n = 40
    a, b = np.arange(n // 2), np.arange(n // 2, n)
    p_long = np.tile([0.8, 0.2], n // 2)
    y = np.where(p_long == 0.8, 0, 2)
    y[b] = np.where(p_long[b] == 0.8, 2, 0)  # fold b: the confident rows are skip
    probs = np.stack([p_long, np.zeros(n), 1 - p_long], axis=1)
    seen = []

    def probs_for(fold, fit):
        seen.append((fold, set(fit.tolist())))
        return probs

    oof = cross_fit(probs_for, y, [a, b], {0: 0.6}, fallback=2, min_rows=2)
    assert seen == [(0, set(b.tolist())), (1, set(a.tolist()))]  # each fold calibrated on the other's rows only
    assert [f["thresholds"][0] for f in oof["folds"]] == [None, 0.5]  # halfway from 0.8 down to 0.2
    assert oof["folds"][0]["stats"][0]["coverage"] == 0.0 and oof["folds"][1]["stats"][0]["precision"] == 0.0
    assert oof["stats"][0]["precision"] == 0.0
    assert choose_threshold(probs[a], y[a], 0, 0.6, 2)[0] == 0.5  # in sample, fold a would have acted


def test_an_unreachable_target_never_acts_and_says_so():
    y, probs = synthetic(600, 1)
    # 0.95 holds on a handful of the most confident rows; never on the 30 that min_rows asks for
    rep, _ = decision_report(probs, y, folds(y, 3, 0), targets={"long": 0.95, "short": 0.6}, min_rows=30)
    assert rep["thresholds"]["long"] is None and not rep["val"]["long"]["reachable"]
    assert rep["oof"]["long"]["coverage"] == 0.0 and rep["oof"]["long"]["precision"] is None
    decided, _ = decide(probs, *thresholds_by_index(rep, LABELS))
    assert 0 not in decided and 1 in decided
    assert unreachable_line("long", rep).startswith("long cannot reach precision 0.95 on val (best ")
    assert unreachable_line("long", rep).endswith("so it never acts: its rows go to skip")


def test_argmax_is_the_default_and_takes_no_thresholds():
    from conftest import shipped_conf, typed_conf

    assert shipped_conf().decision is None  # decision=argmax: predict, evaluate and serve answer as before
    d = typed_conf("decision=precision").decision
    assert (dict(d.targets), d.fallback, d.folds, d.min_rows) == ({"long": 0.6, "short": 0.6}, "skip", 5, 5)
    assert typed_conf("decision=precision", "ensemble=blend", "ensemble.folds=3").decision.folds == 3


def test_the_rule_takes_the_most_probable_label_that_clears_its_threshold():
    probs = np.array([[0.45, 0.40, 0.15], [0.30, 0.30, 0.40], [0.55, 0.44, 0.01], [0.20, 0.20, 0.60]])
    decided, abstained = decide(probs, {0: 0.5, 1: 0.35}, fallback=2)
    # long misses 0.5 but short clears 0.35; neither; both clear (long more probable); the fallback is argmax
    assert decided.tolist() == [1, 2, 0, 2] and abstained.tolist() == [False, True, False, True]
    decided, _ = decide(probs, {0: None, 1: 0.35}, fallback=2)  # no threshold: never acts
    assert decided.tolist() == [1, 2, 1, 2]


def test_loralab_json_with_a_bad_decision_is_refused(tmp_path):
    base = {
        "labels": LABELS,
        "temperature": 1.0,
        "max_length": 8,
        "parts": [],
        "files": {},
        "decision": {
            "method": "precision",
            "fallback": "skip",
            "targets": {"long": 0.6},
            "thresholds": {"long": 0.7},
        },
    }
    write_meta(tmp_path, base)
    assert read_meta(tmp_path)["decision"]["thresholds"] == {"long": 0.7}
    for change, message in [
        ({"fallback": "hold"}, "decision.fallback='hold': must be one of the labels"),
        ({"thresholds": {"long": 1.7}}, "decision.thresholds.long=1.7: must be a probability in [0, 1] or null"),
        ({"thresholds": {"skip": 0.5}, "targets": {"skip": 0.6}}, "decision.thresholds.skip: must name a label"),
        ({"targets": {"long": 0}}, "decision.targets.long=0: must be in (0, 1]"),
        ({"thresholds": {"long": 0.7, "short": 0.6}}, "they must agree"),
    ]:
        write_meta(tmp_path, {**base, "decision": {**base["decision"], **change}})
        with pytest.raises(ExportError, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_meta(tmp_path)


def test_console_and_report_show_argmax_and_decisions_side_by_side():
    from rich.console import Console

    from loralab.metrics import evaluate_gates
    from loralab.reporting.console import print_summary
    from loralab.reporting.report import render_report

    y, probs = synthetic(900, 2)
    gates = {"val_precision_long": ">= 0.60", "val_precision_short": ">= 0.60"}
    rep, _ = report(
        lambda f, fit: probs, probs, y, folds(y, 3, 0), LABELS, {"long": 0.6, "short": 0.99}, "skip", 5, gates
    )
    argmax = rep["argmax_scalars"]
    m = {"val_precision_long": argmax["val_precision_long"], "gates": evaluate_gates(argmax, gates), "decision": rep}
    console = Console(record=True, width=250)
    print_summary(run_result(metrics=m), console)
    text = console.export_text()
    assert "short cannot reach precision 0.99 on val" in text
    long_oof = rep["oof"]["long"]
    assert f"{long_oof['precision']:.3f}" in text and f"{rep['thresholds']['long']:.3f}" in text
    from loralab.reporting.console import gate_count

    assert f"val argmax gates: {gate_count(m['gates'])}; val decision gates (out of fold): " in text
    assert gate_count(m["gates"]).startswith("0 pass, 2 FAIL")  # the set is as meant: argmax misses both
    assert f"(out of fold): {gate_count(rep['gates'])}" in text
    md = render_report(
        metrics=m,
        data_report={},
        result=run_result(metrics=m),
        plots={},
        overrides=None,
        run_id=None,
        tracking_uri=None,
        run_dir="/r",
    )
    assert "## Decisions" in md and "short cannot reach precision 0.99 on val" in md
    spread = long_oof["precision_folds"]
    row = f"| long (0.60) | {rep['thresholds']['long']:.3f} | {long_oof['precision']:.3f} {spread['min']:.2f}–"
    assert row in md


# --- one tiny run with decision=precision -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def decision_run(tmp_path_factory) -> dict:
    """A tiny LoRA run on demo-shaped data (no pretrain stage) with ``decision=precision`` and a test file; targets
    low enough that a one-epoch model acts on some rows and abstains on others."""
    from conftest import compose_train, tiny_run_overrides

    from loralab.data.demo import make_rows, write_demo
    from loralab.data.records import write_rows
    from loralab.lifecycle import run as train

    tmp = tmp_path_factory.mktemp("decision")
    train_file, val_file = write_demo(tmp / "data", n_train=48, n_val=60)
    test_file = write_rows(tmp / "data" / "test.jsonl", make_rows(40, seed=99, start_id=1000))
    cfg = compose_train(
        *tiny_run_overrides(tmp, train_file, val_file, test_file),
        "decision=precision",
        "decision.targets.long=0.4",
        "decision.targets.short=0.4",
        "decision.min_rows=2",
    )
    train(cfg)
    run_dir = tmp / "run"
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "val_file": val_file,
        "test_file": test_file,
        "val": {r["id"]: r for r in map(json.loads, (run_dir / "decisions_val.jsonl").read_text().splitlines())},
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


def probs_of(rows: list[dict]) -> np.ndarray:
    return np.array([[r[label] for label in LABELS] for r in rows])


@pytest.mark.slow
def test_run_reports_decisions_and_every_served_path_decides_as_the_run_did(decision_run, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from loralab.cli.evaluate import main as loralab_evaluate
    from loralab.cli.predict import main as loralab_predict
    from loralab.reporting.runs import using_store

    run_dir, val, tmp = decision_run["run_dir"], decision_run["val"], decision_run["tmp"]
    d = decision_run["metrics"]["decision"]
    decided = [r["decision"] for r in val.values()]
    assert any(r["abstained"] for r in val.values()) and set(decided) - {"skip"}  # both kinds of answer
    meta = json.loads((run_dir / "loralab.json").read_text())
    assert meta["decision"]["thresholds"] == d["thresholds"] and meta["decision"]["fallback"] == "skip"
    # the exported thresholds decide val as the rule says
    expected = decide(probs_of([r["probs"] for r in val.values()]), *thresholds_by_index(d, LABELS))[0]
    assert decided == [LABELS[k] for k in expected]
    assert d["test"]["rows"] == 40 and set(d["test"]["gates"]) == {f"test_{g[4:]}" for g in d["gates"]}

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    assert run.data.metrics["decision.val_precision_long"] == pytest.approx(d["scalars"]["val_precision_long"])
    assert run.data.metrics["decision.test_coverage"] == pytest.approx(d["test"]["scalars"]["test_coverage"])
    assert run.data.metrics["decision.threshold_long"] == pytest.approx(d["thresholds"]["long"])
    assert "decision.gates_passed" in run.data.tags
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/precision_coverage.png" in artifacts
    assert "## Decisions" in (run_dir / "report.md").read_text()

    pred = tmp / "pred.jsonl"
    argv = [f"model={run_dir / 'model_final.zip'}", f"input={decision_run['val_file']}", f"output={pred}", "device=cpu"]
    assert loralab_predict(argv) == 0
    assert "abstained" in capsys.readouterr().out
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert all(list(r) == ["id", "label", "abstained", "probs"] for r in rows)
    assert [(r["label"], r["abstained"]) for r in rows] == [
        (val[r["id"]]["decision"], val[r["id"]]["abstained"]) for r in rows
    ]
    assert np.abs(probs_of([r["probs"] for r in rows]) - probs_of([val[r["id"]]["probs"] for r in rows])).max() <= 1e-5

    with using_store(f"sqlite:///{tmp / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # what `mlflow models serve` calls
    assert model.metadata.signature.outputs.input_names() == ["id", "label", "abstained", "probs"]
    out = model.predict(
        [
            {"id": r["id"], "features": r["features"]}
            for r in map(json.loads, decision_run["val_file"].read_text().splitlines())
        ]
    )
    assert list(out["label"]) == [r["label"] for r in rows] and list(out["abstained"]) == [r["abstained"] for r in rows]

    # evaluate on the test file reproduces the run's test decisions and gates
    out_file = tmp / "test.metrics.json"
    argv = [
        f"model={run_dir / 'model_final.zip'}",
        f"input={decision_run['test_file']}",
        f"output={out_file}",
        "device=cpu",
    ]
    assert loralab_evaluate(argv) == 0
    assert "decisions" in capsys.readouterr().out
    scored = json.loads(out_file.read_text())["decision"]
    for key, value in d["test"]["scalars"].items():
        assert scored[key] == pytest.approx(value), key
    assert {k: g["passed"] for k, g in scored["gates"].items()} == {
        k: g["passed"] for k, g in d["test"]["gates"].items()
    }
    assert {k: g["passed"] for k, g in scored["argmax"]["gates"].items()} == {
        k: g["passed"] for k, g in d["test"]["argmax_gates"].items()
    }


@pytest.mark.slow
def test_an_export_without_a_decision_answers_as_argmax_always_did(decision_run):
    from loralab.inference import predict_file

    argmax_dir = decision_run["tmp"] / "argmax"  # a copy: the module's run dir stays as the run left it
    shutil.copytree(decision_run["run_dir"], argmax_dir, ignore=shutil.ignore_patterns("checkpoints", "mlruns"))
    meta = json.loads((argmax_dir / "loralab.json").read_text())
    del meta["decision"]
    write_meta(argmax_dir, meta)
    out = decision_run["tmp"] / "argmax.jsonl"
    predict_file(argmax_dir, decision_run["val_file"], out, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(list(r) == ["id", "label", "probs"] for r in rows)
    assert [r["label"] for r in rows] == [max(r["probs"], key=r["probs"].get) for r in rows]


@pytest.mark.slow
def test_mlflow_models_serve_decides_as_the_run_did(decision_run):
    """``mlflow models serve`` on the run's logged model answers each val row with the run's decision, whether it
    abstained, and its probabilities."""
    from conftest import serve_predictions
    from mlflow.tracking import MlflowClient

    tmp, val = decision_run["tmp"], decision_run["val"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    records = [
        {"id": r["id"], "features": r["features"]}
        for r in map(json.loads, decision_run["val_file"].read_text().splitlines())
    ]
    served = serve_predictions(f"runs:/{run.info.run_id}/model", uri, records, tmp)
    assert [(s["id"], s["label"], s["abstained"]) for s in served] == [
        (r["id"], val[r["id"]]["decision"], val[r["id"]]["abstained"]) for r in records
    ]
    assert any(s["abstained"] for s in served) and any(not s["abstained"] for s in served)
    assert (
        np.abs(probs_of([s["probs"] for s in served]) - probs_of([val[s["id"]]["probs"] for s in served])).max() <= 1e-5
    )
