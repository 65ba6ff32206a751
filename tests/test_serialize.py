"""Serializers (``conf/serialize``): the json form is today's text byte for byte; kv and bins mean what their docs
say for missing values, unseen categories, mistyped values and out-of-range numbers; the fitted state survives
JSON; and, through real tiny runs, every serializer round-trips through export and predict/evaluate, with bins
fitted on the training split only."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import compose_run as shared_compose_run

from loralab.data.demo import write_demo
from loralab.data.records import Record, load_records
from loralab.data.serialize import (
    UNKNOWN,
    Bins,
    Json,
    KeyValue,
    load_serializer,
    serialize,
    serialize_records,
)
from loralab.inference import evaluate_file, load_exported, predict_file
from loralab.lifecycle import run as train

LABELS = ["long", "short", "skip"]


def records(*features: dict) -> list[Record]:
    return [Record(id=str(i), features=f, label="long") for i, f in enumerate(features)]


def test_json_is_todays_text_byte_for_byte():
    f = {"b": 1.5, "a": "x\u00e9", "c": None, "d": True}
    today = "{features}".format(features=json.dumps(f, sort_keys=True, ensure_ascii=True))
    assert Json()(f) == serialize(f) == today
    assert Json("features: {features}")(f) == serialize(f, "features: {features}") == "features: " + today
    assert serialize_records(records(f), "{features}") == [today]


def test_kv_form():
    kv = KeyValue(digits=4)
    f = {"wave": 0.123456, "atr": 1065.0, "n": 7, "flag": False, "session": "new york", "gone": None, "big": 123456.7}
    assert kv(f) == "atr=1065 big=123500 flag=0 gone=? n=7 session=new_york wave=0.1235"
    assert KeyValue(digits=None)({"x": 0.123456}) == "x=0.123456"
    assert kv({"z": 1, "a": 2}) == kv({"a": 2, "z": 1})  # key order of the writer does not matter


def fitted_bins(n_bins: int = 4) -> Bins:
    train = records(
        *(
            {"x": float(i), "dir": d, "ok": i % 2 == 0, "venue": v}
            for i, d, v in zip(range(100), [-1, 1] * 50, ["a", "b", "c", "d"] * 25)
        )
    )
    return Bins(n_bins=n_bins).fit(train)


def test_bins_are_train_quantiles_and_few_values_keep_their_order():
    bins = fitted_bins(4)
    spec = bins.features
    assert spec["x"] == {"type": "number", "edges": [24.75, 49.5, 74.25]}  # equal-count cuts of 0..99
    assert spec["dir"] == {"type": "number", "edges": [0.0]}  # two values: one bin each, ordered
    assert spec["ok"] == {"type": "bool"} and spec["venue"] == {"type": "category", "values": ["a", "b", "c", "d"]}
    assert bins({"x": 10.0, "dir": -1, "ok": True, "venue": "c"}) == "dir=0 ok=1 venue=c x=0"
    assert bins({"x": 60, "dir": 1, "ok": False, "venue": "a"}) == "dir=1 ok=0 venue=a x=2"


def test_more_than_ten_bins_are_one_character_each_and_older_models_keep_their_decimal_bins():
    """Bins 10 and up are ``a``, ``b``, …: one token each in a tokenizer that splits digits (``12`` would be two,
    the first shared with bin 1). A model saved before the symbols were recorded reads its bins as it was trained."""
    bins = fitted_bins(16)
    texts = [bins.value("x", float(x)) for x in range(100)]
    assert texts[0] == "0" and texts[99] == "f" and set(texts) == set("0123456789abcdef")
    old = bins.state()
    del old["fitted"]["symbols"]
    assert load_serializer(old).value("x", 99.0) == "15" and load_serializer(bins.state()).value("x", 99.0) == "f"


def test_tree_cuts_put_a_rules_threshold_on_a_bin_edge_fitted_on_the_labels_given():
    """A label that flips at x = 37 inside a quantile bin: ``cuts: tree`` cuts there, ``quantile`` does not; a
    feature unrelated to the label still gets ordered bins of at least a quantile bin's rows; the edges depend
    on the training labels."""
    xs = [float(i) for i in range(100)]
    train = [
        Record(id=str(i), features={"x": x, "noise": float((i * 37) % 100)}, label="long" if x < 37 else "skip")
        for i, x in enumerate(xs)
    ]
    tree, quantile = (Bins(n_bins=4, cuts=c).fit(train) for c in ("tree", "quantile"))
    assert 36.5 in tree.features["x"]["edges"] and 36.5 not in quantile.features["x"]["edges"]
    assert len(tree.features["x"]["edges"]) <= 3  # at most n_bins bins
    below, above = ({int(tree.value("x", x)) for x in part} for part in (xs[:37], xs[37:]))
    assert max(below) < min(above)  # the bins still keep the order of the numbers, and now separate the labels
    counts = Counter(tree.value("noise", r.features["noise"]) for r in train)
    assert len(counts) <= 4 and min(counts.values()) >= 100 // 4
    shifted = [Record(id=r.id, features=r.features, label="long" if r.features["x"] < 60 else "skip") for r in train]
    assert 59.5 in Bins(n_bins=4, cuts="tree").fit(shifted).features["x"]["edges"]
    again = load_serializer(json.loads(json.dumps(tree.state())))
    assert again.state() == tree.state() and again({"x": 40.0, "noise": 1.0}) == tree({"x": 40.0, "noise": 1.0})


def test_bins_defined_meanings_for_missing_unseen_mistyped_and_out_of_range():
    bins = fitted_bins(4)
    # null and an absent key: unknown; a category never seen in training: unknown too
    assert bins({"x": None, "ok": True, "venue": "zz"}) == f"dir={UNKNOWN} ok=1 venue={UNKNOWN} x={UNKNOWN}"
    # another type than in training (a string number, a bool for a number, a number for a bool): unknown
    assert (
        bins({"x": "5", "dir": True, "ok": 1, "venue": 3}) == f"dir={UNKNOWN} ok={UNKNOWN} venue={UNKNOWN} x={UNKNOWN}"
    )
    # beyond the training range: the end bins; a key not seen in training: left out
    assert bins({"x": -1e9, "dir": 5, "ok": False, "venue": "a", "new": 1}) == "dir=1 ok=0 venue=a x=0"
    assert bins({"x": 1e9, "dir": -5, "ok": False, "venue": "a"}) == "dir=0 ok=0 venue=a x=3"


def test_fitted_state_is_json_and_rebuilds_the_same_serializer():
    for ser in (Json("f: {features}"), KeyValue(digits=3), fitted_bins(5)):
        state = json.loads(json.dumps(ser.state()))  # plain JSON, as in loralab.json
        again = load_serializer(state)
        probe = {"x": 33.3, "dir": 1, "ok": True, "venue": "b", "gone": None}
        assert type(again) is type(ser) and again(probe) == ser(probe) and again.state() == ser.state()
    with pytest.raises(ValueError, match="kind 'os.system': unknown"):
        load_serializer({"kind": "os.system", "params": {}})
    with pytest.raises(RuntimeError, match="fit"):
        Bins()({"x": 1})


def compose_run(tmp_path, name, *extra):
    """The shared short run (conftest) on 48 demo rows, the tiny model's own LoRA targets and longer texts."""
    extra = ("baseline.threads=1", "data.cache_dir=null", "quiet=true", *extra)
    return shared_compose_run(tmp_path, name, *extra, n_train=48, n_val=24, lora="attention", max_length=96)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["json", "kv", "bins"])
def test_each_serializer_round_trips_through_export_and_predict(tmp_path, kind):
    cfg = compose_run(tmp_path, "run", f"serialize={kind}")
    train(cfg)
    run_dir = tmp_path / "run"
    meta = json.loads((run_dir / "loralab.json").read_text())
    state = meta["serialization"]["serializer"]
    assert state["kind"] == kind
    train_rows = load_records(cfg.data.train_file, LABELS)[0]
    val_rows = load_records(cfg.data.val_file, LABELS)[0]
    if kind == "bins":  # fitted on the training split only: the val rows (their values, labels) never reach it
        bins = {"n_bins": cfg.serialize.n_bins, "cuts": cfg.serialize.cuts}
        assert state == Bins(**bins).fit(train_rows).state()
        assert state != Bins(**bins).fit(train_rows + val_rows).state()
    ckpt = json.loads((run_dir / "checkpoint_best" / "loralab_checkpoint.json").read_text())
    assert ckpt["serializer"] == state

    exported = load_exported(run_dir / "model_final.zip")
    assert exported.serializer.state() == state
    report = json.loads((run_dir / "data_report.json").read_text())["serialization"]
    assert report["kind"] == kind
    # Predict/evaluate read the val file through the export: the same texts, so the same scores as in training.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = evaluate_file(
        run_dir / "model_final.zip", cfg.data.val_file, tmp_path / "val.metrics.json", prefix="val_", device="cpu"
    )
    assert scored["val_macro_f1"] == pytest.approx(metrics["val_macro_f1"])
    assert scored["val_nll"] == pytest.approx(metrics["val_nll"], rel=1e-4)
    # Rows with an unseen category and a missing feature are scored, not refused.
    odd = tmp_path / "odd.jsonl"
    first = val_rows[0].features
    odd.write_text(
        json.dumps({"id": "unseen", "features": {**first, "session": "tokyo"}})
        + "\n"
        + json.dumps({"id": "missing", "features": {k: v for k, v in first.items() if k != "atr"}})
        + "\n"
    )
    stats = predict_file(run_dir / "model_final.zip", odd, tmp_path / "odd.pred.jsonl", device="cpu")
    assert stats["rows_kept"] == 2
    if kind == "bins":
        assert "session=?" in exported.serializer({**first, "session": "tokyo"})
        assert "atr=?" in exported.serializer({k: v for k, v in first.items() if k != "atr"})


@pytest.mark.slow
def test_a_hundred_row_run_reaches_the_minimum_number_of_steps(tmp_path):
    cfg = compose_run(
        tmp_path,
        "small",
        "trainer.max_epochs=auto",
        "trainer.min_steps=40",
        "optim.batch_size=16",
        "model.max_length=64",
        "serialize=bins",
        "trainer.early_stopping.patience_steps=1000",
        f"data.train_file={write_demo(tmp_path / 'd100', n_train=100, n_val=24)[0]}",
        "data.val_file=null",
    )
    train(cfg)
    summary = json.loads((tmp_path / "small" / "training_summary.json").read_text())
    steps_per_epoch = -(
        -sum(
            json.loads((tmp_path / "small" / "data_report.json").read_text())["class_counts"][
                "train_after_oversampling"
            ].values()
        )
        // 16
    )
    assert summary["max_epochs"] == -(-40 // steps_per_epoch) > 1  # epochs derived from the minimum steps
    assert summary["optimizer_steps"] >= 40 and summary["stop_reason"] == "max_epochs"
