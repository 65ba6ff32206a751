"""Temperature scaling and its metrics: hand-checked ECE/Brier, a fit that fixes over-confidence, a fit that
leaves a calibrated model alone, and the reliability diagram."""

import math

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from loralab.calibrate import (
    bin_stats,
    brier,
    calibrate,
    ece,
    fit_temperature,
    nll,
    probabilities,
    reliability_diagram,
    reliability_figure,
)

# Four rows, three classes; confidences avoid bin edges (bins are (i/15, (i+1)/15]).
HAND_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # y=0, right, conf 0.90 -> bin 13 (0.867, 0.933]
        [0.92, 0.05, 0.03],  # y=1, wrong, conf 0.92 -> bin 13
        [0.20, 0.50, 0.30],  # y=1, right, conf 0.50 -> bin 7 (0.467, 0.533]
        [0.42, 0.30, 0.28],  # y=1, wrong, conf 0.42 -> bin 6 (0.400, 0.467]
    ]
)
HAND_Y = [0, 1, 1, 1]


def test_ece_on_hand_example():
    # bin 13: 2 rows, accuracy 1/2, mean confidence 0.91 -> weight 2/4, gap 0.41
    # bin 7:  1 row,  accuracy 1,   confidence 0.50      -> weight 1/4, gap 0.50
    # bin 6:  1 row,  accuracy 0,   confidence 0.42      -> weight 1/4, gap 0.42
    expected = 2 / 4 * abs(0.5 - 0.91) + 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(0 - 0.42)
    assert ece(HAND_PROBS, HAND_Y, n_bins=15) == pytest.approx(expected)
    counts, acc, conf = bin_stats(HAND_PROBS, HAND_Y, 15)
    assert counts.tolist() == [0] * 6 + [1, 1] + [0] * 5 + [2, 0]
    assert acc[13] == 0.5 and conf[13] == pytest.approx(0.91)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 1/2 of the way belongs to the bin it closes; confidence 1.0 to the last bin
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    counts, _, _ = bin_stats(probs, [0, 0], n_bins=2)
    assert counts.tolist() == [1, 1]


def test_brier_and_nll_on_hand_example():
    # Brier: squared distance to the one-hot target, summed over classes, averaged over rows.
    per_row = [
        (0.90 - 1) ** 2 + 0.05**2 + 0.05**2,
        0.92**2 + (0.05 - 1) ** 2 + 0.03**2,
        0.20**2 + (0.50 - 1) ** 2 + 0.30**2,
        0.42**2 + (0.30 - 1) ** 2 + 0.28**2,
    ]
    assert brier(HAND_PROBS, HAND_Y) == pytest.approx(sum(per_row) / 4)
    assert nll(HAND_PROBS, HAND_Y) == pytest.approx(
        -(math.log(0.90) + math.log(0.05) + math.log(0.50) + math.log(0.30)) / 4
    )


def test_brier_two_classes_uses_the_same_definition():
    probs = np.array([[0.8, 0.2]])
    assert brier(probs, [0]) == pytest.approx(0.2**2 + 0.2**2)  # not halved for two classes


@pytest.fixture(scope="module")
def logistic_logits():
    """A reasonable model (logistic regression) and its logits on a calibration split and a test split."""
    x, y = make_classification(
        n_samples=6000,
        n_features=10,
        n_informative=5,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=0.8,
        flip_y=0.05,
        random_state=0,
    )
    model = LogisticRegression(max_iter=1000).fit(x[:2000], y[:2000])
    return (model.decision_function(x[2000:4000]), y[2000:4000]), (model.decision_function(x[4000:]), y[4000:])


def test_temperature_fixes_an_over_confident_model(logistic_logits):
    (z_cal, y_cal), (z_test, y_test) = logistic_logits
    scale = 5.0
    t = fit_temperature(scale * z_cal, y_cal)
    # NLL(softmax(s*z / T)) depends on T/s only, so the fit must absorb the scale exactly
    assert t == pytest.approx(scale * fit_temperature(z_cal, y_cal), rel=1e-3)
    before, after = probabilities(scale * z_test), probabilities(scale * z_test, t)
    assert nll(after, y_test) < nll(before, y_test) - 0.1  # judged on rows the fit never saw
    assert nll(after, y_test) == pytest.approx(nll(probabilities(z_test), y_test), rel=0.01)
    assert ece(after, y_test) < ece(before, y_test)
    assert brier(after, y_test) < brier(before, y_test)
    assert (after.argmax(1) == before.argmax(1)).all()  # accuracy untouched


def test_temperature_near_one_leaves_a_calibrated_model_alone():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(5000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(z, axis=1)])  # labels drawn from the model: calibrated
    result = calibrate(z, y, "temperature")
    assert result["temperature"] == pytest.approx(1.0, abs=0.08)
    s = result["scalars"]
    assert s["val_nll_calibrated"] <= s["val_nll"]  # the fit minimises NLL, and T=1 is in the search range
    assert s["val_nll"] - s["val_nll_calibrated"] < 0.01 * s["val_nll"]
    assert np.abs(probabilities(z, result["temperature"]) - probabilities(z)).max() < 0.05


def test_calibrate_none_and_bad_method():
    z = np.array([[2.0, 0.0], [0.0, 1.0]])
    result = calibrate(z, [0, 1], "none")
    assert result["temperature"] == 1.0
    assert set(result["scalars"]) == {"temperature", "val_nll", "val_ece", "val_brier"}
    with pytest.raises(ValueError, match="calibration.method"):
        calibrate(z, [0, 1], "platt")


def test_reliability_diagram(tmp_path):
    curves = {"uncalibrated": HAND_PROBS, "T = 2": probabilities(np.log(HAND_PROBS), 2.0)}
    fig = reliability_figure(HAND_Y, curves, title="val")
    ax = fig.axes[0]
    assert ax.get_title() == "val" and ax.get_ylabel() == "accuracy"
    assert fig.axes[1].get_xlabel().startswith("confidence")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "perfect calibration" and legend[1].startswith("uncalibrated (ECE")
    path = reliability_diagram(HAND_Y, curves, tmp_path / "plots" / "rd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
